"""The web page's edge cases in a real headless browser (as test_web.py, whose skips apply here too) against the real
bridge and nats-server, with tiny-model workers where a test needs answers: a send that fails or is stopped before
its first token leaves neither the screen nor the conversation, an API key no header can carry, Forget API key,
and TTFT that does not count the time spent in the key dialog."""

from __future__ import annotations

import dataclasses
import json
import re
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from helpers.bridge import API_KEY, Bridge, running_bridge
from helpers.browser_guard import require_browser
from helpers.tiny_model import tiny_model
from helpers.workers import tiny_worker
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer

require_browser()

from playwright.async_api import Page, expect  # noqa: E402

pytest.register_assert_rewrite("helpers.browser")
from helpers.browser import FakeBus, OpenTab, send_asking_for_the_key  # noqa: E402

pytest_plugins = ["helpers.browser"]  # the browser and open_tab fixtures
pytestmark = pytest.mark.timeout(180)

TINY = "tiny"  # tiny_model()'s name, as its worker announces it
POLL_MS = 1500  # app.js: the page polls /bus.json this often
ZERO_WIDTH_SPACE = "\u200b"
expect.set_options(timeout=20_000)


def endless_worker(url: str, **config: Any) -> AbstractAsyncContextManager[Worker]:
    """A real worker serving the tiny model (its answers run to max_tokens: no EOS)."""
    return tiny_worker(url, tiny_model(eos_token_ids=frozenset()), **config)


async def fake_bus(bridge: Bridge, model: str) -> FakeBus:
    """The page's polls answered with one `model` (and never a 401): only the chat itself reaches the bridge."""
    async with bridge.client() as client:
        view = (await client.get("/bus.json", headers={"Authorization": f"Bearer {API_KEY}"})).json()
    fake = FakeBus(view)
    fake.bus_models, fake.models = [model], [model]
    return fake


async def send(page: Page, text: str) -> list[dict[str, Any]]:
    """Type `text` and Send; the `messages` the page posted."""
    await page.fill("#prompt", text)
    async with page.expect_request("**/v1/chat/completions") as posted:
        await page.click("#send")
    return json.loads((await posted.value).post_data or "{}")["messages"]


async def test_a_failed_send_leaves_neither_its_message_nor_a_duplicate(
    lonely_bridge: Bridge, open_tab: OpenTab
) -> None:
    """A send that fails before any text (no worker serves the model: 503 or 404) puts the message back in the
    prompt box and takes both turns off the screen, so resending shows it once."""
    tab = await open_tab(lonely_bridge.url + "/", routes=(await fake_bus(lonely_bridge, "ghost")).routes)
    page = tab.page
    await expect(page.locator("#model")).to_have_value("ghost")
    for _ in range(2):
        messages = await send(page, "Hello")
        assert messages == [{"role": "user", "content": "Hello"}]
        await expect(page.locator("#chat-error")).to_be_visible()
        await expect(page.locator("#send")).to_be_enabled()
        await expect(page.locator("#log .turn")).to_have_count(0)
        await expect(page.locator("#prompt")).to_have_value("Hello")
    tab.assert_clean(lonely_bridge.url)


async def test_cancel_in_the_key_dialog_leaves_no_message_on_screen(keyed_bridge: Bridge, open_tab: OpenTab) -> None:
    tab = await open_tab(keyed_bridge.url + "/", routes=(await fake_bus(keyed_bridge, "ghost")).routes)
    page = tab.page
    await expect(page.locator("#model")).to_have_value("ghost")
    await page.fill("#prompt", "Hello")
    await page.click("#send")
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    await expect(page.locator(".turn.user")).to_have_count(1)  # shown while the dialog asks
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#chat-error")).to_have_text("API key needed")
    await expect(page.locator("#log .turn")).to_have_count(0)
    await expect(page.locator("#prompt")).to_have_value("Hello")
    tab.assert_clean(keyed_bridge.url)


