"""What a worker counts, logs and traces, from a review of its observability: a durable job that a stopping worker
puts back on its queue is no answer there (neither a failure, a latency, a log line nor a span), and an answer that
could not be published is no success; a request refused at intake leaves its log line and span; a request's times
count from its arrival, a look at the bus included; `$SRV.STATS` names the decode step's compile state.

Real tiny-model workers on a real nats-server (JetStream for the durable jobs); spans into memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import nats
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bus_gateway.client import BusClient
from bus_gateway.jobs import JobClient
from helpers.durable_jobs import durable_worker, stop
from helpers.faults import HeldLook, chat
from helpers.observability import HoldWatch, at_info, lines_of, request_lines, spans_in_memory
from helpers.tiny_model import tiny_model
from inference_worker.engine import EngineConfig, LLMEngine
from inference_worker.held import Held
from inference_worker.metrics import WorkerMetrics
from inference_worker.model_loader import LoadedModel
from inference_worker.worker import Worker
from llmbus import tracing
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import Subjects, WireError
from schemas.subjects import ERROR_CODE, REPLY_TO, REQUEST_ID

pytestmark = pytest.mark.timeout(600)

LONG = 400  # tokens: a job the never-ending model is still generating when its worker stops
SECRET = "ultramarine-pangolin-3141"  # in prompts only: no log line or span may carry it
FORGED_ID = "forged id=x code=200"  # no valid id (spaces, `=`): logged, it would forge the line's fields
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def never_ends() -> LoadedModel:
    return tiny_model(eos_token_ids=frozenset())


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans on, into memory, for this test only."""
    with spans_in_memory() as memory:
        yield memory


def request_spans(memory: InMemorySpanExporter, request_id: str) -> list[ReadableSpan]:
    """The `worker request` spans of `request_id` (a request's span and its phases are emitted together)."""
    spans = memory.get_finished_spans()
    return [s for s in spans if s.name == "worker request" and s.attributes["llmbus.request_id"] == request_id]


def children(memory: InMemorySpanExporter, parent: ReadableSpan) -> dict[str, ReadableSpan]:
    spans = memory.get_finished_spans()
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}


@pytest.fixture
async def client_nc(fresh_nats_server: NatsServer) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(fresh_nats_server.url)
    yield conn
    await conn.close()


# --- defect 1: only an answer published counts as answered ---------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [(None, "requeued"), (WireError.of("internal", "the engine died: RuntimeError('boom')"), "redelivered")],
    ids=["stopped: stored again", "engine died: nak'd for redelivery"],
)
async def test_a_job_a_stopping_worker_puts_back_is_no_answer_there(
    fresh_nats_server: NatsServer,
    client_nc: nats.NATS,
    never_ends: LoadedModel,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    failure: WireError | None,
    outcome: str,
) -> None:
    """The worker generating a job stops (503 shutting_down: the job is stored again) or its engine dies (500: the
    job is nak'd for another delivery). Neither publishes anything, yet the job counted as a 503 or 500 failure,
    with an e2e latency, a log line and a span, before another worker answered the same id with 200. Now it counts
    in `request_unanswered_total{outcome}` only, and the id's one log line and span are the 200's."""
    at_info(caplog)
    first = await durable_worker(fresh_nats_server, never_ends, max_batch_size=1, max_tokens_cap=LONG)
    holds = HoldWatch(first)
    async with JobClient(client_nc) as jobs:
        job = chat("put-back", max_tokens=LONG, model="tiny")
        call = asyncio.create_task(jobs.chat(job, timeout=300, request_id="put-back"))
        await holds.holding.wait()  # the engine runs it
        await first.close(failure)
        await first.nc.close()
        assert first.jobs.snapshot()["requeued"] == 1, "the job ended on the first worker before it stopped"
        figures = first.metrics.summary()
        assert figures["request_unanswered_total"] == {outcome: 1}
        assert figures["request_failure_total"] == {} and first.outbox.errors_by_code == {}
        assert figures["request_success_total"] == {} and figures["e2e_request_latency_seconds"]["count"] == 0
        assert lines_of(caplog, "put-back") == [] and request_spans(exporter, "put-back") == []
        second = await durable_worker(fresh_nats_server, never_ends, max_tokens_cap=LONG)
        try:
            answer = await call
        finally:
            await stop(second)
    assert answer.chat_id == "put-back" and answer.usage.completion_tokens == LONG
    [line] = lines_of(caplog, "put-back")
    [span] = request_spans(exporter, "put-back")
    assert line["code"] == 200 == span.attributes["llmbus.code"]


