"""The requests a worker holds, keyed by who asked: (reply subject, request id).

A request id is chosen by the client, so two clients may pick the same one (`my-req-1`). Keying by the reply
subject as well means one client's id can never touch another client's request: a cancel names both, and with
private inboxes a client cannot learn another client's reply subject. The engine sees only `engine_id`, a name
this worker makes up.

A cancel can overtake its request (chat and cancel arrive on different subscriptions). A cancel for a request
this worker does not hold leaves a short-lived tombstone, so the request is dropped if it arrives later.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from schemas import WireError

Key = tuple[str, str]  # (reply subject, request id)

# What became of an answer (`Replier.respond` / `respond_error`): only `published` reached the client. A durable job
# may instead be `requeued` (stored again by a stopping worker) or `redelivered` (nak'd for another delivery): another
# worker answers it. `abandoned`: its publish failed; `settled`: a durable job answered before, nothing sent now.
Outcome = Literal["published", "requeued", "redelivered", "abandoned", "settled"]
PUBLISHED: Outcome = "published"
REQUEUED: Outcome = "requeued"
REDELIVERED: Outcome = "redelivered"
ABANDONED: Outcome = "abandoned"
SETTLED: Outcome = "settled"

TOMBSTONE_TTL_S = 60.0
MAX_TOMBSTONES = 10_000


class Replier(Protocol):
    """A request and where its answers go: a micro `Request` (core request-reply) or a durable `Job`. `respond` and
    `respond_error` return the answer's `Outcome`; None (a micro `Request`) means published, and a failed publish
    raises."""

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> dict[str, str] | None: ...

    @property
    def reply(self) -> str: ...

    async def respond(
        self, data: bytes = b"", headers: dict[str, str] | None = None, *, final: bool = True
    ) -> Outcome | None: ...

    async def respond_error(
        self, error: WireError, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> Outcome | None: ...

    async def forward(self, subject: str) -> None: ...


@dataclass(eq=False)
class Held:
    """One request the engine holds, and how to answer it."""

    replier: Replier
    key: Key
    engine_id: str
    kind: str
    chat_id: str
    stream: bool = False
    chunks_sent: int = 0
    received: float = field(default_factory=time.monotonic)

    @property
    def request_id(self) -> str:
        return self.key[1]


class HeldRequests:
    def __init__(self, tombstone_ttl: float = TOMBSTONE_TTL_S, max_tombstones: int = MAX_TOMBSTONES) -> None:
        self.tombstone_ttl = tombstone_ttl
        self.max_tombstones = max_tombstones
        self._by_engine_id: dict[str, Held] = {}
        self._by_key: dict[Key, Held] = {}
        self._tombstones: OrderedDict[Key, float] = OrderedDict()
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_engine_id)

    def __iter__(self) -> Iterator[Held]:
        return iter(list(self._by_engine_id.values()))

    def new_engine_id(self) -> str:
        return f"r{next(self._ids)}"

    def holds(self, key: Key) -> bool:
        return key in self._by_key

    def hold(self, held: Held) -> None:
        self._by_engine_id[held.engine_id] = held
        self._by_key[held.key] = held

    def get(self, engine_id: str) -> Held | None:
        return self._by_engine_id.get(engine_id)

    def release(self, engine_id: str) -> Held | None:
        held = self._by_engine_id.pop(engine_id, None)
        if held is not None:
            del self._by_key[held.key]
        return held

    def find(self, key: Key) -> Held | None:
        return self._by_key.get(key)

    def bury(self, key: Key, now: float | None = None) -> None:
        """Remember that `key` was cancelled before this worker saw it."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        self._tombstones[key] = now + self.tombstone_ttl
        self._tombstones.move_to_end(key)
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)

    def was_cancelled(self, key: Key, now: float | None = None) -> bool:
        """True (once) when a cancel for `key` arrived before the request itself."""
        self._expire(time.monotonic() if now is None else now)
        return self._tombstones.pop(key, None) is not None

    def _expire(self, now: float) -> None:
        while self._tombstones and next(iter(self._tombstones.values())) <= now:
            self._tombstones.popitem(last=False)
