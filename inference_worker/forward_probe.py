"""The forward of a chat to another model's workers, after a probe that asks the NATS server whether anyone serves
that model's subject.

A worker forwards a request on `llm.chat` for another model to that model's subject with the CLIENT's reply subject
(`Forwarding._forward`, `micro.Request.forward`), so the answer goes straight to the client. When nobody subscribes to
that subject, nats-server drops the message, and its no-responders status (`Status: 503`) goes only to the
publisher's own connection, and only for a reply subject that connection subscribes to: neither the client (it owns
the reply subject but did not publish) nor the forwarding worker (it published but does not hold the reply
subscription) hears of it, and the client waits out its whole timeout. The routing view lists a model until a
worker of it says it left (`departures`) or the view expires (`routing.TTL_S`): a worker that died without a word
(killed, its connection dropped) leaves that window open.

So before it forwards a core request, the worker sends a probe to the same subject: an empty message with the
header `Llmbus-Probe` (`schemas.subjects.PROBE`) and a reply subject in its own inbox that it subscribes to, then
waits for two PING/PONGs (`llmbus.connection.flushed`: one flush may overtake the queued commands). The server
handles one connection's commands in order (the SUB, the probe, the PINGs): when nobody serves the subject, its 503
is queued to this connection ahead of the PONG. nats-py reads them in that order, and a `subscribe(future=...)`
subscription gets its message while it is read (not later, in a callback task), so the 503 is there once the flush
returns. Then nobody serves the model: the client gets a 503 `no_responders` that names it, at once, and the view
forgets the model (`ModelDirectory.forget`): the next request for it takes a look at the bus first (a 404 that lists
the models, once the look no longer finds it). No 503: a worker of the model took the probe (it drops it,
unanswered and uncounted: `micro`), and the request is forwarded as before. A worker of an older llmbus answers a
probe with a 400 (its body is empty): not a 503 either, so the request is forwarded.

Cost: one more round trip to the server (two PINGs, written with the probe's SUB, PUB and UNSUB) per forwarded core
request, taken in a task of its own (`intake`), never in the subscription's callback. Requests served here, requests
sent straight to a model's subject (as `BusClient` sends those that name a model: their publisher gets the 503
itself) and durable jobs (forwarded into JetStream, where they wait in their model's queue by design) pay nothing.
A probe that fails (no connection, no PONG within `PROBE_TIMEOUT_S`) forwards anyway, as before.

What a probe cannot see: a worker whose connection the server still holds (its host vanished without closing the
TCP connection: the server drops it after missed PINGs), a worker that took the probe and dies before the request
arrives, and in a cluster, interest the local server still believes a remote server has. Those requests wait for
their timeout, as before.

Why this design rather than:
- forwarding with this worker's own inbox and relaying the answers: every forwarded answer would take one more hop
  through this worker, and a stream would depend on this worker staying up;
- a probe that a live worker answers: a round trip through a worker that may be busy, and a timeout to tell a dead
  model from a slow worker;
- sending the probe and the request together and looking afterwards: a worker that subscribed between the two would
  answer a client that also got the 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from llmbus.connection import flushed
from schemas import WireError
from schemas.subjects import PROBE, is_no_responders

log = logging.getLogger("llmbus.worker")

PROBE_TIMEOUT_S = 2.0  # per PING of the probe's round trip; past it the request is forwarded unprobed
PROBE_HEADERS = {PROBE: "1"}


def nobody_serves(model: str) -> WireError:
    """The answer to a request forwarded to `model` when the server said nobody serves its subject."""
    message = (
        f"no worker serves the model `{model}` any more (its workers left the bus): retry shortly, or name another"
        " model"
    )
    return WireError.of("no_responders", message)


class ForwardProbe:
    """Asks the server, with one probe message, whether anyone subscribes to a subject."""

    def __init__(self, nc: NATS, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.nc = nc
        self.timeout = timeout

    async def served(self, subject: str) -> bool:
        """False only when the server answered the probe with its no-responders status: nobody subscribes to
        `subject`. True when a subscriber took it, and when the probe could not tell (then forwarding is what it
        was without the probe)."""
        if not self.nc.is_connected:
            return True
        answer: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        try:
            sub = await self.nc.subscribe(self.nc.new_inbox(), future=answer, max_msgs=1)  # a 2nd is dropped unread
            try:
                await self.nc.publish(subject, b"", reply=sub.subject, headers=PROBE_HEADERS)
                await flushed(self.nc, self.timeout)
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        except nats.errors.Error as exc:
            log.debug("the probe of %s failed (%r): forwarding without it", subject, exc)
            return True
        return not (answer.done() and is_no_responders(answer.result().headers))