async def test_an_answer_that_cannot_be_published_is_no_success(
    fresh_nats_server: NatsServer, never_ends: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer that cannot be published (the client gets nothing) counted as a success, with its latencies and a
    200 log line. Now it counts as `abandoned`, and leaves no 200 line. Its publish fails because the worker's
    connection is closed once the engine holds the request (an answer over the server's max payload, the review's
    case, is now a 413: tests/test_answer_size.py)."""
    at_info(caplog)
    worker = await durable_worker(fresh_nats_server, never_ends, durable=False)
    closing: list[asyncio.Task[None]] = []
    hold = worker.held.hold

    def hold_then_close(held: Held) -> None:
        hold(held)  # the engine has it once this returns; its answer comes later, on this loop, after the close
        closing.append(asyncio.ensure_future(worker.nc.close()))

    worker.held.hold = hold_then_close  # type: ignore[method-assign]
    nc = await nats.connect(fresh_nats_server.url)
    try:
        inbox = nc.new_inbox()
        answers = await nc.subscribe(inbox)
        body = msgspec.json.encode(chat("unpublished", max_tokens=8))
        await nc.publish(Subjects().model_chat("tiny"), body, reply=inbox, headers={REQUEST_ID: "unpublished"})
        await worker.drain(300)  # returns once the request is done
        assert closing and worker.nc.is_closed
        await flushed(nc)  # an answer published before the worker closed would be here by now
        assert answers.pending_msgs == 0
    finally:
        await nc.close()
    figures = worker.metrics.summary()
    assert figures["request_success_total"] == {} and figures["e2e_request_latency_seconds"]["count"] == 0
    assert figures["request_unanswered_total"] == {"abandoned": 1}
    assert lines_of(caplog, "unpublished") == []


# --- defect 2: a request refused at intake leaves its log line and span ------------------------------------------


async def refused_code(nc: nats.NATS, subject: str, body: bytes, request_id: str, **headers: str) -> str:
    """The error code of the answer to a core request."""
    reply = await nc.request(subject, body, headers={REQUEST_ID: request_id, **headers}, timeout=60)
    return reply.headers[ERROR_CODE]


async def test_requests_refused_at_intake_leave_a_log_line_and_a_span_without_the_prompt(
    fresh_nats_server: NatsServer,
    client_nc: nats.NATS,
    never_ends: LoadedModel,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Invalid bodies, an invalid request id, the wrong model, an overloaded worker and an invalid durable job were
    answered with their error but left no log line and no span (the README promises one line per answered request,
    with its code). An invalid id is user text: its line says `-`."""
    at_info(caplog)
    worker = await durable_worker(fresh_nats_server, never_ends, max_pending=1, max_tokens_cap=LONG)
    subjects, secret_chat = Subjects(), msgspec.json.encode(chat("c", user_prompt=SECRET))
    try:
        inbox = client_nc.new_inbox()
        answers = await client_nc.subscribe(inbox)
        job_headers = {REQUEST_ID: "bad-job", REPLY_TO: inbox}
        await client_nc.jetstream().publish(subjects.jobs_chat, b"{" + SECRET.encode(), headers=job_headers)
        assert (await answers.next_msg(timeout=60)).headers[ERROR_CODE] == "400"
        bad = b"{" + SECRET.encode()
        codes = {"bad-body": await refused_code(client_nc, subjects.chat, bad, "bad-body", traceparent=TRACEPARENT)}
        codes["-"] = await refused_code(client_nc, subjects.chat, secret_chat, FORGED_ID)
        other = msgspec.json.encode(chat("o", user_prompt=SECRET, model="other"))
        codes["wrong-model"] = await refused_code(client_nc, subjects.model_chat("tiny"), other, "wrong-model")
        codes["bad-batch"] = await refused_code(client_nc, subjects.chat_batched, b"[", "bad-batch")
        bus = BusClient(client_nc)
        held = bus.stream(chat("long", max_tokens=LONG, user_prompt=SECRET), request_id="long")
        await anext(held)  # the accepted chunk: the worker holds it, and max_pending is 1
        codes["overloaded"] = await refused_code(client_nc, subjects.chat, secret_chat, "overloaded")
        await held.aclose()
    finally:
        await stop(worker)
    assert codes == {"bad-body": "400", "-": "400", "wrong-model": "400", "bad-batch": "400", "overloaded": "503"}
    lines = {line["request_id"]: line for line in request_lines(caplog) if line["request_id"] != "long"}
    assert {name: str(line["code"]) for name, line in lines.items()} == {**codes, "bad-job": "400"}
    for line in lines.values():
        assert line["model"] == "tiny" and line["total_s"] >= 0 and line["prompt_tokens"] is None
    assert lines["bad-body"]["trace_id"] == TRACE_ID
    [span] = request_spans(exporter, "bad-body")
    assert span.context.trace_id == int(TRACE_ID, 16) and span.parent.span_id == int(PARENT_ID, 16)
    assert span.attributes["llmbus.code"] == 400 and span.start_time <= span.end_time
    traced = {s.attributes["llmbus.request_id"] for s in exporter.get_finished_spans() if s.name == "worker request"}
    assert traced >= set(lines)
    assert SECRET not in caplog.text and "forged" not in caplog.text
    for span in exporter.get_finished_spans():
        assert SECRET not in str(dict(span.attributes)) and "forged" not in str(dict(span.attributes))


# --- defect 3: times count from the message's arrival, a look at the bus included ------------------------------


async def test_a_requests_times_count_from_its_arrival_before_a_look_at_the_bus(
    fresh_nats_server: NatsServer, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that names no model, at a worker that is not the default, waits for a thorough look at the bus
    (the whole discovery window) before it is routed. Its times counted from after the look: queue time, e2e,
    the log line's total and the span left the look out. The look is held here until the test lets it go."""
    at_info(caplog)
    worker = await durable_worker(fresh_nats_server, durable=False)
    look, holds = HeldLook(worker), HoldWatch(worker)
    bus = await BusClient.connect(fresh_nats_server.url)
    try:
        call = asyncio.create_task(bus.chat(chat("routed", max_tokens=2), request_id="routed"))
        await look.looking.wait()
        looked_at = time.monotonic()  # the request arrived before its look began
        await flushed(bus.nc)  # a round trip to the server while the look is held
        released_at = time.monotonic()
        look.release.set()
        assert (await call).chat_id == "routed"
    finally:
        look.release.set()
        await bus.close()
        await stop(worker)
    held_for = released_at - looked_at
    [held] = holds.held
    assert held.received <= looked_at
    [span] = request_spans(exporter, "routed")
    assert span.start_time <= tracing.wall_ns(looked_at)
    assert children(exporter, span)["queue wait"].end_time >= tracing.wall_ns(released_at)
    figures = worker.metrics.summary()
    assert figures["request_queue_time_seconds"]["sum"] >= held_for
    assert figures["e2e_request_latency_seconds"]["sum"] >= held_for
    [line] = lines_of(caplog, "routed")
    assert line["total_s"] >= held_for - 1e-4 and line["ttft_s"] >= held_for - 1e-4  # (rounded to 0.1 ms)


# --- defect 4: $SRV.STATS names the compile state -------------------------------------------------------------


def test_stats_name_the_decode_steps_compile_state(never_ends: LoadedModel) -> None:
    """`decode_compile_state` in `$SRV.STATS` summed the one-hot series: always 1.0, whatever the state."""
    metrics = WorkerMetrics("tiny", "w")
    assert "decode_compile_state" not in metrics.summary()  # no engine yet
    metrics.watch(LLMEngine(never_ends, EngineConfig(max_batch_size=2, max_seq_len=64)))
    assert metrics.summary()["decode_compile_state"] == "off"


async def test_a_workers_stats_carry_the_compile_state_by_name(fresh_nats_server: NatsServer) -> None:
    worker: Worker = await durable_worker(fresh_nats_server, durable=False)
    try:
        assert worker.stats()["metrics"]["decode_compile_state"] == "off"
    finally:
        await stop(worker)
