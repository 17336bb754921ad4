"""One reply inbox per client connection, shared by all its requests: `<inbox prefix>.<random>.<request id>`.

Every request a client sends gets the reply subject `<prefix>.<request id>`, so the client knows it and can name it
in a cancel (a worker matches a cancel on reply subject *and* request id, so one client can never cancel another's
request). One wildcard subscription serves every request, single answers and streams alike; answers for requests
nobody waits for any more (a late answer, a duplicate) are counted and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


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
        """Start receiving the answers to `request_id` (subscribes on first use)."""
        async with self._lock:
            if self._sub is None:
                self._sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._route)
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._waiting[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
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
