"""Backpressure: a worker bounds what it holds. Core requests beyond `max_pending` get an immediate 503; a durable
worker pulls only as many jobs as it has free slots; a request whose deadline passed before it started never runs."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats
import pytest

from bus_gateway.jobs import JobClient
from helpers.faults import FaultFigures, chat, engine_data, serving, stats_of
from helpers.workers import start_worker
from inference_worker.job_stream import CONSUMER_NAME, STREAM_NAME
from inference_worker.model_loader import LoadedModel
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import ChatResponse
from schemas.subjects import ERROR, ERROR_CODE, REQUEST_ID

LONG_PROMPT = "Count from 1 to 300, one number per line."


@pytest.mark.model
async def test_requests_beyond_max_pending_get_an_immediate_503(nats_server: NatsServer, smollm: LoadedModel) -> None:
    config = Config(nats_url=nats_server.url, subject_prefix="bp", max_pending=2, max_tokens_cap=16)
    worker = await start_worker(config, smollm)
    nc = await nats.connect(nats_server.url)
    try:
        bodies = [msgspec.json.encode(chat(f"bp-{i}", max_tokens=8, user_prompt=LONG_PROMPT)) for i in range(6)]
        started = time.monotonic()
        refused_after: list[float] = []
        arrivals: list[str] = []  # "503" or "answer", in the order the replies came

        async def one(body: bytes) -> nats.aio.msg.Msg:
            reply = await nc.request("bp.chat", body, timeout=120)
            if (reply.headers or {}).get(ERROR_CODE):
                refused_after.append(time.monotonic() - started)
            arrivals.append((reply.headers or {}).get(ERROR_CODE) or "answer")
            return reply

        replies = await asyncio.gather(*(one(body) for body in bodies))
        refused = [r for r in replies if (r.headers or {}).get(ERROR_CODE) == "503"]
        answered = [msgspec.json.decode(r.data, type=ChatResponse) for r in replies if not (r.headers or {}).get(ERROR)]
        assert len(refused) + len(answered) == 6
        assert len(answered) >= 2 and len(refused) >= 1
        assert all("max_pending" in r.headers[ERROR] and "overloaded" in r.headers[ERROR] for r in refused)
        first_answer = arrivals.index("answer")
        assert "503" not in arrivals[first_answer:], f"an overload answer waited for generation: {arrivals}"
        FaultFigures(
            "overload_503",
            sent=6,
            answered=len(answered),
            errored=len(refused),
            notes={"slowest_503_s": round(max(refused_after), 3), "max_pending": 2},
        ).record()
    finally:
        await nc.close()
        await worker.shutdown()


@pytest.mark.model
async def test_a_request_whose_deadline_passed_while_queued_is_never_started(
    nats_server: NatsServer, smollm: LoadedModel
) -> None:
    config = Config(nats_url=nats_server.url, subject_prefix="dl", max_batch_size=1, max_tokens_cap=256)
    worker = await start_worker(config, smollm)
    nc = await nats.connect(nats_server.url)
    try:
        long_one = msgspec.json.encode(chat("dl-long", max_tokens=256, user_prompt=LONG_PROMPT, timeout=120))
        impatient = msgspec.json.encode(chat("dl-short", max_tokens=4, timeout=0.1))
        long_inbox, short_inbox = await nc.subscribe(nc.new_inbox()), await nc.subscribe(nc.new_inbox())
        # in this order on one connection: the long one takes the only row, the impatient one waits behind it
        await nc.publish("dl.chat", long_one, reply=long_inbox.subject, headers={REQUEST_ID: "dl-long"})
        await nc.publish("dl.chat", impatient, reply=short_inbox.subject)
        short_reply = await short_inbox.next_msg(timeout=60)
        assert short_reply.headers[ERROR_CODE] == "504"
        assert short_reply.headers[ERROR] == "deadline exceeded before generation started"
        cancel = {"Llmbus-Reply-To": long_inbox.subject}  # a cancel names the request's reply subject and id
        await nc.publish("dl.cancel.dl-long", b"", headers=cancel)  # the long one has made its point
        long_reply = await long_inbox.next_msg(timeout=60)
        assert not (long_reply.headers or {}).get(ERROR), long_reply.headers
        assert msgspec.json.decode(long_reply.data, type=ChatResponse).finish_reason == "cancelled"
        (stats,) = await stats_of(nc, serving("dl."), count=1)
        assert engine_data(stats)["prefill_batch_sizes"] == {"1": 1}, "only the long request was ever prefilled"
    finally:
        await nc.close()
        await worker.shutdown()


@pytest.mark.model
async def test_a_durable_worker_pulls_only_its_free_slots(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, smollm: LoadedModel
) -> None:
    config = Config(nats_url=fresh_nats_server.url, durable=True, max_batch_size=2, max_tokens_cap=16)
    worker = await start_worker(config, smollm)
    jobs = JobClient(fresh_nc)
    js = fresh_nc.jetstream()
    try:
        calls = [asyncio.create_task(jobs.chat(chat(f"pull-{i}", max_tokens=6), timeout=120)) for i in range(6)]
        most_in_flight = 0
        while not all(call.done() for call in calls):  # sample the consumer while the jobs run
            info = await js.consumer_info(STREAM_NAME, CONSUMER_NAME)
            most_in_flight = max(most_in_flight, info.num_ack_pending)
            await asyncio.wait(calls, timeout=0.05)
        answers = [call.result() for call in calls]
        assert sorted(a.chat_id for a in answers) == [f"pull-{i}" for i in range(6)]
        assert 1 <= most_in_flight <= 2, f"a worker with 2 free slots held {most_in_flight} jobs"
        assert jobs.duplicates == 0
        FaultFigures(
            "durable_pull_free_slots",
            sent=6,
            answered=len(answers),
            notes={"most_jobs_held": most_in_flight, "max_batch_size": 2},
        ).record()
    finally:
        await jobs.close()
        await worker.shutdown()
