"""Durable jobs that used to fail for reasons unrelated to the job (issue 8): another client's request id, a burst of
batch jobs at a busy worker, a worker whose clock runs ahead of the server's, and a forged reply subject; and, from
a later review, a model whose workers take no durable jobs, batch jobs over-fetched or run past their client's
timeout, an answer over the max payload, and a rolling restart that used up a long job's attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from bus_gateway.client import BusError
from bus_gateway.jobs import JobClient
from helpers.bridge import running_bridge
from helpers.durable_jobs import JobWatch, durable_worker, stop
from helpers.faults import HeldLook, chat, wait_until
from helpers.tiny_model import tiny_model
from inference_worker.durable import ATTEMPTS, PUBLISHED
from inference_worker.job_queues import first_of
from inference_worker.job_stream import STREAM_NAME
from llmbus.config import Config
from llmbus.nats_server import NatsServer, write_config
from schemas import BatchResponse
from schemas.subjects import ERROR, ERROR_CODE, REPLY_TO, REQUEST_ID

pytestmark = pytest.mark.timeout(600)


async def queue_empties(nc: nats.NATS, what: str) -> None:
    """Wait for the job queue to empty: a refused job is termed after its answer reaches the client, so the term may
    reach the server a moment after the test sees the answer (a loaded CI machine saw 1 message left)."""

    async def empty() -> bool:
        return (await nc.jetstream().stream_info(STREAM_NAME)).state.messages == 0

    await wait_until(empty, 30, f"{what} to leave the job queue")


@pytest.mark.parametrize("request_id", ["id\n2026-11-27 INFO llmbus.requests: forged line", "r" * 200])
async def test_a_job_whose_request_id_is_no_subject_token_is_a_400(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, request_id: str
) -> None:
    """As in core mode: the id names the cancel subject and goes into logs and answer headers, so one that is not a
    single token (a newline forges a log line) is refused, and the answer names the job by its stream sequence."""
    worker = await durable_worker(fresh_nats_server)
    inbox = fresh_nc.new_inbox()
    answers = await fresh_nc.subscribe(inbox)
    try:
        headers = {REQUEST_ID: request_id, REPLY_TO: inbox}
        await fresh_nc.jetstream().publish("llm.jobs.chat", msgspec.json.encode(chat("bad-id")), headers=headers)
        reply = await answers.next_msg(timeout=60)
        assert reply.headers[ERROR_CODE] == "400" and REQUEST_ID in reply.headers[ERROR]
        assert reply.headers[REQUEST_ID].startswith("job-") and "\n" not in reply.headers[REQUEST_ID]
    finally:
        await answers.unsubscribe()
        await stop(worker)


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
        await queue_empties(fresh_nc, "the forged job (removed, not retried)")
        # one connection's messages arrive in order: anything published to llm.chat before the real answer is here
        assert victim.pending_msgs == 0
    finally:
        await victim.unsubscribe()
        await stop(worker)


@asynccontextmanager
async def alpha_served_without_durable_jobs(server: NatsServer) -> AsyncIterator[None]:
    """A durable worker of the tiny model, and `alpha`'s only worker, which serves core requests alone."""
    durable = await durable_worker(server)
    try:
        core = await durable_worker(server, durable=False, served_model_name="alpha")
        try:
            yield
        finally:
            await stop(core)
    finally:
        await stop(durable)


