"""Fixtures for the bridge and client tests (loaded by conftest): a second
nats-server where no worker ever runs, bridges on it (with and without API keys), and a bridge beside conftest's
`worker` (one SmolLM2 worker on `nats_server`, default subjects)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from helpers.bridge import API_KEY, Bridge, running_bridge
from llmbus.config import Config
from llmbus.nats_server import NatsServer


@pytest.fixture(scope="session")
def lonely_nats() -> Iterator[NatsServer]:
    """A nats-server on which no worker ever runs: every chat there has no responders."""
    with NatsServer(jetstream=False) as server:
        yield server


@pytest.fixture(scope="session")
async def lonely_bridge(lonely_nats: NatsServer) -> AsyncIterator[Bridge]:
    async with running_bridge(Config(nats_url=lonely_nats.url, request_timeout=5.0)) as bridge:
        yield bridge


@pytest.fixture(scope="session")
async def keyed_bridge(lonely_nats: NatsServer) -> AsyncIterator[Bridge]:
    """A bridge that requires `Authorization: Bearer sk-llmbus-test` (or the second key)."""
    config = Config(nats_url=lonely_nats.url, request_timeout=5.0, api_keys=[API_KEY, "sk-second"])
    async with running_bridge(config) as bridge:
        yield bridge


@pytest.fixture(scope="session")
async def bridge(nats_server: NatsServer) -> AsyncIterator[Bridge]:
    """A bridge on the same server as conftest's `worker` (request it too in tests that need answers)."""
    async with running_bridge(Config(nats_url=nats_server.url, request_timeout=60.0)) as running:
        yield running


@pytest.fixture
async def lonely_http(lonely_bridge: Bridge) -> AsyncIterator[httpx.AsyncClient]:
    async with lonely_bridge.client() as client:
        yield client


@pytest.fixture
async def http(bridge: Bridge) -> AsyncIterator[httpx.AsyncClient]:
    async with bridge.client() as client:
        yield client
