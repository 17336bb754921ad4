"""Durable jobs through JetStream: the `LLM_JOBS` work queue and its limits, answers acked only once published,
redelivery after `kill -9` of a worker mid-generation, one final answer per request id, and a job that no worker
finishes stopping after max deliveries with an error answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from bus_gateway.client import BusError
from bus_gateway.jobs import JobClient
from helpers.durable_jobs import durable_worker, stop
from helpers.faults import FaultFigures, HeldLook, chat, engine_data, gather_stats, start_workers, wait_until
from helpers.workers import start_worker
from inference_worker.job_stream import (
    CONSUMER_NAME,
    STREAM_NAME,
    JetStreamUnavailable,
    JobLimits,
    JobStreamMismatch,
    ensure_jobs_stream,
    job_consumers,
)
from inference_worker.model_loader import LoadedModel
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import ChatResponse, Subjects
from schemas.subjects import ERROR, ERROR_CODE, REPLY_TO, REQUEST_ID

LONG_PROMPT = "Count from 1 to 300, one number per line."
CONSUMERS = job_consumers(Subjects(), "SmolLM2-135M-Instruct")


async def stream_messages(nc: nats.NATS) -> int:
    return (await nc.jetstream().stream_info(STREAM_NAME)).state.messages


async def test_a_durable_job_with_no_stream_fails_at_once(fresh_nc: nats.NATS) -> None:
    with pytest.raises(BusError) as no_stream:
        await JobClient(fresh_nc).chat(chat("nowhere"), timeout=30)
    assert no_stream.value.code == 503 and "--durable" in no_stream.value.message


async def test_durable_mode_without_jetstream_is_a_clear_error() -> None:
    with NatsServer(jetstream=False) as plain:
        nc = await nats.connect(plain.url)
        try:
            with pytest.raises(JetStreamUnavailable, match="needs JetStream"):
                await ensure_jobs_stream(nc.jetstream(), JobLimits(), CONSUMERS)
        finally:
            await nc.close()


async def test_a_job_stream_of_another_subject_prefix_is_a_clear_error_at_start(fresh_nc: nats.NATS) -> None:
    js = fresh_nc.jetstream()
    await ensure_jobs_stream(js, JobLimits(subjects="acme.jobs.>"), job_consumers(Subjects("acme"), "tiny"))
    with pytest.raises(JobStreamMismatch, match=r"takes acme\.jobs\.>, not this worker's job subjects llm\.jobs\.>"):
        await ensure_jobs_stream(js, JobLimits(), CONSUMERS)


async def test_a_worker_follows_the_consumers_it_finds_and_names_what_differs(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumers were made with ack_wait 1 s and 3 attempts; this worker's flags say 30 s and 1. It gave up on
    delivery 2 (its own limit), and sent in-progress acks every 10 s, long after JetStream had redelivered."""
    js = fresh_nc.jetstream()
    await ensure_jobs_stream(js, JobLimits(max_attempts=3, ack_wait=1.0), job_consumers(Subjects(), "tiny"))
    async with JobClient(fresh_nc) as jobs:
        call = asyncio.create_task(jobs.chat(chat("again", max_tokens=2), timeout=60))
        dies = await js.pull_subscribe_bind(durable=CONSUMER_NAME, stream=STREAM_NAME)
        await dies.fetch(1, timeout=10)
        await dies.unsubscribe()  # delivery 1 dies unacked: delivery 2 is the worker's
        worker = await durable_worker(fresh_nats_server, jobs_max_deliver=1, default_model=True)
        look, progress, kept_alive = HeldLook(worker), [], asyncio.Event()

        async def count(msg: Msg) -> None:
            progress.append(msg.data)
            if progress.count(b"+WPI") >= 6:  # the job is held 2 s, twice ack_wait
                kept_alive.set()

        acks = await fresh_nc.subscribe(f"$JS.ACK.{STREAM_NAME}.>", cb=count)
        try:
            assert (await call).chat_id == "again"
            typo = msgspec.json.encode(chat("typo", max_tokens=2, model="not-seen-yet"))
            unknown = asyncio.create_task(jobs.submit("llm.jobs.chat", typo, timeout=60))
            await look.looking.wait()  # held while it is routed: in-progress acks keep it from being redelivered
            await kept_alive.wait()
            look.release.set()
            with pytest.raises(BusError) as refused:
                await unknown
            assert refused.value.code == 404 and worker.jobs.snapshot()["redelivered"] == 1
        finally:
            look.release.set()
            await acks.unsubscribe()
            await stop(worker)
    assert "ack_wait 1.0 (this worker's flag: 30.0); max_deliver 4 (this worker's flag: 2)" in caplog.text


