"""Durable jobs, from a later review: an error answer on a job's last attempt (or past it) is encoded as the job was,
MessagePack included; another stored message with the key of a job running here is a 409, not adopted into it; and
a job answered without running (an invalid request id, a delivery past its attempts) leaves the log line, span and
failure count of a refused request.

Real tiny-model workers on a real nats-server with JetStream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import nats
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helpers.durable_jobs import durable_worker, stop
from helpers.durable_restarts import AckWatch, ConsumerWatch
from helpers.faults import HeldLook, chat, wait_until
from helpers.observability import at_info, lines_of, spans_in_memory
from inference_worker.durable import ATTEMPTS
from inference_worker.job_stream import STREAM_NAME
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import ChatResponse, ErrorBody, Subjects
from schemas.subjects import CONTENT_TYPE, ERROR_CODE, ERROR_NAME, MSGPACK, REPLY_TO, REQUEST_ID

pytestmark = pytest.mark.timeout(600)

FORGED_ID = "forged id=x code=200"  # no valid id (spaces, `=`): user text, never logged


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans on, into memory, for this test only."""
    with spans_in_memory() as memory:
        yield memory


async def stream_is_empty(nc: nats.NATS) -> bool:
    return (await nc.jetstream().stream_info(STREAM_NAME)).state.messages == 0


# --- defect 1: an error answer on the last attempt is encoded as the job was ------------------------------------------