async def test_stop_before_the_first_token_gives_the_turn_back(
    fresh_nats_server: NatsServer, open_tab: OpenTab
) -> None:
    """A real worker holds each request (it waits for a second one before its first prefill): Stop then ends a
    send with no text. The turn leaves the conversation, so the next request carries one user message, not two in
    a row (which Mistral's and Llama 2's templates reject)."""
    held = {"max_batch_size": 2, "max_wait_ms": 600_000}
    async with (
        endless_worker(fresh_nats_server.url, **held),
        running_bridge(Config(nats_url=fresh_nats_server.url, request_timeout=60.0)) as bridge,
    ):
        tab = await open_tab(bridge.url + "/")
        page = tab.page
        await expect(page.locator("#model")).to_have_value(TINY)
        for stops in (1, 2):
            assert await send(page, "Hello") == [{"role": "user", "content": "Hello"}]
            await expect(page.locator('[data-total="waiting"]')).to_have_text("1 waiting")  # held by the worker
            await page.click("#stop")
            await expect(page.locator("#send")).to_be_enabled()
            await expect(page.locator("#log .turn")).to_have_count(0)
            await expect(page.locator("#prompt")).to_have_value("Hello")
            await expect(page.locator('[data-total="cancelled"]')).to_have_text(f"{stops} cancelled")
            await expect(page.locator('[data-total="waiting"]')).to_have_text("0 waiting")
        await expect(page.locator("#chat-error")).to_be_hidden()
        tab.assert_clean(bridge.url)


async def test_ttft_counts_from_the_request_sent_after_the_key_dialog(
    fresh_nats_server: NatsServer, open_tab: OpenTab
) -> None:
    """The chat gets a 401 and waits for the key dialog; TTFT is measured from the request sent with the key, so it
    is at most the time from "Use key" to the first text on screen."""
    config = Config(nats_url=fresh_nats_server.url, request_timeout=60.0, api_keys=[API_KEY])
    async with endless_worker(fresh_nats_server.url), running_bridge(config) as bridge:
        tab = await open_tab(bridge.url + "/", routes=(await fake_bus(bridge, TINY)).routes)
        page = tab.page
        await expect(page.locator("#model")).to_have_value(TINY)
        await page.fill("#max-tokens", "8")
        await page.evaluate(
            """() => {
                window.marks = {};
                document.getElementById("key-save").addEventListener("click", () => {
                    window.marks.saved = performance.now();
                });
                new MutationObserver(() => {
                    const text = document.querySelector("#log .turn.assistant .text");
                    if (text && text.textContent && window.marks.firstText === undefined) {
                        window.marks.firstText = performance.now();
                    }
                }).observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});
            }"""
        )
        await page.fill("#prompt", "Hello")
        await page.click("#send")
        await expect(page.locator("#key-dialog")).to_be_visible()
        await page.fill("#key-input", API_KEY)
        await page.click("#key-save")
        answer = page.locator(".turn.assistant")
        await expect(answer).to_have_attribute("data-finish", "length")
        meta = await answer.locator(".meta").text_content() or ""
        ttft = re.search(r"TTFT (\d+) ms", meta)
        assert ttft, meta
        marks = await page.evaluate("window.marks")
        assert int(ttft[1]) <= marks["firstText"] - marks["saved"] + 1, (meta, marks)
        tab.assert_clean(bridge.url)


async def test_a_key_no_header_can_carry_is_refused_in_the_dialog(keyed_bridge: Bridge, open_tab: OpenTab) -> None:
    """A pasted zero-width space would make every request throw before it is sent: the dialog says so and stays."""
    tab = await open_tab(keyed_bridge.url + "/")
    page = tab.page
    dialog, error = page.locator("#key-dialog"), page.locator("#key-error")
    await expect(dialog).to_be_visible()
    await expect(error).to_be_hidden()
    await page.fill("#key-input", API_KEY + ZERO_WIDTH_SPACE)
    await page.click("#key-save")
    await expect(error).to_contain_text("U+200B")
    await expect(error).to_contain_text("printable ASCII")
    await expect(dialog).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('llmbus-api-key')") is None
    await page.fill("#key-input", "sk with a space")
    await page.press("#key-input", "Enter")
    await expect(error).to_contain_text("U+0020")
    await page.fill("#key-input", API_KEY)
    await expect(error).to_be_hidden()
    await page.click("#key-save")
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#bus-status")).to_contain_text("Updated")
    tab.assert_clean(keyed_bridge.url)