@pytest.mark.model
async def test_jobs_are_answered_then_acked_and_the_queue_has_explicit_limits(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, smollm: LoadedModel
) -> None:
    config = Config(
        nats_url=fresh_nats_server.url, durable=True, max_tokens_cap=16, jobs_ack_wait=7.0, jobs_max_deliver=2
    )
    worker = await start_worker(config, smollm)
    try:
        async with JobClient(fresh_nc) as jobs:
            single, batch = await asyncio.gather(
                jobs.chat(chat("durable-1", max_tokens=4), timeout=120),
                jobs.chat_batched([chat("durable-b0", max_tokens=4), chat("durable-b1", max_tokens=4)], timeout=120),
            )
            assert single.chat_id == "durable-1" and single.response
            assert [r.chat_id for r in batch.responses] == ["durable-b0", "durable-b1"]
            streamed_job = msgspec.json.encode(chat("durable-stream", max_tokens=4, stream=True))
            with pytest.raises(BusError) as streamed:
                await jobs.submit("llm.jobs.chat", streamed_job, timeout=60)
            assert streamed.value.code == 400 and "stream" in streamed.value.message
            assert jobs.duplicates == 0
        assert await stream_messages(fresh_nc) == 0, "every answered job is acked and leaves the work queue"

        js = fresh_nc.jetstream()
        stream = (await js.stream_info(STREAM_NAME)).config
        assert (stream.retention, stream.discard, stream.subjects) == ("workqueue", "new", ["llm.jobs.>"])
        assert (stream.max_age, stream.max_msgs) == (config.jobs_max_age, config.jobs_max_msgs)
        assert stream.duplicate_window == config.jobs_max_age, "a re-published job is stored once while it may wait"
        consumer = (await js.consumer_info(STREAM_NAME, CONSUMER_NAME)).config
        assert (consumer.ack_policy, consumer.ack_wait, consumer.max_deliver) == ("explicit", 7.0, 3)
    finally:
        await worker.shutdown()


@pytest.mark.model
async def test_a_second_answer_for_a_request_id_is_dropped(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, smollm: LoadedModel
) -> None:
    """A worker that dies after publishing an answer but before acking runs the job again elsewhere: the client
    sees the first answer only. The second answer is published here as that worker would."""
    worker = await start_worker(Config(nats_url=fresh_nats_server.url, durable=True, max_tokens_cap=16), smollm)
    spy = await fresh_nc.subscribe("llm.jobs.chat")
    try:
        async with JobClient(fresh_nc) as jobs:
            answer = await jobs.chat(chat("dedup", max_tokens=4), timeout=120)
            published = await spy.next_msg(timeout=5)
            repeat = msgspec.json.encode(msgspec.structs.replace(answer, response="a second run"))
            await fresh_nc.publish(
                published.headers[REPLY_TO], repeat, headers={REQUEST_ID: published.headers[REQUEST_ID]}
            )
            await flushed(fresh_nc)

            async def dropped() -> bool:
                return jobs.duplicates == 1

            await wait_until(dropped, 5, "the duplicate answer to arrive")
            assert jobs.answers == 1 and answer.response != "a second run"
    finally:
        await spy.unsubscribe()
        await worker.shutdown()


@pytest.mark.model
async def test_a_job_whose_client_gave_up_is_answered_504_without_running(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, smollm: LoadedModel
) -> None:
    """The job's `timeout` counts from its publication: a job that waited in the queue past it never starts."""
    js = fresh_nc.jetstream()
    await ensure_jobs_stream(js, JobLimits(), CONSUMERS)
    inbox = fresh_nc.new_inbox()
    answers = await fresh_nc.subscribe(inbox)
    body = msgspec.json.encode(chat("expired", max_tokens=4, timeout=0.05))
    await js.publish("llm.jobs.chat", body, headers={REQUEST_ID: "expired-job", REPLY_TO: inbox})
    await asyncio.sleep(0.2)  # the job's 0.05 s pass while it waits in the queue, with no worker yet
    worker = await start_worker(Config(nats_url=fresh_nats_server.url, durable=True, max_tokens_cap=16), smollm)
    try:
        reply = await answers.next_msg(timeout=60)
        assert reply.headers[ERROR_CODE] == "504"
        assert reply.headers[ERROR] == "deadline exceeded before generation started"
        assert reply.headers[REQUEST_ID] == "expired-job"
        (stats,) = await gather_stats(fresh_nc, 1.0)
        assert engine_data(stats)["prefill_forwards"] == 0
        await wait_until(lambda: _no_messages(fresh_nc), 5, "the expired job to be acked")
    finally:
        await answers.unsubscribe()
        await worker.shutdown()


async def _no_messages(nc: nats.NATS) -> bool:
    return await stream_messages(nc) == 0


