"""One reply inbox per client connection, shared by all its requests: `<inbox prefix>.<random>.<request id>`.

Every request a client sends gets the reply subject `<prefix>.<request id>`, so the client knows it and can name it
in a cancel (a worker matches a cancel on reply subject *and* request id, so one client can never cancel another's
request). One wildcard subscription serves every request, single answers and streams alike; answers for requests
nobody waits for any more (a late answer, a duplicate) are counted and dropped.

`open` is the claim of a request id on this client: an id already open is refused (409 `duplicate_request`), never
replaced, so a second request with the same id can never take the answers of the first. Only the claim's owner
calls `close`.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus_gateway.bus_errors import BusError


def in_flight(request_id: str) -> BusError:
    """The 409 for a request id that this client already has in flight."""
    return BusError(409, f"request id {request_id!r} is already in flight", name="duplicate_request")


class ReplyInbox:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self.unclaimed = 0
        self._waiting: dict[str, asyncio.Queue[Msg]] = {}
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()

    def reply_subject(self, request_id: str) -> str:
        return f"{self.prefix}.{request_id}"

    def is_open(self, request_id: str) -> bool:
        return request_id in self._waiting

    async def open(self, request_id: str) -> asyncio.Queue[Msg]:
        """Claim `request_id` and start receiving its answers (subscribes on first use). An id already open raises
        `in_flight` (409) and leaves the open one as it is. The check and the registration run with no await between
        them, so of two concurrent opens of one id exactly one succeeds."""
        async with self._lock:
            if self._sub is None:
                self._sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._route)
        if request_id in self._waiting:
            raise in_flight(request_id)
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._waiting[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        """Release the claim of `request_id`: only the caller whose `open` succeeded calls this."""
        self._waiting.pop(request_id, None)

    async def stop(self) -> None:
        self._waiting.clear()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def _route(self, msg: Msg) -> None:
        queue = self._waiting.get(msg.subject[len(self.prefix) + 1 :])
        if queue is None:
            if msg.data or msg.headers:  # an empty message is a stream's sentinel, not an answer
                self.unclaimed += 1
        else:
            queue.put_nowait(msg)
