"""Which model answers a request, when several models share one bus.

Every worker also serves the model-less subjects (`llm.chat`, `llm.chat.batched`), so a request there may name any
model, or none. `route` decides: this worker's own model is served here; another model is forwarded to that model's
subject (with the client's reply subject, so the answer comes straight from a worker of that model); a model nobody
serves is a 404 that lists the models on the bus.

A request that names no model gets the bus's default model: the model whose workers run with `--default-model`, or,
when none does, the only model on the bus. With several models and no default, it is a 400 that lists them.

The models on the bus come from `$SRV.INFO` (metadata `model` and `default_model`), gathered at most every `ttl`
seconds, and again at once (at most every `min_refresh` seconds) when a request names a model not seen yet. A quick
look stops soon after the last reply, so it may miss a slow worker; what a missing worker could change is looked at
again thoroughly (the whole discovery window) before it is acted on:
- a request that cannot be routed (a model not seen, no default) is refused only after a thorough look;
- a request that names no model is served here as "the only model on the bus" only when a thorough look saw no
  other model and no default (the default's reply may be the late one), never on a quick look alone.
A durable job outlives a restart of its model's workers, so routing remembers the last default model seen whose
workers take durable jobs (`durable_default`): while no default is on the bus, a model-less durable job waits in that
model's job queue rather than going to "the only model" left (`job_intake`).
Requests that wait for a thorough look share it: a thorough look that ended after a request began waiting for its
route (it was running, or waited for, meanwhile) answers for that request too, so N unknown names (a batch's, asked
about at once, or N requests waiting together) cost one look, not N one after another.

A worker heard leaving (`departures`, `ModelDirectory.forget`) makes its model suspect: the view may list it while
nobody serves it any more, so a request routed to it waits for a look at the bus first; a request for any other model
is routed on the view held, as before. A departure of a model the view does not list changes nothing it knows and is
ignored (unless a look is under way, which may find it). Anyone who may publish on `llm.worker.left` could claim
departures, so they never make looks more frequent than `min_refresh`: a request for a suspect model waits out what is
left of it since the last look ended (at most `min_refresh`), then takes the look.

A worker killed without a word cannot be heard leaving: a request forwarded to its model is probed first
(`forward_probe`), and when the server says nobody serves that model's subject any more, the client gets a 503 at once
and the model is forgotten as a departure would make it (`forget`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bus_gateway.bus_errors import not_served
from bus_gateway.discovery import BusModels
from schemas import WireError

Gather = Callable[[bool], Awaitable[BusModels]]  # thorough: wait the whole window for slow workers

TTL_S = 5.0
MIN_REFRESH_S = 0.5
TRUST_QUICK_S = 60.0  # how long a quick look that matches the last thorough one (no default, same models) is trusted


@dataclass(frozen=True, slots=True)
class Local:
    """Serve it here."""


@dataclass(frozen=True, slots=True)
class Forward:
    model: str


Route = Local | Forward | WireError


def default_model(models: BusModels) -> str | WireError:
    if len(models.defaults) == 1:
        return next(iter(models.defaults))
    if len(models.defaults) > 1:
        return WireError.of(
            "bad_request",
            f"several models claim to be the default ({', '.join(sorted(models.defaults))}): name one in `model`",
        )
    if len(models.workers) == 1:
        return next(iter(models.workers))
    return WireError.of(
        "bad_request",
        f"this bus serves several models and none is the default: name one in `model` ({models.listing()})",
    )


def route(requested: str | None, own: str, models: BusModels) -> Route:
    """Where a request on a model-less subject goes (pure: `models` is what discovery saw)."""
    if requested is None:
        chosen = default_model(models)
        if isinstance(chosen, WireError):
            return chosen
        requested = chosen
    if requested == own:
        return Local()
    if requested in models.workers:
        return Forward(requested)
    return WireError.of("model_not_found", not_served(requested, models.listing()))


class ModelDirectory:
    """`BusModels` from `$SRV.INFO`, refreshed every `ttl` seconds and on a miss."""

    def __init__(
        self, gather: Gather, own: str, own_is_default: bool, ttl: float = TTL_S, min_refresh: float = MIN_REFRESH_S
    ) -> None:
        self.gather = gather
        self.own = own
        self.own_is_default = own_is_default
        self.ttl = ttl
        self.min_refresh = min_refresh
        self.models = self._with_own(BusModels())
        self._fetched_at = float("-inf")  # when the look that gave `models` ended
        self._last_thorough: tuple[float, BusModels] | None = None  # when the last whole-window look ended, what it saw
        self._departures = 0  # departures heard (`forget`), numbered in order
        self._suspects: dict[str, int] = {}  # model -> the departure that made it suspect (a later look clears it)
        self._looking = False  # a look is under way: it may find a model the view held does not list
        self._unseen = 0  # the last departure of such a model heard during the look under way (0: none)
        self._lock = asyncio.Lock()
        self.durable_default: str | None = None  # the last default seen whose workers take durable jobs

    async def current(self, wanted: str | None = None) -> BusModels:
        """The models on the bus; refreshed when stale, or when `wanted` is not among them, or (after what is left of
        `min_refresh`) when `wanted` (None: the default) is suspect: a worker of it was heard leaving since the last
        look began."""
        if self._suspect(wanted):
            await self._look_again(wanted)
        elif self._stale() or (wanted is not None and wanted not in self.models.workers):
            await self.refresh()
        return self.models

    def _suspect(self, wanted: str | None) -> bool:
        """Whether a request for `wanted` (None: the default) goes to a model a worker of which was heard leaving."""
        if wanted is None:
            chosen = default_model(self.models)
            wanted = chosen if isinstance(chosen, str) else None
        return wanted in self._suspects

    async def _look_again(self, wanted: str | None) -> None:
        """A look at the bus for a suspect model, no sooner than `min_refresh` after the last one ended (departures
        may be claimed by anyone who may publish them: they never make looks more frequent). Requests waiting
        together share it; one that ended meanwhile and cleared `wanted` answers for it."""
        async with self._lock:
            if not self._suspect(wanted):
                return
            await asyncio.sleep(self._fetched_at + self.min_refresh - time.monotonic())
            if self._suspect(wanted):
                await self._look(thorough=False)

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched_at > self.ttl

    async def refresh(self, thorough: bool = False, since: float | None = None) -> BusModels:
        """Ask the bus again, unless that was done less than `min_refresh` seconds ago. A thorough look is taken
        unless one ended after `since` (the caller began waiting: by default, this call): one that ended while the
        caller waited answers for it too."""
        asked = time.monotonic() if since is None else since
        async with self._lock:
            if thorough and self._thorough() and self._fetched_at >= asked:
                return self.models
            if thorough or time.monotonic() - self._fetched_at > self.min_refresh:
                await self._look(thorough)
        return self.models

    async def _look(self, thorough: bool) -> None:
        """Ask the bus (under `_lock`). It clears the suspicions heard before it began; a departure heard while it
        ran keeps its model suspect, the look may have seen the worker that left. A departure heard meanwhile of a
        model the view did not list makes the models this look found for the first time suspect (not remembered by
        name: anyone may claim any number of names)."""
        began, before = self._departures, set(self.models.workers)
        self._looking = True
        try:
            models = self._with_own(await self.gather(thorough))
        finally:
            self._looking, unseen, self._unseen = False, self._unseen, 0
        heard = self._suspects | (dict.fromkeys(models.workers.keys() - before, unseen) if unseen else {})
        self.models, self._fetched_at = models, time.monotonic()
        self._suspects = {m: n for m, n in heard.items() if n > began and m in models.workers and m != self.own}
        self._remember_default(self.models)
        if thorough:
            self._last_thorough = (self._fetched_at, self.models)

    def _remember_default(self, models: BusModels) -> None:
        """Remember the one default on the bus when its workers take durable jobs; forget it once a look sees its
        workers serve it as a default no more (the operator moved the default elsewhere)."""
        if len(models.defaults) == 1 and (default := next(iter(models.defaults))) in models.durable:
            self.durable_default = default
        elif self.durable_default in models.workers and self.durable_default not in models.defaults:
            self.durable_default = None

    def absent_default(self) -> str | None:
        """The durable default remembered, while the view held has no default at all (its workers restart)."""
        return None if self.models.defaults else self.durable_default

    def forget(self, model: str) -> None:
        """A worker of `model` left the bus (`departures`): the view held may list a model nobody serves any more,
        so the next request for it looks at the bus again before it is routed (`current`). A model the view does
        not list is none of its business, unless a look is under way (it may find a worker that has left since);
        this worker's own model is served here whatever its peers do."""
        if model == self.own:
            return
        if model in self.models.workers:
            self._departures += 1
            self._suspects[model] = self._departures
        elif self._looking:
            self._departures += 1
            self._unseen = self._departures

    def _thorough(self) -> bool:
        """Whether the view held came from a whole-window look."""
        return self._last_thorough is not None and self._last_thorough[1] is self.models

    def listing(self) -> str:
        """The models this view lists, as an unknown model's error names them."""
        return self.models.listing()

    async def knows(self, model: str) -> bool:
        """Whether a worker on the bus serves `model` (after a thorough look when it is not known yet)."""
        since = time.monotonic()
        if model in (await self.current(model)).workers:
            return True
        return model in (await self.refresh(thorough=True, since=since)).workers

    def known_route(self, requested: str | None) -> Route | None:
        """`route` on the view this worker holds, when it is fresh and routes the request for sure; None when the
        request needs a look at the bus first (a model not seen yet, a stale view, no route yet, a model a worker of
        which was heard leaving, or "the only model on the bus" seen by a quick look only)."""
        if self._stale() or not self._sure(requested):
            return None
        where = route(requested, self.own, self.models)
        if isinstance(where, WireError) or (isinstance(where, Forward) and where.model in self._suspects):
            return None
        return where

    async def route(self, requested: str | None) -> Route:
        """`route` on what the bus looks like now; a request that cannot be routed is looked at again after a
        thorough look at the bus (a model or a default that just arrived, or answers slowly), before it is refused.
        A request that names no model, on a view with no default, takes the thorough look at once."""
        if (where := self.known_route(requested)) is not None:
            return where
        since = time.monotonic()
        if requested is not None or self.models.defaults:
            where = route(requested, self.own, await self.current(requested))
            if not isinstance(where, WireError) and self._sure(requested):
                return where
        return route(requested, self.own, await self.refresh(thorough=True, since=since))

    def _sure(self, requested: str | None) -> bool:
        """Whether `route` on the view held can be trusted for `requested`: always, except a request that names no
        model on a view without a default, which a quick look may have left with no other model than this
        worker's (the default's INFO reply came after the look stopped). A quick look that sees just what the last
        thorough one saw, with no default either time, is trusted for `TRUST_QUICK_S`: a worker alone on the bus
        takes a thorough look a minute, not one every `ttl` seconds."""
        if requested is not None or self.models.defaults or self._thorough():
            return True
        if self._last_thorough is None:
            return False
        ended, seen = self._last_thorough
        recent = time.monotonic() - ended < TRUST_QUICK_S
        return recent and not seen.defaults and seen.workers.keys() == self.models.workers.keys()

    def _with_own(self, models: BusModels) -> BusModels:
        """This worker counts even when discovery missed it (it no longer answers INFO while draining)."""
        models.workers.setdefault(self.own, 1)
        if self.own_is_default:
            models.defaults.add(self.own)
        return models
