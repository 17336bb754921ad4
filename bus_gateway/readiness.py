"""`GET /readyz`: the bridge is ready when at least one inference worker on its subject prefix answers `$SRV.PING`
(another prefix is another bus that shares the NATS server).

Probes need it without a key, so it is never behind the API keys; with keys configured it says how many workers
answer but not which models they serve (`/v1/models`, behind the keys, does). Each look broadcasts `$SRV.PING` to
every worker, so probes share looks: the probes that arrive while one look runs all wait for it, and a "ready"
answer is reused for `READY_FOR_S` seconds. A "not ready" answer is not reused: the next probe looks again, so the
bridge is ready as soon as a worker answers (and with no worker at all, a look ends at once: no responders).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Response, get
from litestar.datastructures import State

from bus_gateway.client import BusClient
from bus_gateway.discovery import on_prefix, prefix_of
from bus_gateway.http_errors import retry_headers
from schemas.errors import ERRORS

READY_PING_WINDOW = 0.5
READY_FOR_S = 1.0  # how long a "ready" answer stands for the probes that follow


class ReadyBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: str
    workers: int
    models: list[str] = []
    error: str | None = None


class Readiness:
    """The workers on the bridge's prefix that answer `$SRV.PING`, from one look shared by the probes that wait at
    once, and reused for `READY_FOR_S` seconds while some answered. `show_models`: false with API keys configured."""

    def __init__(self, bus: BusClient, *, show_models: bool) -> None:
        self.bus = bus
        self.show_models = show_models
        self._ready: tuple[float, list[dict[str, Any]], list[dict[str, Any]]] | None = None  # (when, replies, all)
        self._looking: asyncio.Future[tuple[list[dict[str, Any]], list[dict[str, Any]]]] | None = None

    async def look(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The replies of the workers on this prefix, and every `$SRV.PING` reply."""
        now = asyncio.get_running_loop().time()
        if self._ready is not None and now - self._ready[0] <= READY_FOR_S:
            return self._ready[1], self._ready[2]
        if self._looking is None:
            self._looking = asyncio.ensure_future(self._ping())
        return await asyncio.shield(self._looking)

    async def _ping(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        try:
            answers = await self.bus.ping(READY_PING_WINDOW)
        finally:
            self._looking = None
        replies = [reply for reply in answers if on_prefix(prefix_of(reply), self.bus.subjects.prefix)]
        self._ready = (asyncio.get_running_loop().time(), replies, answers) if replies else None
        return replies, answers


@get("/readyz", summary="At least one inference worker on this subject prefix answers $SRV.PING", tags=["health"])
async def readyz(state: State) -> Response[ReadyBody]:
    bus: BusClient = state["bus"]
    if not bus.connected:
        body = ReadyBody(status="not ready", workers=0, error="not connected to NATS")
        return Response(body, status_code=503, headers=retry_headers(ERRORS["not_connected"]))
    readiness: Readiness = state["readiness"]
    replies, answers = await readiness.look()
    if not replies:
        error = f"no inference worker answers $SRV.PING.{bus.service_name}"
        if answers:
            error = f"no inference worker on subject prefix {bus.subjects.prefix} answers $SRV.PING.{bus.service_name}"
        return Response(
            ReadyBody(status="not ready", workers=0, error=error),
            status_code=503,
            headers=retry_headers(ERRORS["not_connected"]),
        )
    if not readiness.show_models:
        return Response(ReadyBody(status="ready", workers=len(replies)))  # the models are for key holders only
    names = {metadata.get("model") for reply in replies if isinstance(metadata := reply.get("metadata"), dict)}
    models = sorted(name for name in names if isinstance(name, str) and name)
    return Response(ReadyBody(status="ready", workers=len(replies), models=models))
