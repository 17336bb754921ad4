"""Two buses on one NATS server (subject prefixes `llm` and `multi`): the bus view (`/bus.json`, `llmbus status`)
and `/readyz` count only the workers on their own prefix, as `/v1/models` does. The workers are fake `$SRV`
responders (helpers.fake_srv) on a real nats-server, and the bridge is the real one."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest
from nats.aio.client import Client as NATS
from rich.console import Console

from bus_gateway import web
from bus_gateway.bus_view import bus_view
from helpers.bridge import running_bridge
from helpers.fake_srv import FakeWorker, FakeWorkers
from llmbus.cli import main
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from llmbus.status import run_status

ALPHA_ON_LLM = FakeWorker("A", {"model": "alpha", "subject_prefix": "llm", "host": "h", "pid": "1"}, {"running": 2})
BETA_ON_MULTI = FakeWorker("B", {"model": "beta", "subject_prefix": "multi", "host": "h", "pid": "2"}, {"running": 5})
OLD_WORKER = FakeWorker("C", {"model": "gamma", "host": "h", "pid": "3"}, {"running": 1})  # does not say its prefix


@pytest.fixture
async def two_buses() -> AsyncIterator[tuple[NatsServer, FakeWorkers]]:
    """A nats-server of its own where, to start with, only a worker on prefix `llm` answers `$SRV`."""
    with NatsServer(jetstream=False) as server:
        nc: NATS = await nats.connect(server.url)
        try:
            yield server, await FakeWorkers(nc, [ALPHA_ON_LLM]).start()
        finally:
            await nc.close()


def test_the_view_keeps_the_workers_of_its_prefix_and_those_that_do_not_say() -> None:
    replies = [worker.reply("INFO") for worker in (ALPHA_ON_LLM, BETA_ON_MULTI, OLD_WORKER)]
    stats = [worker.reply("STATS") for worker in (ALPHA_ON_LLM, BETA_ON_MULTI, OLD_WORKER)]
    view, _ = bus_view(replies, stats, datetime.now(UTC), 1.0, None, subject_prefix="multi")
    assert [row.id for row in view.workers] == ["B", "C"]
    assert (view.totals.workers, view.totals.models, view.totals.running) == (2, ["beta", "gamma"], 6)
    assert view.totals.other_prefixes == ["llm"]
    everything, _ = bus_view(replies, stats, datetime.now(UTC), 1.0, None)  # no prefix: every worker
    assert everything.totals.workers == 3


async def test_a_bridge_counts_only_the_workers_on_its_prefix(
    two_buses: tuple[NatsServer, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `multi` bridge beside an `llm` worker is not ready (its every chat would get a 503) and its /bus.json
    lists no worker; once a `multi` worker answers, it is ready and lists that one alone."""
    monkeypatch.setattr(web, "FRESH_FOR_S", 0.0)  # every /bus.json a new `$SRV` round
    server, fakes = two_buses
    config = Config(nats_url=server.url, subject_prefix="multi", request_timeout=5.0)
    async with running_bridge(config) as bridge, bridge.client() as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert "no inference worker on subject prefix multi answers $SRV.PING" in ready.json()["error"]
        alone = (await http.get("/bus.json")).json()
        assert (alone["workers"], alone["totals"]["workers"], alone["totals"]["models"]) == ([], 0, [])
        assert alone["totals"]["other_prefixes"] == ["llm"]

        fakes.workers.append(BETA_ON_MULTI)
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert (ready.json()["workers"], ready.json()["models"]) == (1, ["beta"])
        both = (await http.get("/bus.json")).json()
        assert [row["id"] for row in both["workers"]] == ["B"]
        assert (both["totals"]["models"], both["totals"]["running"]) == (["beta"], 5)
        listed = (await http.get("/v1/models")).json()
        assert [card["id"] for card in listed["data"]] == both["totals"]["models"]


async def status_on(server: NatsServer, prefix: str) -> tuple[int, str]:
    out = io.StringIO()
    config = Config(nats_url=server.url, subject_prefix=prefix)
    code = await run_status(config, False, 2.0, Console(file=out, width=80, color_system=None))
    return code, out.getvalue()


async def test_status_shows_only_the_workers_on_its_prefix(two_buses: tuple[NatsServer, FakeWorkers]) -> None:
    server, fakes = two_buses
    code, text = await status_on(server, "multi")
    assert code == 1, text
    assert "no worker on subject prefix multi (workers on llm: choose with --subject-prefix)" in text
    assert "alpha" not in text

    fakes.workers.append(BETA_ON_MULTI)
    code, text = await status_on(server, "multi")
    assert code == 0, text
    assert "1 worker · 5 running" in text and "models: beta\n" in text
    assert "alpha" not in text and "h:1 " not in text


async def test_the_status_command_takes_a_subject_prefix_flag(
    two_buses: tuple[NatsServer, FakeWorkers], capsys: pytest.CaptureFixture[str]
) -> None:
    server, fakes = two_buses
    fakes.workers.append(BETA_ON_MULTI)
    code = await asyncio.to_thread(main, ["status", "--nats-url", server.url, "--subject-prefix", "multi"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "models: beta" in text and "alpha" not in text