async def test_a_stored_key_no_header_can_carry_is_asked_for_again(keyed_bridge: Bridge, open_tab: OpenTab) -> None:
    """A key stored before the check (another version of the page) is forgotten and asked for, as on a 401."""
    tab = await open_tab(keyed_bridge.url + "/")
    page = tab.page
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    await page.evaluate(f"sessionStorage.setItem('llmbus-api-key', '{API_KEY}{ZERO_WIDTH_SPACE}')")
    await page.reload()
    await expect(dialog).to_be_visible()
    await expect(page.locator("#key-reason")).to_contain_text("stored API key")
    await expect(page.locator("#key-reason")).to_contain_text("U+200B")
    assert await page.evaluate("sessionStorage.getItem('llmbus-api-key')") is None
    await page.fill("#key-input", API_KEY)
    await page.click("#key-save")
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#bus-status")).to_contain_text("Updated")
    await expect(page.locator('[data-total="workers"]')).to_have_text("0 workers")
    tab.assert_clean(keyed_bridge.url)


async def test_forget_api_key_pauses_polling_until_a_key_is_entered(keyed_bridge: Bridge, open_tab: OpenTab) -> None:
    """Forget API key does not reopen the dialog (the next /bus.json poll would get a 401): polling waits, as after
    Cancel, and Send asks for a key. The page's timers run on Playwright's clock, so polls are counted, not
    waited for."""
    tab = await open_tab(keyed_bridge.url + "/")
    page = tab.page
    await page.clock.install()
    await page.add_init_script(
        """(() => {
            window.busPolls = 0;
            const fetchFromNetwork = window.fetch;
            window.fetch = (input, init) => {
                if (String(input).endsWith("/bus.json")) window.busPolls += 1;
                return fetchFromNetwork(input, init);
            };
        })()"""
    )
    await page.reload()
    dialog, status = page.locator("#key-dialog"), page.locator("#bus-status")
    await expect(dialog).to_be_visible()
    await page.fill("#key-input", API_KEY)
    await page.click("#key-save")
    await expect(dialog).to_be_hidden()
    await expect(status).to_contain_text("Updated")
    await page.click("#forget-key")
    await expect(page.locator("#forget-key")).to_be_hidden()
    await expect(status).to_contain_text("API key forgotten (Send asks for it)")
    await expect(page.locator("#model option")).to_have_text(["API key needed"])
    polls = await page.evaluate("window.busPolls")
    await page.clock.run_for(4 * POLL_MS)  # every timer due in that time runs now
    assert await page.evaluate("window.busPolls") == polls
    await expect(dialog).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('llmbus-api-key')") is None

    await send_asking_for_the_key(page, "Hello", API_KEY)
    await expect(status).to_contain_text("Updated")
    assert await page.evaluate("window.busPolls") > polls
    await expect(page.locator("#model option")).to_have_text(["no model on the bus"])
    await expect(page.locator("#chat-error")).to_contain_text("No model to ask")
    await expect(page.locator("#prompt")).to_have_value("Hello")
    tab.assert_clean(keyed_bridge.url)


async def test_an_empty_answer_stays_in_the_conversation_so_turns_alternate(
    fresh_nats_server: NatsServer, open_tab: OpenTab
) -> None:
    """A worker whose every token is an end of sequence answers with no text (finish_reason stop). That turn was
    left out of the history, so the next request carried two user messages in a row; it is kept, empty."""
    url = fresh_nats_server.url
    silent = tiny_model()
    silent = dataclasses.replace(silent, eos_token_ids=frozenset(range(len(silent.tokenizer))))
    async with tiny_worker(url, silent), running_bridge(Config(nats_url=url, request_timeout=60.0)) as bridge:
        tab = await open_tab(bridge.url + "/")
        page = tab.page
        await expect(page.locator("#model")).to_have_value(TINY)
        assert await send(page, "Hello") == [{"role": "user", "content": "Hello"}]
        await expect(page.locator("#send")).to_be_enabled()
        await expect(page.locator("#log .turn")).to_have_count(2)
        second = await send(page, "Again")
        assert second == [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Again"},
        ]
        tab.assert_clean(bridge.url)