async def test_a_job_for_a_model_whose_workers_take_no_durable_jobs_is_answered_404(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """A model-less job naming `alpha`, whose only worker serves core requests: forwarded to alpha's job queue it
    would wait there unread until it expires, so the durable worker that routes it answers 404 at once."""
    async with alpha_served_without_durable_jobs(fresh_nats_server):
        async with JobClient(fresh_nc) as jobs:
            job = msgspec.json.encode(chat("to-alpha", max_tokens=2, model="alpha"))
            with pytest.raises(BusError) as refused:
                await jobs.submit("llm.jobs.chat", job, timeout=60)
        assert refused.value.code == 404 and "`alpha`" in refused.value.message and "--durable" in refused.value.message
        await queue_empties(fresh_nc, "the refused job")


async def test_a_job_waiting_for_a_look_at_the_bus_delays_no_other_job(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """A job naming a model nobody serves is routed after a thorough look at the bus (the discovery window). The
    look runs in a task of its own, so the pull loop that every job queue shares goes on taking jobs meanwhile.
    Here the look is held until the test lets it go. (The default model: a model-less job needs no look.)"""
    worker = await durable_worker(fresh_nats_server, default_model=True)
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


async def test_the_durable_bridge_answers_404_for_a_model_that_no_durable_worker_serves(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """`alpha`'s only worker takes no durable jobs: the bridge stored a request naming it in alpha's job queue, where
    nothing reads it (the client waited out its timeout, the job filled the queue until max_age). Now: 404 at once."""
    hi = {"user_prompt": "Hi", "max_tokens": 2}
    async with alpha_served_without_durable_jobs(fresh_nats_server):
        config = Config(nats_url=fresh_nats_server.url, durable=True, request_timeout=30)
        async with running_bridge(config) as bridge, bridge.client() as http:
            native = await http.post("/chat", json={"chat_id": "n", "model": "alpha", **hi})
            messages = [{"role": "user", "content": "Hi"}]
            body = {"model": "alpha", "messages": messages, "max_tokens": 2}
            openai = await http.post("/v1/chat/completions", json=body)
            served = await http.post("/chat", json={"chat_id": "t", "model": "tiny", **hi})
        assert native.status_code == 404 and "takes durable jobs (--durable)" in native.json()["error"]
        error = openai.json()["error"]
        assert openai.status_code == 404 and error["code"] == "model_not_found" and "--durable" in error["message"]
        assert served.status_code == 200 and served.json()["chat_id"] == "t"
        await queue_empties(fresh_nc, "the refused job")


async def test_a_worker_fetches_only_the_batch_jobs_whose_queries_fit(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """Room for 8 queries and batches of at most 4: two batch jobs of 4 fill the worker. A running batch job used to
    count for nothing, so the worker fetched every queued one. Its queries wait on a held look at the bus here (they
    name a model not seen yet), so the two batches keep running until the test lets them go."""
    worker = await durable_worker(fresh_nats_server, max_pending=8, max_batch_size=8, max_batch_queries=4)
    look, watch = HeldLook(worker), JobWatch(worker)
    inbox = fresh_nc.new_inbox()
    answers = await fresh_nc.subscribe(inbox)
    try:
        for b in range(6):
            batch = {"queries": [chat(f"b{b}-q{q}", model="not-seen-yet") for q in range(4)]}
            headers = {REQUEST_ID: f"batch-{b}", REPLY_TO: inbox}
            await fresh_nc.jetstream().publish("llm.jobs.chat.batched", msgspec.json.encode(batch), headers=headers)
        await first_of(watch.waiting.wait(), watch.took(3).wait())
        assert len(watch.taken) == 2, "the worker took more batch jobs than their queries fit"
        look.release.set()
        codes = [(await answers.next_msg(timeout=60)).headers[ERROR_CODE] for _ in range(6)]
        assert codes == ["404"] * 6 and len(watch.taken) == 6
    finally:
        look.release.set()
        await answers.unsubscribe()
        await stop(worker)


async def test_a_job_counts_its_timeout_from_its_first_publication(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """A job stored again (forwarded, or put back by a stopping worker) carries its first publication time; and a
    batch job that waited past its client's timeout runs none of its queries (it ran them in full before)."""
    skew = [0.0]
    worker = await durable_worker(fresh_nats_server, wall_clock=lambda: time.time() + skew[0])
    inbox = fresh_nc.new_inbox()
    answers = await fresh_nc.subscribe(inbox)
    try:
        stored_again = {REQUEST_ID: "old", REPLY_TO: inbox, PUBLISHED: f"{time.time() - 1000:.6f}"}
        body = msgspec.json.encode(chat("old", max_tokens=2, timeout=60))
        await fresh_nc.jetstream().publish("llm.jobs.model.tiny.chat", body, headers=stored_again)
        reply = await answers.next_msg(timeout=60)
        assert reply.headers[ERROR_CODE] == "504"
        assert reply.headers[ERROR] == "deadline exceeded before generation started"
        skew[0] = 1000.0  # the worker measured the server's clock at start: every job now looks 1000 s old
        async with JobClient(fresh_nc) as jobs:
            with pytest.raises(BusError) as expired:
                await jobs.chat_batched([chat("q0", max_tokens=2), chat("q1", max_tokens=2)], timeout=60)
        assert expired.value.code == 504 and worker.stats()["prefill_forwards"] == 0
    finally:
        await answers.unsubscribe()
        await stop(worker)


async def test_an_answer_over_the_max_payload_is_a_413_and_the_job_is_done(tmp_path: Path) -> None:
    """Publishing an answer over the server's max payload raised: the job stayed unacked, ran again after each
    ack_wait, and the client waited out its timeout. Now the client gets a 413 at once and the job is acked."""
    conf = write_config(tmp_path / "nats.conf", {"max_payload": 4096})
    with NatsServer(config_file=conf) as server:
        worker = await durable_worker(server, tiny_model(eos_token_ids=frozenset()), max_tokens_cap=128)
        nc = await nats.connect(server.url)
        try:
            async with JobClient(nc) as jobs:
                with pytest.raises(BusError) as too_large:
                    await jobs.chat_batched([chat(f"q{i}", max_tokens=128) for i in range(12)], timeout=120)
            assert too_large.value.code == 413 and "max payload of 4096 bytes" in too_large.value.message
            assert worker.jobs.snapshot()["failed"] == 1
            assert (await nc.jetstream().stream_info(STREAM_NAME)).state.messages == 0
        finally:
            await nc.close()
            await stop(worker)


@pytest.mark.parametrize(
    "queue", ["llm.jobs.model.tiny.chat", "llm.jobs.chat.batched"], ids=["a model's chat", "a model-less batch"]
)
async def test_a_rolling_restart_puts_a_long_job_back_without_using_an_attempt(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, queue: str
) -> None:
    """One attempt per job (jobs_max_deliver=1), and the worker generating a job drains with a timeout shorter than
    the job: it failed it with 503 "giving up". Now it stores the job again, uncharged, on its model's queue (a
    model-less batch: on the queue it came from), and the next worker runs it. (One sequence at a time: the drain
    finds no fetch in flight to wait for.)"""
    never_ends, options = tiny_model(eos_token_ids=frozenset()), {"jobs_max_deliver": 1, "max_tokens_cap": 900}
    first = await durable_worker(fresh_nats_server, never_ends, max_batch_size=1, **options)
    watch = JobWatch(first)
    stored: asyncio.Queue[Msg] = asyncio.Queue()
    await fresh_nc.subscribe(queue, cb=stored.put)  # the client's job, then the copy
    async with JobClient(fresh_nc) as jobs:
        long = chat("long", max_tokens=900)
        if queue.endswith("batched"):
            call = asyncio.create_task(jobs.chat_batched([long], timeout=300))
        else:
            call = asyncio.create_task(jobs.chat(msgspec.structs.replace(long, model="tiny"), timeout=300))
        await watch.took(1).wait()
        await first.drain(0.01)
        await first.nc.close()
        await stored.get()
        again = asyncio.ensure_future(stored.get())
        await asyncio.wait({call, again}, return_when=asyncio.FIRST_COMPLETED)
        assert not call.done(), f"the stopping worker answered the job: {call.exception()!r}"
        assert again.result().headers[ATTEMPTS] == "0" and float(again.result().headers[PUBLISHED]) <= time.time()
        second = await durable_worker(fresh_nats_server, never_ends, **options)
        try:
            answer = await call
        finally:
            await stop(second)
    (answer,) = answer.responses if isinstance(answer, BatchResponse) else [answer]
    assert answer.chat_id == "long" and answer.usage.completion_tokens == 900
