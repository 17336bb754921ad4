"""The web page in a real headless browser (Playwright driving Debian's chromium) against the real bridge and
SmolLM2: a streamed answer, Stop cancelling on the worker, the worker table growing with a second worker, the
API-key prompt, the offline docs, and phone width in dark mode. Screenshots go to bench-results/screenshots/.

Skipped, with the reason, when playwright or chromium is missing (`apt-get install chromium`; never
`playwright install`: its browser download does not work here). `LLMBUS_CHROMIUM` points at another binary.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import Callable
from typing import Any

import msgspec
import nats
import pytest

from bus_gateway.client import BusClient
from helpers.bridge import API_KEY, Bridge
from helpers.browser_guard import require_browser
from helpers.tiny_model import tiny_model
from helpers.workers import start_worker
from inference_worker.compiled_decode import CompiledDecode
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import ChatRequest

require_browser()

from playwright.async_api import Page, expect  # noqa: E402

pytest.register_assert_rewrite("helpers.browser")
from helpers.browser import FakeBus, OpenTab, screenshot, send_asking_for_the_key  # noqa: E402

pytest_plugins = ["helpers.browser"]  # the browser and open_tab fixtures
pytestmark = pytest.mark.timeout(180)

MODEL = "SmolLM2-135M-Instruct"
ANSWER_TIMEOUT_MS = 90_000
STATS_TIMEOUT_S = 30.0
expect.set_options(timeout=20_000)


async def set_settings(page: Page, *, max_tokens: int, system: str = "", temperature: str = "0") -> None:
    await expect(page.locator("#model")).to_have_value(MODEL)
    await page.fill("#temperature", temperature)
    await page.fill("#max-tokens", str(max_tokens))
    await page.fill("#system-prompt", system)


async def ask(page: Page, text: str) -> dict[str, Any]:
    """Send `text`; returns the JSON body the page posted to /v1/chat/completions."""
    await page.fill("#prompt", text)
    async with page.expect_request("**/v1/chat/completions") as posted:
        await page.click("#send")
    return json.loads((await posted.value).post_data or "{}")


async def finished_answer(page: Page) -> str:
    answer = page.locator(".turn.assistant").last
    await expect(answer).to_have_attribute("data-finish", re.compile("stop|length"), timeout=ANSWER_TIMEOUT_MS)
    return await answer.locator(".text").text_content() or ""


def cancelled(stats: list[dict[str, Any]]) -> int:
    """Requests cancelled on every worker (each STATS endpoint carries the same worker-wide `data`)."""
    return sum(reply["endpoints"][0]["data"]["requests_cancelled"] for reply in stats)


async def stats_until(bus: BusClient, check: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """`$SRV.STATS` gathered again (each gather waits for the replies) until `check` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STATS_TIMEOUT_S
    while not check(stats := await bus.stats()):
        assert loop.time() < deadline, f"$SRV.STATS never satisfied the check: {stats}"
    return stats


