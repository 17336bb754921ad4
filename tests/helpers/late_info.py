"""Real in-process workers of the tiny model whose `$SRV.INFO` reply can be made late, and a counter of the `$SRV`
requests a bridge sends, for the tests of what acts on discovery (the bridge's model catalog and `/readyz`)."""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from inference_worker.worker import Worker
from llmbus.connection import flushed
from schemas import SERVICE_NAME


class LateInfo:
    """Makes a started worker answer `$SRV.INFO` `delay` seconds after each request (a worker across a NATS gateway,
    or with a busy event loop); every other subject it serves as before. Each request is answered on its own task,
    so concurrent looks are each answered `delay` late, not one after another."""

    def __init__(self, worker: Worker, delay: float) -> None:
        assert worker.service is not None, "start the worker first"
        self.worker = worker
        self.service = worker.service
        self.delay = delay
        self._answering: set[asyncio.Task[None]] = set()

    async def start(self) -> LateInfo:
        await self.service.leave_discovery(("INFO",))
        for subject in ("$SRV.INFO", f"$SRV.INFO.{SERVICE_NAME}", f"$SRV.INFO.{SERVICE_NAME}.{self.service.id}"):
            await self.worker.nc.subscribe(subject, cb=self._asked)
        await flushed(self.worker.nc)
        return self

    async def _asked(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, msg: Msg) -> None:
        await asyncio.sleep(self.delay)  # the fault itself: the reply comes this late
        reply = {"name": SERVICE_NAME, "id": self.service.id, "version": self.service.version}
        await msg.respond(json.dumps(reply | {"metadata": self.service.metadata}).encode())


class Asked:
    """Counts the requests published on one subject (a plain subscriber on the real server)."""

    def __init__(self, nc: NATS, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self._sub: Subscription | None = None

    async def start(self) -> Asked:
        self._sub = await self.nc.subscribe(self.subject)
        await flushed(self.nc)
        return self

    async def settled(self) -> int:
        """How many arrived, once the server delivered what it had routed here: a round trip on this connection
        (each message is counted as it is read, before the PONG that ends the round trip)."""
        assert self._sub is not None, "start it first"
        await flushed(self.nc)
        return self._sub.delivered
