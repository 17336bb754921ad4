"""Durable jobs across restarts (a later review): a job whose model's workers restart waits in that model's queue;
workers that made the consumers with other flags follow the ack wait the server kept; a job stream deleted under a
running worker is made again; a job given up is terminated even when its answer cannot be published; and the jobs
that a dying engine cuts short are charged a delivery."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from bus_gateway.client import BusError
from bus_gateway.jobs import JobClient
from helpers.durable_jobs import JobWatch, durable_worker, stop
from helpers.durable_restarts import (
    AckWatch,
    ConsumerWatch,
    LateWriter,
    LogCount,
    counted,
    failing_publishes,
    recorded_workers,
)
from helpers.faults import HeldLook, chat, poisoned_engines
from helpers.tiny_model import tiny_model
from helpers.workers import start_worker
from inference_worker.durable import ATTEMPTS
from inference_worker.job_queues import first_of
from inference_worker.job_stream import CONSUMER_NAME, STREAM_NAME, JobLimits, ensure_jobs_stream, job_consumers
from inference_worker.server_clock import ServerClock
from inference_worker.worker import EngineDied
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import ChatResponse, Subjects
from schemas.subjects import REPLY_TO, REQUEST_ID

pytestmark = pytest.mark.timeout(600)


async def test_a_job_waits_in_its_model_queue_while_the_model_restarts(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """Two durable models, alpha (the default) and beta; alpha's workers stop. A job naming no model was served by
    beta as "the only model on the bus", and a job naming alpha got a final 404, although alpha's job queue still
    had its consumer. Now both wait in alpha's queue, and alpha's next worker answers them."""
    alpha = await durable_worker(fresh_nats_server, served_model_name="alpha", default_model=True)
    beta = await durable_worker(fresh_nats_server, served_model_name="beta")
    try:
        await beta.directory.refresh(thorough=True)  # beta looks at the bus while alpha serves, as routing does
        await stop(alpha)
        await beta.directory.refresh(thorough=True)  # and again once alpha left: beta is the only model on the bus
        stored: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()
        await fresh_nc.subscribe("llm.jobs.model.alpha.chat", cb=stored.put)
        async with JobClient(fresh_nc) as jobs:
            unnamed = asyncio.create_task(jobs.chat(chat("no-model", max_tokens=2), timeout=300))
            to_alpha = msgspec.json.encode(chat("alpha's", max_tokens=2, model="alpha"))
            named = asyncio.create_task(jobs.submit("llm.jobs.chat", to_alpha, timeout=300))  # as the bridge sends it
            both_stored = asyncio.ensure_future(asyncio.gather(stored.get(), stored.get()))
            await asyncio.wait({unnamed, named, both_stored}, return_when=asyncio.FIRST_COMPLETED)
            for call in (unnamed, named):
                assert not call.done(), (
                    f"answered while alpha's workers were away: {call.exception() or call.result()!r}"
                )
            assert sorted(msg.headers[ATTEMPTS] for msg in both_stored.result()) == ["0", "0"]
            alpha = await durable_worker(fresh_nats_server, served_model_name="alpha", default_model=True)
            answers = [await unnamed, msgspec.json.decode((await named).data, type=ChatResponse)]
        assert [(a.chat_id, a.model) for a in answers] == [("no-model", "alpha"), ("alpha's", "alpha")]
    finally:
        await stop(beta)
        if not alpha.nc.is_closed:
            await stop(alpha)


async def test_a_worker_that_made_a_consumer_follows_the_terms_the_server_kept(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers start together with other --jobs-ack-wait: both find no consumer, both make it, and the last
    write holds. The first kept the settings its own write returned (30 s) and sent in-progress acks every 10 s
    against the server's 3 s. Now it reads the consumers back, and logs what differs from its flags."""
    other = await nats.connect(fresh_nats_server.url)
    try:
        js = LateWriter(fresh_nc.jetstream(), other.jetstream(), ack_wait=3.0)
        terms = await ensure_jobs_stream(js, JobLimits(ack_wait=30.0), job_consumers(Subjects(), "tiny"))  # type: ignore[arg-type]
    finally:
        await other.close()
    assert {name: t.ack_wait for name, t in terms.items()} == {CONSUMER_NAME: 3.0, f"{CONSUMER_NAME}-tiny": 3.0}
    assert "ack_wait 3.0 (this worker's flag: 30.0)" in caplog.text


