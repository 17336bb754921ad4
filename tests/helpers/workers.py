"""In-process workers: `run_worker` in the test's event loop (its engine in its own thread)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import nats

from helpers.tiny_model import tiny_model
from inference_worker.hardware import pick_threads
from inference_worker.model_loader import LoadedModel
from inference_worker.worker import Worker, run_worker
from llmbus.config import Config
from llmbus.connection import connect


@dataclass
class RunningWorker:
    config: Config
    stop: asyncio.Event
    task: asyncio.Task

    async def shutdown(self, timeout: float = 60) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)


async def start_worker(
    config: Config, loaded: LoadedModel, timeout: float = 120, *, compiled: bool = False
) -> RunningWorker:
    """Run a worker in this event loop and wait until it serves. It serves eagerly unless `compiled`: a compile in
    the test process holds the GIL for a minute or more (every tiny model is a new one to compile), and every test
    that talks to an in-process worker would wait on it. tests/test_engine_compiled.py tests the compiled worker.

    A worker left at `threads=0` (auto) gets one thread per core, fixed: auto sharing would count the other tests'
    workers on the same bus and change the count mid-test, and bf16 greedy near-ties flip with it (CI saw "a
    magnificent sight" become "a breathtaking sight" between two identical requests). tests/test_drain.py tests auto
    sharing with worker processes."""
    if not compiled:
        config = dataclasses.replace(config, compile=False)
    if config.threads == 0:
        config = dataclasses.replace(config, threads=pick_threads())
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_worker(config, stop, ready, loaded=loaded))
    ready_wait = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, ready_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready_wait.cancel()
        task.result()
    if ready_wait not in done:
        raise TimeoutError("worker did not become ready")
    return RunningWorker(config, stop, task)


@asynccontextmanager
async def tiny_worker(url: str, loaded: LoadedModel | None = None, **options: Any) -> AsyncIterator[Worker]:
    """A started in-process `Worker` (the tiny model unless `loaded`; one thread, so it never pings its peers to
    share cores; eager), for tests that reach its parts: its directory, its drain, its service. `options` are
    `Config` fields. Closed, with its own NATS connection, on exit (unless the test drained it)."""
    options = {"threads": 1, "compile": False, **options}
    worker = Worker(Config(nats_url=url, **options), await nats.connect(url), loaded or tiny_model())
    async with serving(worker):
        yield worker


@asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[Worker]:
    """Start `worker` (made by the caller, with its own NATS connection); on exit close it, unless the test drained
    it, and its connection."""
    await worker.start()
    try:
        yield worker
    finally:
        if not worker.draining:
            await worker.close()
        await worker.nc.close()


NEVER_STALE = 3600.0  # a view of the bus that does not expire during a test: only a departure or a probe changes it


@asynccontextmanager
async def model_worker(config: Config, name: str) -> AsyncIterator[Worker]:
    """An in-process worker of the tiny model served as `name`, whose view of the bus never expires (routing tests
    reach its directory and its drain)."""
    config = dataclasses.replace(config, served_model_name=name, max_tokens_cap=8, threads=1)
    running = Worker(config, await connect(config, f"test-{name}"), tiny_model())
    running.directory.ttl = NEVER_STALE
    async with serving(running):
        yield running


def endpoints_drained(worker: Worker) -> asyncio.Event:
    """Set once the worker left its queue groups in a drain: it stops accepting then, in the same step."""
    drained, drain_endpoints = asyncio.Event(), worker.service.drain_endpoints

    async def drain() -> None:
        await drain_endpoints()
        drained.set()

    worker.service.drain_endpoints = drain  # type: ignore[method-assign]
    return drained
