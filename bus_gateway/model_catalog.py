"""The bridge's view of the models the workers serve (`$SRV.INFO` metadata `model`), for the OpenAI API and the
durable check of `/chat`.

A worker may answer `$SRV.INFO` late (a busy event loop, a NATS gateway between clusters), and a quick look, which
stops soon after the last reply, misses it. Acting on a worker's absence needs a thorough look (the whole discovery
window; `bus_gateway.discovery`), so every look the catalog takes is thorough:
- a request naming a model in the view goes on at once; the view is refreshed in the background once older than
  `ttl`, so no request waits on a look it does not need;
- a model not in the view is refused (404) only after a thorough look that ended after the request began waiting.
  Requests waiting at once share one look: the one in flight, or one that ended while they waited;
- `GET /v1/models` lists the view while it is younger than `ttl` (polling costs no look), and a fresh look after
  that. An empty view is never reused: with no worker at all a look ends at once (no responders), and the first
  worker to start is listed as soon as it answers.
"""

from __future__ import annotations

import asyncio
import time

from bus_gateway.bus_errors import BusError
from bus_gateway.client import BusClient
from bus_gateway.discovery import BusModels
from bus_gateway.openai_translate import ApiFailure, from_bus_error
from bus_gateway.openai_types import ModelCard

CATALOG_TTL = 10.0


class ModelCatalog:
    """The models the workers serve, with how many workers serve each, from thorough `$SRV.INFO` looks."""

    def __init__(self, bus: BusClient, ttl: float = CATALOG_TTL) -> None:
        self.bus = bus
        self.ttl = ttl
        self.first_seen: dict[str, int] = {}
        self._models = BusModels()
        self._fetched_at: float | None = None  # when the look that gave `_models` ended (event-loop time)
        self._gathering: asyncio.Future[BusModels] | None = None

    @staticmethod
    def now() -> float:
        """The catalog's clock (event-loop time): what a caller passes to `looked_since`."""
        return asyncio.get_running_loop().time()

    async def models(self) -> BusModels:
        """The view: the first call waits for a look; a view older than `ttl` is answered while a look runs in the
        background."""
        if self._fetched_at is None:
            return await asyncio.shield(self._gather())
        if self.now() - self._fetched_at > self.ttl:
            self._gather()
        return self._models

    async def looked_since(self, since: float) -> BusModels:
        """The view from a thorough look that ended at or after `since` (when the caller began waiting): the last
        one if it did, else the one in flight, else a new one."""
        if self._fetched_at is not None and self._fetched_at >= since:
            return self._models
        return await asyncio.shield(self._gather())

    async def names(self, *, fresh: bool = False) -> list[str]:
        """The served model names; `fresh`: from a look that ended after this call began."""
        models = await self.looked_since(self.now()) if fresh else await self.models()
        return sorted(models.workers)

    async def listing(self) -> list[str]:
        """The names `GET /v1/models` lists: the view while it is younger than `ttl` and not empty, else a fresh
        look's."""
        if self._fetched_at is not None and self._models.workers and self.now() - self._fetched_at <= self.ttl:
            return sorted(self._models.workers)
        return await self.names(fresh=True)

    def card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.first_seen.get(name, 0), workers=self._models.workers.get(name, 0))

    async def resolve(self, model: str) -> str | ApiFailure:
        """`model` when a worker serves it; 404 when none does after a thorough look that ended after this call
        began, 503 when no worker answers at all."""
        since = self.now()
        try:
            if model in (await self.models()).workers:
                return model
            served = sorted((await self.looked_since(since)).workers)
        except BusError as exc:
            return from_bus_error(exc)
        if model in served:
            return model
        if not served:
            return ApiFailure(
                503, "no inference worker is on the bus (none answers $SRV.INFO)", "server_error", None, "no_responders"
            )
        return ApiFailure(
            404,
            f"The model `{model}` does not exist or is not served here; served: {', '.join(served)}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    def _gather(self) -> asyncio.Future[BusModels]:
        """The look in flight, or a new one."""
        if self._gathering is None:
            self._gathering = asyncio.ensure_future(self._fetch())
            self._gathering.add_done_callback(_seen)
        return self._gathering

    async def _fetch(self) -> BusModels:
        try:
            models = await self.bus.bus_models(thorough=True)
        finally:
            self._gathering = None
        self._models, self._fetched_at = models, self.now()
        for name in models.workers:
            self.first_seen.setdefault(name, int(time.time()))
        return models


def _seen(gathering: asyncio.Future[BusModels]) -> None:
    """A look whose callers all went away (or a background one) does not log its failure as never retrieved: the
    next caller that needs the catalog looks again and gets the error itself."""
    if not gathering.cancelled():
        gathering.exception()