@pytest.mark.parametrize("case", ["fails on its last attempt", "past its attempts"])
async def test_a_msgpack_jobs_last_error_answer_is_msgpack(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """One attempt per job. A 500 on the last attempt was answered with `Content-Type: application/msgpack` and a
    JSON body (re-encoded with the "giving up" note), which a MessagePack client could not decode; the answer to a
    delivery past its attempts was JSON too. Now both are MessagePack, as the job was."""
    worker = await durable_worker(fresh_nats_server, jobs_max_deliver=1)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("broken engine")

    monkeypatch.setattr(worker.engine, "add_request", broken)  # in the engine thread: a 500 for this request only
    inbox = fresh_nc.new_inbox()
    answers = await fresh_nc.subscribe(inbox)
    try:
        headers = {REQUEST_ID: "packed", REPLY_TO: inbox, CONTENT_TYPE: MSGPACK}
        if case == "past its attempts":
            headers[ATTEMPTS] = "1"  # stored again after its one attempt
        body = msgspec.msgpack.encode(chat("packed", max_tokens=2))
        await fresh_nc.jetstream().publish(Subjects().model_jobs_chat("tiny"), body, headers=headers)
        reply = await answers.next_msg(timeout=60)
        assert reply.headers[ERROR_CODE] == "500" and reply.headers[CONTENT_TYPE] == MSGPACK
        error = msgspec.msgpack.decode(reply.data, type=ErrorBody)
        assert error.code == 500 and "giving up" in error.error
        if case == "fails on its last attempt":
            assert "broken engine" in error.error
    finally:
        await answers.unsubscribe()
        await stop(worker)


# --- defect 2: another message with the key of a running job is a 409, not adopted --------------------------------


async def test_another_message_with_the_key_of_a_running_job_is_a_409_and_does_not_come_back(
    fresh_nats_server: NatsServer, fresh_nc: nats.NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """A client stores its job again with the same request id after JetStream's de-duplication window (here: with
    no `Nats-Msg-Id`) while the first still runs. The worker adopted the second message into the running job: the
    first's answer acked the second, and the first, left unacked, came back after ack_wait to run again (a second
    answer) or be given up (a 500 after a success). Now the second is answered 409 and acked; the first is answered
    once by the engine, and the queue is empty. The first waits for a held look at the bus (it names no model, at a
    worker that is not the default) until the test lets it go."""
    at_info(caplog)
    worker = await durable_worker(fresh_nats_server)
    look, watch = HeldLook(worker), ConsumerWatch(worker)
    acks = await AckWatch.on(fresh_nc)
    inbox = fresh_nc.new_inbox()
    answers = await fresh_nc.subscribe(inbox)
    try:
        js, headers = fresh_nc.jetstream(), {REQUEST_ID: "twice", REPLY_TO: inbox}
        body = msgspec.json.encode(chat("twice", max_tokens=2))
        first = await js.publish("llm.jobs.chat", body, headers=headers)
        await look.looking.wait()  # the first job is held, waiting for its route
        second = await js.publish("llm.jobs.chat", body, headers=headers)
        assert second.seq != first.seq and not second.duplicate
        await watch.taken.reached(2).wait()
        await flushed(worker.nc)  # the worker's answer reached the server, which relays it before this flush's answer
        await flushed(fresh_nc)
        assert answers.pending_msgs == 1, "the second message was not answered while the first runs"
        refused = await answers.next_msg(timeout=1)
        assert refused.headers[ERROR_CODE] == "409" and refused.headers[ERROR_NAME] == "duplicate_request"
        assert refused.headers[REQUEST_ID] == "twice"
        assert "already running" in msgspec.json.decode(refused.data, type=ErrorBody).error
        look.release.set()
        answer = await answers.next_msg(timeout=120)
        assert ERROR_CODE not in (answer.headers or {})
        assert msgspec.json.decode(answer.data, type=ChatResponse).chat_id == "twice"
        assert await acks.settled(worker.nc) == [b"", b""], "each message is acked once"
        await wait_until(lambda: stream_is_empty(fresh_nc), 5, "both messages to leave the queue")
        counts = worker.jobs.snapshot()
        assert (counts["answered"], counts["refused"], counts["redelivered"], counts["held"]) == (1, 1, 0, 0)
        assert [line["code"] for line in lines_of(caplog, "twice")] == [409, 200]
    finally:
        look.release.set()
        await answers.unsubscribe()
        await stop(worker)
    assert answers.pending_msgs == 0, "a second answer came"


# --- defect 3: jobs answered without running leave a log line, a span and a failure count -----------------------------


async def test_a_job_with_an_invalid_id_and_one_past_its_attempts_each_leave_a_log_line_and_a_span(
    fresh_nats_server: NatsServer,
    fresh_nc: nats.NATS,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 400 for an invalid request id and the 500 for a delivery past its attempts were answered by the job
    consumer itself: no request log line, no span, no failure count, unlike every other refused request. Now each
    leaves them, the invalid id (user text) logged as the job's stream sequence, never as sent."""
    at_info(caplog)
    worker = await durable_worker(fresh_nats_server, jobs_max_deliver=1)
    watch = ConsumerWatch(worker)
    inbox = fresh_nc.new_inbox()
    answers = await fresh_nc.subscribe(inbox)
    try:
        js, subject = fresh_nc.jetstream(), Subjects().model_jobs_chat("tiny")
        body = msgspec.json.encode(chat("c", max_tokens=2))
        await js.publish(subject, body, headers={REQUEST_ID: FORGED_ID, REPLY_TO: inbox})
        await js.publish(subject, body, headers={REQUEST_ID: "used-up", REPLY_TO: inbox, ATTEMPTS: "1"})
        codes = {}
        for _ in range(2):
            reply = await answers.next_msg(timeout=60)
            codes[reply.headers[REQUEST_ID]] = reply.headers[ERROR_CODE]
        await watch.taken.reached(2).wait()  # both taken in full: their lines are written
    finally:
        await answers.unsubscribe()
        await stop(worker)
    assert codes == {"job-1": "400", "used-up": "500"}
    assert [line["code"] for line in lines_of(caplog, "job-1")] == [400]
    assert [line["code"] for line in lines_of(caplog, "used-up")] == [500]
    spans = [s for s in exporter.get_finished_spans() if s.name == "worker request"]
    assert sorted((s.attributes["llmbus.request_id"], s.attributes["llmbus.code"]) for s in spans) == [
        ("job-1", 400),
        ("used-up", 500),
    ]
    assert worker.metrics.summary()["request_failure_total"] == {"400": 1.0, "500": 1.0}
    assert "forged" not in caplog.text
