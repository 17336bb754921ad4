"""A nats-server that crashes and comes back on the same port: the worker reconnects by itself and serves again,
requests made during the outage fail at once with a clear error, and durable jobs survive (JetStream's store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from bus_gateway.client import BusClient, BusError
from bus_gateway.jobs import JobClient
from helpers.faults import FaultFigures, LinkEvents, chat, connect_client
from helpers.workers import start_worker
from inference_worker.model_loader import LoadedModel
from llmbus.config import Config
from llmbus.nats_server import NatsServer, free_port

OUTAGE_REQUESTS = 3
RECOVERY_TIMEOUT_S = 30.0


@pytest.fixture
def server() -> Iterator[NatsServer]:
    with NatsServer(port=free_port()) as running:
        yield running


async def first_answer_after(client: BusClient, chat_id: str) -> tuple[float, int]:
    """Retry until a chat is answered; returns (seconds taken, attempts that failed first)."""
    started = time.monotonic()
    failures = 0
    while True:
        try:
            await client.chat(chat(chat_id, max_tokens=4), timeout=30)
            return time.monotonic() - started, failures
        except BusError as exc:
            assert exc.code == 503, exc  # not connected yet / no worker yet: both retryable
            failures += 1
            if time.monotonic() - started > RECOVERY_TIMEOUT_S:
                raise AssertionError(f"no answer within {RECOVERY_TIMEOUT_S:.0f}s of the restart") from exc
            await asyncio.sleep(0.1)  # a client's retry backoff, not synchronisation


@pytest.mark.model
async def test_worker_serves_again_after_the_server_crashes_and_restarts(
    server: NatsServer, smollm: LoadedModel
) -> None:
    worker = await start_worker(Config(nats_url=server.url, max_tokens_cap=16), smollm)
    link = LinkEvents()
    nc = await connect_client(server.url, link)
    client = BusClient(nc)
    figures = FaultFigures("nats_server_restart")
    try:
        assert (await client.chat(chat("before", max_tokens=4), timeout=60)).chat_id == "before"
        figures.sent += 1
        figures.answered += 1

        server.halt(kill=True)  # every connection drops, as in a crash or a cut link
        await asyncio.wait_for(link.dropped.wait(), 10)

        for i in range(OUTAGE_REQUESTS):
            figures.sent += 1
            started = time.monotonic()
            with pytest.raises(BusError) as outage:
                await client.chat(chat(f"outage-{i}", max_tokens=4), timeout=30)
            took = time.monotonic() - started
            assert outage.value.code == 503 and "not connected" in outage.value.message  # not its 30 s timeout
            figures.notes["slowest_outage_failure_s"] = max(figures.notes.get("slowest_outage_failure_s", 0), took)
            figures.errored += 1

        server.start()
        recovery, failed_retries = await first_answer_after(client, "after")
        figures.sent += 1
        figures.answered += 1
        figures.recovery_s = round(recovery, 2)
        figures.notes["retries_before_first_answer"] = failed_retries
        figures.record()
    finally:
        await nc.close()
        await worker.shutdown()


@pytest.mark.model
async def test_durable_jobs_flow_again_after_a_server_restart(server: NatsServer, smollm: LoadedModel) -> None:
    worker = await start_worker(Config(nats_url=server.url, durable=True, max_tokens_cap=16), smollm)
    link = LinkEvents()
    nc = await connect_client(server.url, link)
    jobs = JobClient(nc)
    figures = FaultFigures("nats_server_restart_durable")
    try:
        assert (await jobs.chat(chat("job-before", max_tokens=4), timeout=60)).chat_id == "job-before"
        server.halt(kill=True)
        await asyncio.wait_for(link.dropped.wait(), 10)
        restarted_at = time.monotonic()
        server.start()  # the same port and JetStream store: the stream and the durable consumer are still there
        await asyncio.wait_for(link.restored.wait(), RECOVERY_TIMEOUT_S)
        answer = await jobs.chat(chat("job-after", max_tokens=4), timeout=RECOVERY_TIMEOUT_S)
        assert answer.chat_id == "job-after"
        figures.sent = figures.answered = 2
        figures.recovery_s = round(time.monotonic() - restarted_at, 2)
        figures.record()
    finally:
        await jobs.close()
        await nc.close()
        await worker.shutdown()