async def test_a_worker_follows_an_ack_wait_set_on_the_server_after_it_started(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other worker's write can also land after this worker read the consumers back: it reads them again with
    the server's clock (every minute; every 0.5 s here), and its in-progress acks follow the server's ack wait, so
    a job held past it is not redelivered."""
    monkeypatch.setattr(ServerClock, "REFRESH_S", 0.5)
    worker = await durable_worker(fresh_nats_server, jobs_ack_wait=30.0, default_model=True)
    watch, look = ConsumerWatch(worker), HeldLook(worker)
    try:
        js = fresh_nc.jetstream()
        for name, filters in job_consumers(Subjects(), "tiny").items():
            await js.add_consumer(STREAM_NAME, JobLimits(ack_wait=2.0).consumer_config(name, filters))
        await watch.refreshes.later(2).wait()  # a whole read of the terms after the write
        assert {t.ack_wait for t in worker.jobs.queues.terms.values()} == {2.0}
        monkeypatch.setattr(ServerClock, "REFRESH_S", 60.0)
        await watch.launches.later(1).wait()  # the next refresh is a minute away: only the ack wait sets the pace
        acks = await AckWatch.on(fresh_nc)
        async with JobClient(fresh_nc) as jobs:
            typo = msgspec.json.encode(chat("typo", max_tokens=2, model="not-seen-yet"))
            unknown = asyncio.create_task(jobs.submit("llm.jobs.chat", typo, timeout=60))
            await look.looking.wait()  # held while it is routed
            await first_of(acks.in_progress.reached(5).wait(), watch.redelivered.wait())  # 5 x 0.67 s > 2 s
            look.release.set()
            with pytest.raises(BusError) as refused:
                await unknown
        assert refused.value.code == 404 and not watch.redelivered.is_set()
        assert worker.jobs.snapshot()["redelivered"] == 0
    finally:
        look.release.set()
        await stop(worker)


@pytest.mark.parametrize("deleted", ["stream", "consumer"])
async def test_a_job_queue_deleted_under_a_running_worker_is_made_again(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, deleted: str
) -> None:
    """The stream (or the model-less consumer) deleted while a worker runs: it logged `fetching jobs failed` every
    second, forever, and no job was answered again. Now it makes them again at its next fetch."""
    worker = await durable_worker(fresh_nats_server, default_model=True)
    js = fresh_nc.jetstream()
    try:
        made = await counted(fresh_nc, f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{STREAM_NAME}.{CONSUMER_NAME}")
        with LogCount("llmbus.jobs", "fetching jobs") as failed_fetches:
            if deleted == "stream":
                await js.delete_stream(STREAM_NAME)
            else:
                await js.delete_consumer(STREAM_NAME, CONSUMER_NAME)
            await first_of(made.reached(1).wait(), failed_fetches.reached(5).wait())
        assert made.count == 1, f"{failed_fetches.count} failed fetches, and the deleted {deleted} was not made again"
        async with JobClient(fresh_nc) as jobs:
            answer = await jobs.chat(chat("after", max_tokens=2), timeout=120)
        assert isinstance(answer, ChatResponse) and answer.chat_id == "after"
    finally:
        await stop(worker)


async def test_a_job_given_up_is_terminated_even_when_its_answer_cannot_be_published(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS
) -> None:
    """The delivery past the attempts only answers the error. When that publish raised, the job was marked
    abandoned, never terminated, and JetStream delivers it no more: it stayed in the queue, unanswered, until
    max_age. Now it is terminated all the same."""
    worker = await durable_worker(fresh_nats_server, jobs_max_deliver=1)
    watch, inbox = ConsumerWatch(worker), fresh_nc.new_inbox()
    failing_publishes(worker.nc, inbox)
    acks = await AckWatch.on(fresh_nc)
    try:
        used_up = {REQUEST_ID: "used-up", REPLY_TO: inbox, ATTEMPTS: "1"}  # stored again after its one attempt
        body = msgspec.json.encode(chat("used-up", max_tokens=2))
        await fresh_nc.jetstream().publish("llm.jobs.model.tiny.chat", body, headers=used_up)
        await watch.taken.reached(1).wait()
        assert await acks.settled(worker.nc) == [b"+TERM"]
        counts = worker.jobs.snapshot()
        assert (counts["given_up"], counts["abandoned"]) == (1, 0)
    finally:
        await stop(worker)


async def test_jobs_that_a_dying_engine_cuts_short_are_charged_a_delivery(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch job running and a job being routed when the engine dies: both answered `shutting_down` and were
    stored again uncharged, so a batch whose query kills every engine it reaches came back forever (until max_age).
    Now each is nak'd with a retryable 500: a delivery charged, and the delay before the next one."""
    armed, workers = poisoned_engines(monkeypatch), recorded_workers(monkeypatch)
    running = await start_worker(Config(nats_url=fresh_nats_server.url, durable=True, threads=1), tiny_model())
    (worker,) = workers
    look, taken = HeldLook(worker), JobWatch(worker)
    acks = await AckWatch.on(fresh_nc)
    try:
        inbox, js = fresh_nc.new_inbox(), fresh_nc.jetstream()
        batch = {"queries": [chat(f"q{q}", model="not-seen-yet") for q in range(2)]}
        headers = {REQUEST_ID: "batch", REPLY_TO: inbox}
        await js.publish("llm.jobs.chat.batched", msgspec.json.encode(batch), headers=headers)
        one = msgspec.json.encode(chat("routed", model="not-seen-yet"))
        await js.publish("llm.jobs.chat", one, headers={REQUEST_ID: "routed", REPLY_TO: inbox})
        await taken.took(2).wait()  # both wait for the held look at the bus
        assert worker.batches and worker.routing
        armed.set()
        killer = b'{"chat_id": "kill", "user_prompt": "hi", "max_tokens": 2}'
        await fresh_nc.request("llm.model.tiny.chat", killer, timeout=120)
        with pytest.raises(EngineDied):
            await running.task
        assert await acks.settled() == [b"-NAK", b"-NAK"]
        assert (await js.stream_info(STREAM_NAME)).state.last_seq == 2, "no copy of either job was stored"
    finally:
        look.release.set()
        if not running.task.done():
            await running.shutdown()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"jobs_max_deliver": 0}, "--jobs-max-deliver must be >= 1, got 0"),
        ({"jobs_ack_wait": -5}, "--jobs-ack-wait must be >= 1 s, got -5"),
        ({"jobs_ack_wait": 0.5}, "--jobs-ack-wait must be >= 1 s, got 0.5"),
        ({"jobs_max_age": 0}, "--jobs-max-age must be > 0 s, got 0"),
    ],
)
def test_job_limits_that_would_give_up_every_job_are_refused(options: dict[str, float], message: str) -> None:
    """`Config(jobs_max_deliver=0, jobs_ack_wait=-5)` was accepted, and every job was given up at once."""
    with pytest.raises(ValueError, match=message):
        Config(**options)  # type: ignore[arg-type]


def test_the_shortest_job_limits_are_accepted() -> None:
    config = Config(jobs_max_deliver=1, jobs_ack_wait=1.0, jobs_max_age=0.5)
    assert (config.jobs_max_deliver, config.jobs_ack_wait, config.jobs_max_age) == (1, 1.0, 0.5)