@pytest.mark.model
async def test_an_answer_streams_in_and_the_conversation_is_multi_turn(
    worker: Any, bridge: Bridge, nats_server: NatsServer, open_tab: OpenTab
) -> None:
    tab = await open_tab(bridge.url + "/")
    page = tab.page
    system = "You are a helpful assistant. Answer in one short sentence."
    await set_settings(page, max_tokens=24, system=system)
    await page.evaluate(
        """() => {
            window.textUpdates = 0;
            new MutationObserver(() => window.textUpdates++)
                .observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});
        }"""
    )
    async with page.expect_response("**/v1/chat/completions") as answered:
        posted = await ask(page, "What is the capital of France?")
    assert (await answered.value).headers["content-type"].startswith("text/event-stream")
    assert posted["stream"] is True and posted["stream_options"] == {"include_usage": True}
    assert posted["model"] == MODEL and posted["temperature"] == 0 and posted["max_tokens"] == 24
    assert posted["messages"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    first_answer = await finished_answer(page)
    assert "Paris" in first_answer
    assert await page.evaluate("window.textUpdates") > 4  # the text grew delta by delta, not all at once

    answer = page.locator(".turn.assistant").last
    meta = await answer.locator(".meta").text_content() or ""
    assert re.fullmatch(r"\d+ tokens · TTFT \d+ ms · \d+\.\d tok/s · (stop|length)", meta), meta
    assert 1 < int(await answer.get_attribute("data-tokens") or 0) <= 24
    await screenshot(page, "playground-chat.png")

    # The second turn carries the whole conversation; user text is shown as text, never as markup.
    markup = 'And Germany? <img src="x" onerror="window.pwned = 1">'
    await page.fill("#max-tokens", "8")
    second = await ask(page, markup)
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == first_answer
    await finished_answer(page)
    assert await page.locator(".turn.user .text").last.text_content() == markup
    assert await page.locator("#log img").count() == 0
    assert await page.evaluate("window.pwned") is None

    # "Show the request": the raw NATS body is a valid ChatRequest that a worker answers; the curl and Python
    # versions name the same call.
    await page.click("#show-request summary")
    nats_text = await page.locator("#request-nats").text_content() or ""
    assert nats_text.startswith("subject: llm.chat\n")
    body = nats_text.split("body:\n", 1)[1].split("\n\n", 1)[0]
    request = msgspec.json.decode(body, type=ChatRequest)
    assert request.stream and request.messages is not None and len(request.messages) == 4
    async with await BusClient.connect(nats_server.url) as bus:
        reply = await bus.chat(msgspec.structs.replace(request, stream=False, max_tokens=4))
    assert reply.usage.completion_tokens >= 1
    curl = await page.locator("#request-curl").text_content() or ""
    assert f"curl -sN {bridge.url}/v1/chat/completions" in curl and '"include_usage":true' in curl
    assert API_KEY not in curl
    python = await page.locator("#request-python").text_content() or ""
    compile(python, "request.py", "exec")
    assert f'base_url="{bridge.url}/v1"' in python and f'model="{MODEL}"' in python
    tab.assert_clean(bridge.url)


@pytest.mark.model
async def test_stop_cancels_the_generation_on_the_worker(
    worker: Any, bridge: Bridge, nats_server: NatsServer, open_tab: OpenTab
) -> None:
    async with await BusClient.connect(nats_server.url) as bus:
        before = cancelled(await bus.stats())
        tab = await open_tab(bridge.url + "/")
        page = tab.page
        await set_settings(page, max_tokens=256)
        await ask(page, "Write a very long story about a dragon who learns to fly. Describe every day of its life.")
        answer = page.locator(".turn.assistant").last
        await expect(answer.locator(".text")).to_have_text(re.compile(r"\S"), timeout=ANSWER_TIMEOUT_MS)
        await expect(page.locator("#stop")).to_be_enabled()
        await page.click("#stop")
        await expect(answer).to_have_attribute("data-finish", "stopped")
        stats = await stats_until(bus, lambda stats: cancelled(stats) > before)
        assert cancelled(stats) == before + 1
        # The page's bus view shows the cancel too.
        await expect(page.locator('#workers td[data-col="cancelled"]')).to_have_text(str(before + 1))
        await expect(page.locator("#send")).to_be_enabled()
        tab.assert_clean(bridge.url)


@pytest.mark.model
async def test_the_worker_table_lists_a_second_worker(
    worker: Any, bridge: Bridge, nats_server: NatsServer, smollm: Any, open_tab: OpenTab
) -> None:
    tab = await open_tab(bridge.url + "/bus")
    page = tab.page
    await expect(page.locator("#chat")).to_be_hidden()  # /bus is the bus view alone
    rows = page.locator("#workers tbody tr")
    await expect(rows).to_have_count(1)
    row = rows.first
    await expect(row.locator('[data-col="worker"]')).to_have_text(f"{socket.gethostname()}:{os.getpid()}")
    await expect(row.locator('[data-col="model"]')).to_have_text(MODEL)
    await expect(row.locator('[data-col="state"]')).to_have_text("serving")
    await expect(page.locator('[data-total="workers"]')).to_have_text("1 worker")
    second = await start_worker(Config(nats_url=nats_server.url, max_tokens_cap=16), smollm)
    try:
        await expect(rows).to_have_count(2)
        await expect(page.locator('[data-total="workers"]')).to_have_text("2 workers")
        await screenshot(page, "bus-two-workers.png")
    finally:
        await second.shutdown()
    await expect(rows).to_have_count(1)
    tab.assert_clean(bridge.url)


async def test_a_draining_worker_is_flagged(lonely_bridge: Bridge, lonely_nats: NatsServer, open_tab: OpenTab) -> None:
    """A real worker that drains while it holds a request (its engine waits for a second request before its first
    prefill, so the request stays held): it leaves PING and INFO, and its STATS say `draining`."""
    config = Config(nats_url=lonely_nats.url, max_batch_size=2, max_wait_ms=600_000, threads=1, compile=False)
    worker = Worker(config, await nats.connect(lonely_nats.url), tiny_model())
    await worker.start()
    held = asyncio.ensure_future(worker.nc.request("llm.chat", b'{"chat_id": "h", "user_prompt": "Hi"}', timeout=600))
    draining = None
    try:
        async with await BusClient.connect(lonely_nats.url) as bus:
            while not (await bus.stats(1.0)) or (await bus.stats(1.0))[0]["endpoints"][0]["data"]["waiting"] != 1:
                await asyncio.sleep(0.05)  # a bounded poll (the test timeout) of state we cannot subscribe to
        draining = asyncio.ensure_future(worker.drain(600))
        tab = await open_tab(lonely_bridge.url + "/bus")
        row = tab.page.locator("#workers tbody tr")
        await expect(row).to_have_count(1)
        await expect(row.locator('[data-col="state"]')).to_have_text("draining")
        await expect(row.locator('[data-col="worker"]')).to_have_text(f"{socket.gethostname()}:{os.getpid()}")
        await expect(row.locator('[data-col="device"]')).to_have_text("cpu float32")
        await expect(tab.page.locator('[data-total="draining"]')).to_have_text("1 draining")
        await expect(tab.page.locator('[data-total="waiting"]')).to_have_text("1 waiting")
    finally:
        if draining is not None:
            draining.cancel()
        await worker.close()
        await worker.nc.close()
        held.cancel()
    tab.assert_clean(lonely_bridge.url)


async def test_a_warming_then_degraded_worker_is_flagged(
    lonely_bridge: Bridge, lonely_nats: NatsServer, open_tab: OpenTab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real worker whose decode step is compiling shows `warming`; once its compiled step has failed (as one did
    on an H100, leaving the worker decoding eagerly, 10x slower), `degraded`, and the totals count it."""
    monkeypatch.setattr(CompiledDecode, "_warm_up", lambda self, sizes=None: None)  # the compile never ends
    config = Config(nats_url=lonely_nats.url, max_batch_size=2, threads=1, compile=True)
    worker = Worker(config, await nats.connect(lonely_nats.url), tiny_model())
    await worker.start()
    try:
        tab = await open_tab(lonely_bridge.url + "/bus")
        state = tab.page.locator('#workers tbody tr [data-col="state"]')
        await expect(state).to_have_text("warming")
        await expect(tab.page.locator('[data-total="compile_failed"]')).to_have_text("0 degraded")
        worker.engine.runner.compiled.failed = True  # what the runner sets when a compiled step raises
        await expect(state).to_have_text("degraded")
        await expect(state).to_have_attribute("title", re.compile("decodes eagerly"))
        await expect(tab.page.locator('[data-total="compile_failed"]')).to_have_text("1 degraded")
    finally:
        await worker.close()
        await worker.nc.close()
    tab.assert_clean(lonely_bridge.url)


async def test_the_page_asks_for_an_api_key_and_keeps_it_in_session_storage(
    keyed_bridge: Bridge, open_tab: OpenTab
) -> None:
    tab = await open_tab(keyed_bridge.url + "/")
    page = tab.page
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    await expect(page.locator("#key-reason")).to_contain_text("missing API key")
    await page.fill("#key-input", "sk-wrong")
    await page.click("#key-save")
    await expect(page.locator("#key-reason")).to_contain_text("invalid API key")
    await expect(dialog).to_be_visible()
    await page.fill("#key-input", API_KEY)
    await page.click("#key-save")
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#bus-status")).to_contain_text("Updated")
    await expect(page.locator('[data-total="workers"]')).to_have_text("0 workers")
    await expect(page.locator("#model")).to_have_value("")  # no worker on this bus
    assert await page.evaluate("sessionStorage.getItem('llmbus-api-key')") == API_KEY
    assert await page.evaluate("localStorage.length") == 0
    assert await page.evaluate("document.cookie") == ""
    keyed = [r for r in tab.requests if r.url.endswith(("/bus.json", "/v1/models"))]
    authorized = [await r.header_value("authorization") for r in keyed]
    assert f"Bearer {API_KEY}" in authorized
    await expect(page.locator("#forget-key")).to_be_visible()
    await page.click("#forget-key")
    assert await page.evaluate("sessionStorage.getItem('llmbus-api-key')") is None
    tab.assert_clean(keyed_bridge.url)


async def test_the_docs_viewer_reads_openapi_json_offline(lonely_bridge: Bridge, open_tab: OpenTab) -> None:
    tab = await open_tab(lonely_bridge.url + "/docs")
    page = tab.page
    await expect(page.locator("#api-title")).to_contain_text("llmbus HTTP bridge")
    operation = page.locator("details.op", has=page.locator(".path", has_text=re.compile(r"^/v1/chat/completions$")))
    await expect(operation).to_have_count(1)
    await operation.locator("summary").click()
    await expect(operation.locator("a", has_text="ChatCompletionRequest")).to_be_visible()
    await operation.locator("a", has_text="ChatCompletionRequest").click()
    await expect(page.locator("#schema-ChatCompletionRequest pre")).to_contain_text('"messages"')
    await expect(page.locator(".path", has_text=re.compile(r"^/bus\.json$"))).to_have_count(1)
    await screenshot(page, "docs.png")
    tab.assert_clean(lonely_bridge.url)


async def test_after_cancel_send_asks_for_the_key_again(keyed_bridge: Bridge, open_tab: OpenTab) -> None:
    """Esc after an earlier "Use key" saves nothing (the dialog's returnValue still said "save"); a cancelled
    dialog leaves the list saying why, and Send asks again, after which the bus view polls again."""
    tab = await open_tab(keyed_bridge.url + "/")
    page = tab.page
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    await page.fill("#key-input", "sk-wrong")
    await page.click("#key-save")
    await expect(page.locator("#key-reason")).to_contain_text("invalid API key")
    await page.fill("#key-input", "sk-typed-then-escaped")
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#model option")).to_have_text(["API key needed"])
    await expect(page.locator("#bus-status")).to_contain_text("API key needed")
    assert await page.evaluate("sessionStorage.getItem('llmbus-api-key')") is None
    await send_asking_for_the_key(page, "Hello", API_KEY)
    await expect(page.locator("#bus-status")).to_contain_text("Updated")
    await expect(page.locator("#model option")).to_have_text(["no model on the bus"])
    await expect(page.locator("#chat-error")).to_contain_text("No model to ask")
    await expect(page.locator("#prompt")).to_have_value("Hello")
    tab.assert_clean(keyed_bridge.url)


async def test_the_model_list_reloads_when_the_bus_changes_not_on_every_poll(
    lonely_bridge: Bridge, open_tab: OpenTab
) -> None:
    """The bus view may name models this bridge cannot ask (another subject prefix, a draining worker): the list
    then loads once, not on every poll; a failed load shows its error until a load succeeds."""
    async with lonely_bridge.client() as client:
        fake = FakeBus((await client.get("/bus.json")).json())
    fake.bus_models, fake.models = ["elsewhere"], None
    tab = await open_tab(lonely_bridge.url + "/", routes=fake.routes)
    page = tab.page
    error = page.locator("#chat-error")
    await expect(error).to_have_text("Could not list models: not connected to NATS")
    await fake.polled(4)
    assert fake.model_loads <= 2  # at the start, and once for the bus's names
    fake.bus_models, fake.models = ["elsewhere", MODEL], [MODEL]
    await expect(page.locator("#model")).to_have_value(MODEL)
    await expect(error).to_be_hidden()
    loads = fake.model_loads
    await fake.polled(4)
    assert fake.model_loads == loads
    tab.assert_clean(lonely_bridge.url)


async def test_the_sse_body_is_cancelled_when_the_loop_ends_early(lonely_bridge: Bridge, open_tab: OpenTab) -> None:
    """A break or a throw in the loop over `sseData` cancels the body, as Stop does, so the fetch closes and the
    bridge stops the generation. (An open stream the bridge would keep, played by streams that never close.)"""
    tab = await open_tab(lonely_bridge.url + "/")
    page = tab.page
    await page.evaluate(
        """async () => {
            const { sseData } = await import("/static/chat.js");
            const cancelled = [];
            const body = (name) => new ReadableStream({
                start(controller) { controller.enqueue(new TextEncoder().encode("data: one\\n\\ndata: two\\n\\n")); },
                cancel() {
                    cancelled.push(name);
                    document.body.dataset.cancelled = cancelled.toSorted().join(" ");
                },
            });
            for await (const data of sseData(body("break"))) if (data === "one") break;
            try {
                for await (const data of sseData(body("throw"))) throw new Error(data);
            } catch {}
        }"""
    )
    await expect(page.locator("body")).to_have_attribute("data-cancelled", "break throw")
    tab.assert_clean(lonely_bridge.url)


async def test_the_docs_viewer_takes_a_malformed_hash(lonely_bridge: Bridge, open_tab: OpenTab) -> None:
    tab = await open_tab(lonely_bridge.url + "/docs#%E0")
    page = tab.page
    await expect(page.locator("#api-title")).to_contain_text("llmbus HTTP bridge")
    await page.evaluate("location.hash = '#schema-ChatCompletionRequest'")
    await expect(page.locator("#schema-ChatCompletionRequest")).to_have_attribute("open", "")
    await expect(page.locator("#docs-error")).to_be_hidden()
    tab.assert_clean(lonely_bridge.url)


@pytest.mark.model
async def test_phone_width_in_dark_mode(worker: Any, bridge: Bridge, open_tab: OpenTab) -> None:
    tab = await open_tab(
        bridge.url + "/", viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True, has_touch=True
    )
    page = tab.page
    await expect(page.locator("#model")).to_have_value(MODEL)
    await expect(page.locator("#workers tbody tr")).to_have_count(1)
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(20, 21, 24)"
    for control in ("#prompt", "#send", "#stop", "#model"):
        box = await page.locator(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, control
    await screenshot(page, "playground-phone-dark.png")
    tab.assert_clean(bridge.url)
