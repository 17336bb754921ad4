"""In-process durable workers on the tiny random model, and hooks that let a test await what a worker's job consumer
does (jobs taken, a wait for capacity) instead of sampling it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import nats

from helpers.tiny_model import tiny_model
from inference_worker.durable import Job
from inference_worker.model_loader import LoadedModel
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer


async def durable_worker(
    server: NatsServer,
    loaded: LoadedModel | None = None,
    *,
    wall_clock: Callable[[], float] = time.time,
    durable: bool = True,
    **config_options: object,
) -> Worker:
    """A started worker of `loaded` (the tiny model by default) with `--durable` and `config_options`."""
    config = Config(nats_url=server.url, durable=durable, compile=False, **config_options)  # type: ignore[arg-type]
    worker = Worker(config, await nats.connect(server.url), loaded or tiny_model(), wall_clock=wall_clock)
    await worker.start()
    return worker


async def stop(worker: Worker) -> None:
    """A clean shutdown: what the worker still holds is failed with 503 shutting_down."""
    await worker.close()
    await worker.nc.close()


class JobWatch:
    """Counts the jobs a worker takes (`taken`, `took(n)`) and sets `waiting` when its consumer waits for capacity."""

    def __init__(self, worker: Worker) -> None:
        self.taken: list[Job] = []
        self.waiting = asyncio.Event()
        self._counts: dict[int, asyncio.Event] = {}
        self._run_job, self._wait = worker.run_job, worker.wait_for_capacity
        worker.run_job, worker.wait_for_capacity = self._running, self._waiting  # type: ignore[method-assign]

    def took(self, count: int) -> asyncio.Event:
        """Set once `count` jobs were taken (each handed to its handler)."""
        event = self._counts.setdefault(count, asyncio.Event())
        if len(self.taken) >= count:
            event.set()
        return event

    async def _running(self, job: Job) -> None:
        await self._run_job(job)
        self.taken.append(job)
        for count, event in self._counts.items():
            if len(self.taken) >= count:
                event.set()

    async def _waiting(self) -> None:
        self.waiting.set()
        await self._wait()
