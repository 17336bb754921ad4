"""Shared fixtures: a real nats-server, the real SmolLM2 model, and in-process workers on that server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import nats
import pytest
from nats.aio.client import Client as NATS

from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.service import run_worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    return load_model()


@dataclass
class RunningWorker:
    config: Config
    stop: asyncio.Event
    task: asyncio.Task

    async def shutdown(self, timeout: float = 60) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)


async def start_worker(config: Config, loaded: LoadedModel, timeout: float = 120) -> RunningWorker:
    """Run a worker in this event loop (its engine in its own thread) and wait until it serves."""
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


@pytest.fixture(scope="session")
async def worker(nats_server: NatsServer, smollm: LoadedModel) -> AsyncIterator[RunningWorker]:
    """One worker on the default subjects (`llm.chat`), shared by the tests that only need answers."""
    running = await start_worker(Config(nats_url=nats_server.url, max_tokens_cap=256), smollm)
    yield running
    await running.shutdown()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture
def fresh_nats_server() -> Iterator[NatsServer]:
    """A nats-server (JetStream on) of the test's own, for tests that change server state (streams, restarts)."""
    with NatsServer() as server:
        yield server


@pytest.fixture
async def fresh_nc(fresh_nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(fresh_nats_server.url)
    yield conn
    await conn.close()