@pytest.mark.model
async def test_a_job_no_worker_finishes_stops_after_max_deliveries(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, smollm: LoadedModel
) -> None:
    """Delivery 1 goes to a worker that dies holding it (here: a consumer that fetches and never acks). With
    `jobs_max_deliver=1`, the next delivery does not run it again: the client gets an error that names the limit."""
    js = fresh_nc.jetstream()
    limits = JobLimits(max_attempts=1, ack_wait=1.0)
    await ensure_jobs_stream(js, limits, CONSUMERS)
    started = time.monotonic()
    async with JobClient(fresh_nc) as jobs:
        call = asyncio.create_task(jobs.chat(chat("doomed", max_tokens=4), timeout=60))
        doomed_worker = await js.pull_subscribe_bind(durable=CONSUMER_NAME, stream=STREAM_NAME)
        (first_delivery,) = await doomed_worker.fetch(1, timeout=10)
        assert first_delivery.metadata.num_delivered == 1
        await doomed_worker.unsubscribe()  # dies without an ack: JetStream redelivers after ack_wait

        config = Config(
            nats_url=fresh_nats_server.url, durable=True, jobs_max_deliver=1, jobs_ack_wait=1.0, max_tokens_cap=16
        )
        worker = await start_worker(config, smollm)
        try:
            with pytest.raises(BusError) as failed:
                await call
            assert failed.value.code == 500
            assert "giving up (max deliveries: 1)" in failed.value.message
            (stats,) = await gather_stats(fresh_nc, 1.0)
            assert engine_data(stats)["jobs"]["given_up"] == 1
            assert engine_data(stats)["prefill_forwards"] == 0, "the last delivery only answers the error"
            await wait_until(lambda: _no_messages(fresh_nc), 5, "the given-up job to leave the queue")
            FaultFigures(
                "durable_max_deliveries",
                sent=1,
                errored=1,
                recovery_s=round(time.monotonic() - started, 2),
                notes={"max_deliver": 1, "ack_wait_s": 1.0, "answer": failed.value.message},
            ).record()
        finally:
            await worker.shutdown()


@pytest.mark.model
async def test_kill_9_mid_generation_redelivers_every_job_exactly_once(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, tmp_path: Path
) -> None:
    """Two durable worker processes; `kill -9` the one that is generating. Its jobs come back after ack_wait and
    the survivor answers them: every request id gets exactly one final answer."""
    flags = ("--durable", "--jobs-ack-wait", "2", "--max-tokens-cap", "48", "--max-batch-size", "4")
    workers = await start_workers(fresh_nats_server.url, tmp_path, ["durable-a", "durable-b"], *flags)
    by_pid = {str(w.proc.pid): w for w in workers}
    jobs = JobClient(fresh_nc)
    figures = FaultFigures("durable_kill_9")
    try:
        requests = [chat(f"job-{i}", max_tokens=40, user_prompt=LONG_PROMPT) for i in range(6)]
        calls = [asyncio.create_task(jobs.chat(r, timeout=150)) for r in requests]
        figures.sent = len(calls)
        victim_stats: dict = {}

        async def one_is_generating() -> bool:
            for stats in await gather_stats(fresh_nc, 0.5):
                data = engine_data(stats)
                if data["jobs"]["held"] >= 1 and data["running"] >= 1 and data["tokens_generated"] >= 1:
                    victim_stats.update(stats)
                    return True
            return False

        await wait_until(one_is_generating, 60, "a worker mid-generation")
        victim = by_pid[victim_stats["metadata"]["pid"]]
        survivor = next(w for w in workers if w is not victim)
        held = engine_data(victim_stats)["jobs"]["held"]
        victim.kill()
        killed_at = time.monotonic()
        assert await victim.wait(10) == -9

        results = await asyncio.gather(*calls, return_exceptions=True)
        figures.recovery_s = round(time.monotonic() - killed_at, 2)
        answered = [r for r in results if isinstance(r, ChatResponse)]
        failed = [r for r in results if isinstance(r, BusError) and r.name != "timeout"]
        figures.answered, figures.errored = len(answered), len(failed)
        figures.lost = len(results) - len(answered) - len(failed)
        figures.duplicates = jobs.duplicates
        assert not failed and figures.lost == 0, results
        assert sorted(a.chat_id for a in answered) == sorted(r.chat_id for r in requests)

        (survivor_stats,) = await gather_stats(fresh_nc, 1.0)
        assert survivor_stats["metadata"]["pid"] == str(survivor.proc.pid)
        redelivered = engine_data(survivor_stats)["jobs"]["redelivered"]
        assert redelivered >= 1, "the survivor took over the killed worker's jobs"
        assert await stream_messages(fresh_nc) == 0
        figures.notes = {"jobs_held_by_killed_worker": held, "redelivered_to_survivor": redelivered, "ack_wait_s": 2}
        figures.record()
        survivor.terminate()
        assert await survivor.wait(60) == 0, survivor.log_tail()
    finally:
        await jobs.close()
        for worker in workers:
            await worker.ensure_stopped()
