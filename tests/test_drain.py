"""SIGTERM drains a worker process: it unsubscribes (new requests go to the other workers), finishes and answers what
it holds, and exits 0. A rolling restart of two worker processes under steady load gives every request exactly one
final answer (clients retry 503 "shutting down" / no responders with backoff)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from bus_gateway.client import BusClient, BusError
from helpers.faults import (
    FaultFigures,
    SteadyLoad,
    WorkerProcess,
    chat,
    engine_data,
    gather_stats,
    start_workers,
    wait_until,
)
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import ChatResponse

WORKER_FLAGS = ("--max-tokens-cap", "16", "--drain-timeout", "60")
CLIENT_INBOX = "_INBOX.drain"  # under the workers' default --reply-prefixes
STOP_TIMEOUT_S = 60.0
LONG_PROMPT = "Count from 1 to 300, one number per line."


@pytest.fixture
def server() -> Iterator[NatsServer]:
    with NatsServer(jetstream=False) as running:
        yield running


class ReplySpy:
    """Counts every reply that reaches the client's inboxes, per inbox: each request attempt must get at most one."""

    def __init__(self) -> None:
        self.replies: Counter[str] = Counter()

    async def on_reply(self, msg: nats.aio.msg.Msg) -> None:
        self.replies[msg.subject] += 1

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.replies.values() if count > 1)


@pytest.fixture
async def spied_client(server: NatsServer) -> AsyncIterator[tuple[BusClient, ReplySpy]]:
    spy = ReplySpy()
    watcher = await nats.connect(server.url)
    await watcher.subscribe(f"{CLIENT_INBOX}.*.*", cb=spy.on_reply)  # request replies (not `$SRV.STATS` inboxes)
    await flushed(watcher)
    nc = await nats.connect(server.url, inbox_prefix=CLIENT_INBOX)
    yield BusClient(nc, retries=8, backoff=0.1, timeout=60), spy
    await nc.close()
    await watcher.close()


async def holding(nc: nats.NATS, worker: WorkerProcess) -> bool:
    for stats in await gather_stats(nc, 0.5):
        if stats["metadata"]["pid"] == str(worker.proc.pid):
            return engine_data(stats)["pending"] >= 1
    return False


async def held_in_total(nc: nats.NATS, workers: int) -> int:
    return sum(engine_data(stats)["pending"] for stats in await gather_stats(nc, 0.5))


@pytest.mark.model
async def test_rolling_restart_under_load_answers_every_request_exactly_once(
    server: NatsServer, spied_client: tuple[BusClient, ReplySpy], tmp_path: Path
) -> None:
    client, spy = spied_client
    workers = await start_workers(server.url, tmp_path, ["w1", "w2"], *WORKER_FLAGS)
    load = SteadyLoad(client, concurrency=3, max_requests=150, max_tokens=6)
    figures = load.figures = FaultFigures("rolling_restart_2_workers")
    drains: list[float] = []
    restarts: list[float] = []
    try:
        load.start()
        await load.next_answer()
        for index, old in enumerate(list(workers)):
            await wait_until(lambda old=old: holding(client.nc, old), 30, f"{old.name} to hold a request")
            stopped_at = time.monotonic()
            old.terminate()
            assert await old.wait(STOP_TIMEOUT_S) == 0, old.log_tail()
            drains.append(time.monotonic() - stopped_at)
            replacement = await WorkerProcess.start(server.url, tmp_path, f"{old.name}-new", *WORKER_FLAGS)
            workers[index] = replacement
            await replacement.wait_ready()
            await load.next_answer()
            restarts.append(time.monotonic() - stopped_at)
        await load.stop()
        assert figures.lost == 0 and figures.errored == 0, load.errors
        assert figures.answered == figures.sent > 0
        assert spy.duplicates == 0
        figures.duplicates = spy.duplicates
        figures.recovery_s = round(max(restarts), 2)
        figures.notes = {
            "drain_s": [round(d, 2) for d in drains],
            "stop_to_replacement_serving_s": [round(r, 2) for r in restarts],
            "reply_attempts_seen": sum(spy.replies.values()),
        }
        figures.record()
        await shut_down_while_holding(client, spy, workers)
    finally:
        await load.stop()
        for worker in workers:
            await worker.ensure_stopped()


async def shut_down_while_holding(client: BusClient, spy: ReplySpy, workers: list[WorkerProcess]) -> None:
    """SIGTERM every worker while each holds requests: all of them are answered, every process exits 0, and then
    a new request fails at once (no responders) rather than waiting."""
    requests = [chat(f"held-{i}", max_tokens=16, user_prompt=LONG_PROMPT) for i in range(4)]
    calls = [asyncio.create_task(client.chat(r, timeout=120, retries=0)) for r in requests]

    async def all_held() -> bool:
        return await held_in_total(client.nc, len(workers)) == len(requests)

    await wait_until(all_held, 60, "the workers to hold every request")
    stopped_at = time.monotonic()
    for worker in workers:
        worker.terminate()
    results = await asyncio.gather(*calls, return_exceptions=True)
    answered = [r for r in results if isinstance(r, ChatResponse)]
    assert len(answered) == len(requests), results
    assert all(a.finish_reason in ("length", "stop") and a.response for a in answered)
    for worker in workers:
        assert await worker.wait(STOP_TIMEOUT_S) == 0, worker.log_tail()
    drain_s = time.monotonic() - stopped_at

    with pytest.raises(BusError) as after:
        await client.chat(chat("after-drain"), timeout=30, retries=0)
    assert after.value.code == 503 and after.value.name == "no_responders"
    assert spy.duplicates == 0
    FaultFigures(
        "sigterm_drain_all_workers",
        sent=len(requests) + 1,
        answered=len(answered),
        errored=1,
        notes={"drain_s": round(drain_s, 2), "after_drain": "503 no responders (expected: no worker left)"},
    ).record()


@pytest.mark.model
async def test_two_workers_on_one_host_share_its_cores_and_a_drain_under_load_stays_bounded(
    server: NatsServer, spied_client: tuple[BusClient, ReplySpy], tmp_path: Path
) -> None:
    """Two workers left at `--threads 0` (auto) on this 2-core host use one thread each. Before, each used one per
    core, and a drain with 12 requests in hand took 13 s to over 60 s (timing out with 503s in one run of three)."""
    client, spy = spied_client
    flags = ("--threads", "0", "--max-tokens-cap", "48", "--drain-timeout", "120")
    workers = await start_workers(server.url, tmp_path, ["share-a", "share-b"], *flags)
    try:

        async def sharing() -> bool:
            stats = await gather_stats(client.nc, 2.0)
            return len(stats) == 2 and all(engine_data(s)["threads"] == max(1, cores() // 2) for s in stats)

        await wait_until(sharing, 60, "both workers to count each other and share the cores")
        requests = [chat(f"load-{i}", max_tokens=48, user_prompt=LONG_PROMPT) for i in range(24)]
        calls = [asyncio.create_task(client.chat(r, timeout=300, retries=0)) for r in requests]
        doomed = workers[0]
        await wait_until(lambda: holding(client.nc, doomed), 60, f"{doomed.name} to hold requests")
        doomed.terminate()
        assert await doomed.wait(130) == 0, doomed.log_tail()  # drained within its --drain-timeout of 120 s
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        for worker in workers:
            await worker.ensure_stopped()
    errors = [r for r in results if not isinstance(r, ChatResponse)]
    assert not errors, errors  # none of them a 503 "worker stopped before finishing this request"
    assert spy.duplicates == 0


def cores() -> int:
    return len(os.sched_getaffinity(0))
