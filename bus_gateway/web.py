"""The bridge's web page: a chat playground at `GET /`, the live bus view at `GET /bus` (the same page), its data
at `GET /bus.json`, the page's files under `/static/`, and an offline API docs viewer at `/docs`.

Everything is served from the installed package (`bus_gateway/static/`); nothing comes from a CDN. The page talks
to the bridge's own API only (`/v1/models`, `/v1/chat/completions`, `/bus.json`), so with API keys configured the
page asks for a key and the same guard protects `/bus.json` (it names hosts and pids). Every page and file carries
`SECURITY_HEADERS` (a strict CSP that forbids framing, and nosniff).
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

from litestar import Request, Response, Router, get
from litestar.datastructures import CacheControlHeader, State
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.response.base import ASGIResponse
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler, Guard

from bus_gateway.bus_view import BusSampler, BusView
from bus_gateway.chat_api import bus_error_response
from bus_gateway.client import BusClient, BusError
from schemas import ErrorBody

STATIC_DIR = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}
PAGE_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}


class BusSnapshot(BusView, kw_only=True):
    """`GET /bus.json`: the bus view, and the subject the page's "Show the request" names for raw NATS."""

    chat_subject: str


@functools.cache
def static_bytes(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


FRESH_FOR_S = 1.0  # a view this young is served again: however fast /bus.json is polled, one `$SRV` round a second


class BusMonitor:
    """Gathers `$SRV.INFO` and `$SRV.STATS` together and feeds a `BusSampler`. Callers that arrive while a gather
    is under way share its view, and so do those within `FRESH_FOR_S` of it: many open pages, or a client polling
    `/bus.json` in a loop (it is not rate-limited), cost the workers one `$SRV` round at a time and at most one a
    second."""

    def __init__(self, bus: BusClient) -> None:
        self.bus = bus
        self.sampler = BusSampler(subject_prefix=bus.subjects.prefix)  # the workers this bridge can ask
        self._gathering: asyncio.Future[BusView] | None = None
        self._last: tuple[float, BusView] | None = None

    async def view(self) -> BusView:
        if self._last is not None and time.monotonic() - self._last[0] < FRESH_FOR_S:
            return self._last[1]
        if self._gathering is None:
            self._gathering = asyncio.ensure_future(self._gather())
        return await asyncio.shield(self._gathering)  # one caller leaving does not cancel the others' gather

    async def _gather(self) -> BusView:
        try:
            infos, stats = await asyncio.gather(self.bus.info(), self.bus.stats())
            view = self.sampler.observe(infos, stats)
            self._last = (time.monotonic(), view)
            return view
        finally:
            self._gathering = None


def monitor_of(state: State) -> BusMonitor:
    monitor = state.get("bus_monitor")
    if monitor is None or monitor.bus is not state["bus"]:
        monitor = state["bus_monitor"] = BusMonitor(state["bus"])
    return monitor


def page_response() -> Response[bytes]:
    # Litestar adds "; charset=utf-8" to a text/ media type itself (given here too, the header said it twice)
    return Response(static_bytes("index.html"), media_type="text/html", headers=PAGE_HEADERS)


@get("/", include_in_schema=False, sync_to_thread=False)
def playground_page() -> Response[bytes]:
    return page_response()


@get("/bus", include_in_schema=False, sync_to_thread=False)
def bus_page() -> Response[bytes]:
    return page_response()


@get(
    "/bus.json",
    summary="Every worker on the bus and the bus totals, from $SRV.INFO and $SRV.STATS",
    description=(
        "One row per worker (host, pid, model, device, dtype, requests running and waiting, tokens/s over the "
        "interval since an earlier sample, uptime, draining, requests/errors/cancels) and the totals. "
        "`tokens_per_s` is null until two samples exist; `interval_s` is the span it covers."
    ),
    tags=["bus"],
    responses={
        401: ResponseSpec(
            ErrorBody, description="Missing or wrong API key (when keys are configured)", generate_examples=False
        ),
        503: ResponseSpec(ErrorBody, description="Not connected to NATS (see Retry-After)", generate_examples=False),
    },
)
async def bus_json(state: State) -> Response[BusSnapshot]:
    bus: BusClient = state["bus"]
    try:
        view = await monitor_of(state).view()
    except BusError as exc:
        return bus_error_response(exc)  # type: ignore[return-value]
    fields = {name: getattr(view, name) for name in view.__struct_fields__}
    snapshot = BusSnapshot(**fields, chat_subject=bus.subjects.chat)
    return Response(snapshot, headers={"Cache-Control": "no-store"})


class OfflineDocsPlugin(OpenAPIRenderPlugin):
    """`/docs`: a small bundled viewer of `/openapi.json` (the page's docs.html), in place of a CDN Swagger UI."""

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        return static_bytes("docs.html")


def docs_router(path: str) -> Router:
    """The router Litestar puts the `/docs` viewer (and its 404 page) on: with the page's headers, so the viewer
    cannot be framed either."""
    return Router(path=path, route_handlers=[], include_in_schema=False, response_headers=PAGE_HEADERS)


def with_security_headers(response: ASGIResponse) -> ASGIResponse:
    """The static files' `after_request` hook: the page's headers on every file (docs.html and index.html are
    pages too; the policy is harmless on scripts and styles)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def web_routes(key_guards: list[Guard]) -> list[ControllerRouterHandler]:
    """The page, its files, and `/bus.json` behind the API-key guards. Not behind the rate limit: the page polls
    `/bus.json` every 1.5 s, which would spend a key's whole budget for chats."""
    static = create_static_files_router(
        path="/static",
        directories=[STATIC_DIR],
        cache_control=CacheControlHeader(no_cache=True),
        name="web-static",
        after_request=with_security_headers,  # type: ignore[arg-type]
    )
    return [playground_page, bus_page, static, Router(path="/", route_handlers=[bus_json], guards=key_guards)]
