"""Shared fixtures: a real nats-server, the real SmolLM2 model, and in-process workers on that server."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Worker processes the tests start (`python -m llmbus.cli worker|up`) serve eagerly: each would otherwise compile
# its decode step in the background, a minute of CPU per process on this machine, for tests about the bus. The
# compiled step is tested in-process (tests/test_engine_compiled.py: a worker serving while it compiles, and the
# SmolLM2 engine compiled); in-process workers serve eagerly too, unless a test asks (helpers.workers).
os.environ.setdefault("LLMBUS_COMPILE", "false")

import nats
import pytest
from nats.aio.client import Client as NATS

from helpers.workers import RunningWorker, start_worker
from inference_worker.model_loader import LoadedModel, load_model
from llmbus.config import Config
from llmbus.nats_server import NatsServer

pytest_plugins = ["helpers.gateway_fixtures", "helpers.security_fixtures", "helpers.built_steps"]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    return load_model()


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Let a decode step still compiling in the background finish: exiting under it aborts the interpreter."""
    warm_up = sys.modules.get("inference_worker.warm_up")
    if warm_up is not None:
        warm_up.wait_until_idle(600)
