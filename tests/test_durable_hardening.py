"""Durable jobs that used to fail for reasons unrelated to the job (issue 8): another client's request id, a burst of
batch jobs at a busy worker, a worker whose clock runs ahead of the server's, and a forged reply subject."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats
import pytest

from bus_gateway.client import BusError
from bus_gateway.jobs import JobClient
from helpers.faults import HeldLook, chat
from helpers.tiny_model import tiny_model
from inference_worker.durable import STREAM_NAME
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import BatchResponse
from schemas.subjects import REPLY_TO, REQUEST_ID

pytestmark = pytest.mark.timeout(600)


async def durable_worker(server: NatsServer, **worker_options: object) -> Worker:
    config = Config(nats_url=server.url, durable=True, compile=False)
    worker = Worker(config, await nats.connect(server.url), tiny_model(), **worker_options)  # type: ignore[arg-type]
    await worker.start()
    return worker


async def stop(worker: Worker) -> None:
    await worker.close()
    await worker.nc.close()


async def test_two_clients_may_pick_the_same_request_id(fresh_nats_server: NatsServer, fresh_nc: nats.NATS) -> None:
    worker = await durable_worker(fresh_nats_server)
    try:
        async with JobClient(fresh_nc) as alice, JobClient(fresh_nc) as bob:
            answers = await asyncio.gather(
                alice.chat(chat("alice", max_tokens=2), timeout=120, request_id="my-req-1"),
                bob.chat(chat("bob", max_tokens=2), timeout=120, request_id="my-req-1"),
            )
        assert [a.chat_id for a in answers] == ["alice", "bob"]
    finally:
        await stop(worker)


async def test_a_duplicate_durable_publish_is_an_explicit_409(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    worker = await durable_worker(fresh_nats_server)
    try:
        async with JobClient(fresh_nc) as first, JobClient(fresh_nc) as again:
            await first.chat(chat("one", max_tokens=2), timeout=120, request_id="same")
            with pytest.raises(BusError) as reused:  # the same client reusing an id it already used
                await first.chat(chat("two", max_tokens=2), timeout=120, request_id="same")
            assert reused.value.code == 409 and reused.value.name == "duplicate_request"
            again.inbox.prefix = first.inbox.prefix  # another process of the same client, within the dedup window
            with pytest.raises(BusError) as stored_once:
                await again.chat(chat("three", max_tokens=2), timeout=30, request_id="same")
            assert stored_once.value.code == 409 and "already holds a job" in stored_once.value.message
    finally:
        await stop(worker)


async def test_ten_batch_jobs_of_64_queries_at_one_worker_are_all_answered(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """Default limits. Before, the worker fetched a job per free slot, nak'd the batches that did not fit without a
    delay, each nak used up a delivery, and the burst ended in "giving up" errors."""
    worker = await durable_worker(fresh_nats_server)
    try:
        async with JobClient(fresh_nc) as jobs:
            batches = [[chat(f"b{b}-q{q}", max_tokens=2) for q in range(64)] for b in range(10)]
            answers = await asyncio.gather(*(jobs.chat_batched(queries, timeout=500) for queries in batches))
        assert all(isinstance(a, BatchResponse) and not a.partial_success for a in answers)
        assert [r.chat_id for r in answers[9].responses] == [f"b9-q{q}" for q in range(64)]
        counts = worker.jobs.snapshot()
        assert counts["answered"] == 10 and counts["requeued"] == 0 and counts["given_up"] == 0
    finally:
        await stop(worker)


async def test_a_worker_whose_clock_runs_ahead_still_serves_jobs(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """Ten minutes ahead of the server: every job looked 600 s old, and a 60 s timeout made each one a 504."""
    worker = await durable_worker(fresh_nats_server, wall_clock=lambda: time.time() + 600)
    try:
        async with JobClient(fresh_nc) as jobs:
            answer = await jobs.chat(chat("skewed", max_tokens=2), timeout=60)
        assert answer.chat_id == "skewed"
        assert worker.jobs.snapshot()["clock_offset_s"] < -590
    finally:
        await stop(worker)


async def test_a_job_whose_reply_subject_is_not_an_inbox_is_refused(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    worker = await durable_worker(fresh_nats_server)
    victim = await fresh_nc.subscribe("llm.chat")  # where a forged job would have the worker publish
    try:
        js = fresh_nc.jetstream()
        forged = {REQUEST_ID: "forged", REPLY_TO: "llm.chat", "Nats-Msg-Id": "forged"}
        await js.publish("llm.jobs.chat", msgspec.json.encode(chat("forged", max_tokens=2)), headers=forged)
        async with JobClient(fresh_nc) as jobs:  # a real job after it: once answered, the forged one was handled
            await jobs.chat(chat("real", max_tokens=2), timeout=120)
        counts = worker.jobs.snapshot()
        assert counts["refused"] == 1
        assert (await js.stream_info(STREAM_NAME)).state.messages == 0, "the forged job is removed, not retried"
        # one connection's messages arrive in order: anything published to llm.chat before the real answer is here
        assert victim.pending_msgs == 0
    finally:
        await victim.unsubscribe()
        await stop(worker)


async def test_a_job_for_a_model_whose_workers_take_no_durable_jobs_is_answered_404(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """A model-less job naming `alpha`, whose only worker serves core requests: forwarded to alpha's job queue it
    would wait there unread until it expires, so the durable worker that routes it answers 404 at once."""
    durable = await durable_worker(fresh_nats_server)
    core_config = Config(nats_url=fresh_nats_server.url, served_model_name="alpha", compile=False)
    core = Worker(core_config, await nats.connect(fresh_nats_server.url), tiny_model())
    await core.start()
    try:
        async with JobClient(fresh_nc) as jobs:
            job = msgspec.json.encode(chat("to-alpha", max_tokens=2, model="alpha"))
            with pytest.raises(BusError) as refused:
                await jobs.submit("llm.jobs.chat", job, timeout=60)
        assert refused.value.code == 404 and "`alpha`" in refused.value.message and "--durable" in refused.value.message
        assert (await fresh_nc.jetstream().stream_info(STREAM_NAME)).state.messages == 0
    finally:
        await stop(core)
        await stop(durable)


async def test_a_job_waiting_for_a_look_at_the_bus_delays_no_other_job(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """A job naming a model nobody serves is routed after a thorough look at the bus (the discovery window). The
    look runs in a task of its own, so the pull loop that every job queue shares goes on taking jobs meanwhile.
    Here the look is held until the test lets it go."""
    worker = await durable_worker(fresh_nats_server)
    look = HeldLook(worker)
    try:
        async with JobClient(fresh_nc) as jobs:
            typo = msgspec.json.encode(chat("typo", max_tokens=2, model="no-such-model"))
            unknown = asyncio.create_task(jobs.submit("llm.jobs.chat", typo, timeout=120))
            await look.looking.wait()
            answered = await jobs.chat(chat("fine", max_tokens=2), timeout=60)
            assert answered.chat_id == "fine" and not unknown.done()
            look.release.set()
            with pytest.raises(BusError) as refused:
                await unknown
        assert refused.value.code == 404 and "no-such-model" in refused.value.message
    finally:
        look.release.set()
        await stop(worker)
