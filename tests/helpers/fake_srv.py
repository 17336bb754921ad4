"""Fake `llm-inference` workers for the tests of what reads `$SRV` (`llmbus status`, `/bus.json`, `/readyz`): they
answer PING, INFO and STATS on a real nats-server as a micro service does, with whatever a test puts in them (a
worker on another subject prefix, a hostile service, a draining worker). `FakeWorkers.asked` counts the requests
each verb got, so that a test can wait for them instead of sleeping."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from llmbus.connection import flushed
from schemas import SERVICE_NAME

VERBS = ("PING", "INFO", "STATS")


@dataclass
class FakeWorker:
    id: str
    metadata: dict[str, str]
    data: dict[str, Any] = field(default_factory=dict)  # its STATS endpoint `data` (running, waiting, draining...)

    def reply(self, verb: str) -> dict[str, Any]:
        reply: dict[str, Any] = {"name": SERVICE_NAME, "id": self.id, "version": "0.1.0", "metadata": self.metadata}
        if verb == "STATS":
            endpoint = {"name": "chat", "num_requests": 42, "num_errors": 1, "data": self.data}
            reply |= {"started": "2026-01-01T00:00:00Z", "endpoints": [endpoint]}
        return reply


@dataclass
class FakeWorkers:
    nc: NATS
    workers: list[FakeWorker]
    asked: Counter[str] = field(default_factory=Counter)
    _subs: list[Subscription] = field(default_factory=list)
    _asked: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> FakeWorkers:
        for verb in VERBS:
            self._subs.append(await self.nc.subscribe(f"$SRV.{verb}.{SERVICE_NAME}", cb=self._answer))
        await flushed(self.nc)
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        await flushed(self.nc)

    async def wait_asked(self, verb: str, times: int = 1) -> None:
        async with self._asked:
            await self._asked.wait_for(lambda: self.asked[verb] >= times)

    async def _answer(self, msg: Msg) -> None:
        verb = msg.subject.split(".")[1]
        for worker in self.workers:
            await msg.respond(json.dumps(worker.reply(verb)).encode())
        async with self._asked:
            self.asked[verb] += 1
            self._asked.notify_all()
