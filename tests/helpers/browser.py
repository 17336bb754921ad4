"""The browser side of test_web.py (which skips first when playwright or chromium is missing): one chromium for
the session, tabs that record their errors and requests, and `FakeBus`, which answers the page's `/bus.json` and
`/v1/models` polls with what a test sets, so a test can play any bus the page may see."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Request, Route, async_playwright, expect

CHROMIUM = Path(os.environ.get("LLMBUS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent.parent / "bench-results" / "screenshots"
RouteHandler = Callable[[Route], Awaitable[None]]


@dataclass
class Tab:
    """A page, the uncaught errors it raised and every URL it requested."""

    page: Page
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def assert_clean(self, origin: str) -> None:
        assert not self.errors, self.errors
        outside = [r.url for r in self.requests if not r.url.startswith((origin, "data:"))]
        assert not outside, f"the page loaded from elsewhere: {outside}"


OpenTab = Callable[..., Awaitable[Tab]]


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One chromium for the module; Playwright gives each launch a fresh temporary profile."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def open_tab(browser: Browser) -> AsyncIterator[OpenTab]:
    """Opens a URL in a fresh context; `routes` (URL glob: handler) answer those requests before the page loads."""
    contexts = []

    async def open_page(url: str, routes: dict[str, RouteHandler] | None = None, **context_options: Any) -> Tab:
        context = await browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options})
        contexts.append(context)
        for pattern, handler in (routes or {}).items():
            await context.route(pattern, handler)
        tab = Tab(await context.new_page())
        tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))
        tab.page.on("request", lambda request: tab.requests.append(request))
        await tab.page.goto(url)
        return tab

    yield open_page
    for context in contexts:
        await context.close()


async def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


class FakeBus:
    """Answers `/bus.json` with `view` (its `totals.models` set to `bus_models`) and `/v1/models` with `models`
    (None: a 503), counting both; `polled(n)` waits for n more `/bus.json` polls."""

    def __init__(self, view: dict[str, Any]) -> None:
        self.view = view
        self.bus_models: list[str] = []
        self.models: list[str] | None = []
        self.polls = 0
        self.model_loads = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def routes(self) -> dict[str, RouteHandler]:
        return {"**/bus.json": self._bus_json, "**/v1/models": self._v1_models}

    async def polled(self, count: int) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((self.polls + count, waiter))
        await waiter

    async def _bus_json(self, route: Route) -> None:
        self.polls += 1
        await route.fulfill(json={**self.view, "totals": {**self.view["totals"], "models": self.bus_models}})
        for target, waiter in [entry for entry in self._waiters if entry[0] <= self.polls]:
            self._waiters.remove((target, waiter))
            waiter.set_result(None)

    async def _v1_models(self, route: Route) -> None:
        self.model_loads += 1
        if self.models is None:
            await route.fulfill(status=503, json={"error": {"message": "not connected to NATS"}})
            return
        await route.fulfill(json={"object": "list", "data": [{"id": name, "object": "model"} for name in self.models]})


async def send_asking_for_the_key(page: Page, text: str, key: str) -> None:
    """Type `text` and Send on a page with no key yet: the key dialog opens; enter `key` and close it."""
    dialog = page.locator("#key-dialog")
    await page.fill("#prompt", text)
    await page.click("#send")
    await expect(dialog).to_be_visible()
    await page.fill("#key-input", key)
    await page.click("#key-save")
    await expect(dialog).to_be_hidden()
