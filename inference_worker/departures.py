"""A worker leaving the bus says so on `llm.worker.left`, so that its peers stop forwarding requests for its model.

A request on `llm.chat` for another model is forwarded to that model's subject with the client's reply subject
(`routing`). When nobody serves that subject any more, NATS drops the message without a word: its no-responders
status goes only to a publisher that holds the reply subscription itself, which a forwarding worker does not. So a
request forwarded on a view of the bus that still lists a model whose last worker just left would wait out its
timeout. A worker that drains (or whose engine died) publishes a `WorkerLeft` once it has left its queue groups; a
peer that hears it looks at the bus again before it routes the next request for that model (`ModelDirectory.forget`):
a model with workers left is forwarded as before, one with none is a 404 that lists the models still served. Requests
for other models are routed as before, without a look. A departure of a model the peer's view does not list is
ignored, and departures never make looks more frequent than `routing.MIN_REFRESH_S`: whoever may publish on
`llm.worker.left` cannot make every request wait for a look at the bus.

A worker that dies without a word (killed, its host lost) cannot say so: its peers' view lists its model until it
expires (`routing.TTL_S`). A peer probes a model's subject before it forwards a request there (`forward_probe`): when
the server says nobody serves it, the client gets a 503 at once and the peer forgets the model as a departure would
make it. A worker whose connection the server still holds (a host lost without closing it) passes the probe, and a
request forwarded to it waits for its timeout, as a request does whose worker dies while answering it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from llmbus.connection import flushed
from schemas import Subjects
from schemas.messages import WorkerLeft

log = logging.getLogger("llmbus.worker")


class Departures:
    """This worker's side of `llm.worker.left`: it hears its peers leave, and says when it leaves (once)."""

    def __init__(
        self, nc: NATS, subjects: Subjects, model: str, service_id: str, on_left: Callable[[str], None]
    ) -> None:
        self.nc = nc
        self.subject = subjects.worker_left
        self.own = WorkerLeft(model=model, id=service_id)
        self.on_left = on_left
        self.announced = False
        self._sub: Subscription | None = None

    async def watch(self) -> None:
        self._sub = await self.nc.subscribe(self.subject, cb=self._heard)

    async def _heard(self, msg: Msg) -> None:
        try:
            left = msgspec.json.decode(msg.data, type=WorkerLeft)
        except msgspec.DecodeError:
            log.debug("ignoring an undecodable message on %s", self.subject)
            return
        if left.id != self.own.id:
            self.on_left(left.model)

    async def announce(self) -> None:
        """Say that this worker left (after it left its queue groups and discovery, so that a peer's next look at
        the bus no longer finds it). At most once; a lost connection loses the message, as it would any other."""
        if self.announced:
            return
        self.announced = True
        with contextlib.suppress(Exception):
            await self.nc.publish(self.subject, msgspec.json.encode(self.own))
            await flushed(self.nc)  # the server has it before this worker goes on to close its connection

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
