"""Trace context across the bus: W3C headers from HTTP into NATS (core and durable) untouched without spans, and one
trace from the bridge into the worker with OpenTelemetry's in-memory exporter."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helpers.bridge import Bridge, running_bridge
from helpers.observability import spans_in_memory
from helpers.tiny_model import tiny_model
from helpers.workers import RunningWorker, start_worker
from llmbus import tracing
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
WORKER_PHASES = ("queue wait", "prefill", "decode", "reply")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans on, into memory, for this test only."""
    with spans_in_memory() as memory:
        yield memory


@contextlib.asynccontextmanager
async def watching(url: str, subject: str) -> AsyncIterator[asyncio.Queue[Msg]]:
    """Every message published on `subject`, as the workers receive it (a plain subscription beside theirs)."""
    nc = await nats.connect(url)
    seen: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe(subject, cb=seen.put)
    await flushed(nc)
    try:
        yield seen
    finally:
        await nc.close()


async def spans_named(memory: InMemorySpanExporter, *names: str, timeout: float = 10) -> list[ReadableSpan]:
    """The finished spans once every name has ended (the bridge's span ends after its last byte went out)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not set(names) <= {span.name for span in memory.get_finished_spans()}:
        assert asyncio.get_running_loop().time() < deadline, [span.name for span in memory.get_finished_spans()]
        await asyncio.sleep(0.02)
    return list(memory.get_finished_spans())


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


# --- propagation rules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "carried"),
    [
        (
            {"traceparent": TRACEPARENT, "tracestate": TRACESTATE},
            {"traceparent": TRACEPARENT, "tracestate": TRACESTATE},
        ),
        ({"Traceparent": TRACEPARENT}, {"traceparent": TRACEPARENT}),
        ({"traceparent": TRACEPARENT, "tracestate": "bad state\r\nInjected: yes"}, {"traceparent": TRACEPARENT}),
        ({"traceparent": TRACEPARENT + "\n"}, {}),
        ({"traceparent": TRACEPARENT.upper()}, {}),
        ({"traceparent": f"ff-{TRACE_ID}-{PARENT_ID}-01"}, {}),
        ({"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"}, {}),
        ({"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01"}, {}),
        ({"tracestate": TRACESTATE}, {}),
        (
            {"traceparent": TRACEPARENT, "tracestate": ",".join(f"k{i}=v" for i in range(33))},
            {"traceparent": TRACEPARENT},
        ),
        (None, {}),
    ],
)
def test_only_valid_trace_headers_are_carried(headers: dict[str, str] | None, carried: dict[str, str]) -> None:
    assert tracing.trace_headers(headers) == carried


def test_without_spans_the_headers_pass_through_untouched() -> None:
    assert not tracing.enabled()
    assert tracing.outgoing() == {}
    with tracing.server_span({"traceparent": TRACEPARENT, "tracestate": TRACESTATE}, "GET /x", {}):
        assert tracing.outgoing() == {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    assert tracing.outgoing() == {}


def test_propagation_works_without_opentelemetry_installed() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"  # import opentelemetry now fails, as when it is absent
        "from llmbus import tracing\n"
        f"with tracing.server_span({{'traceparent': '{TRACEPARENT}'}}, 'POST /chat', {{}}) as span:\n"
        "    span.update('POST /chat', {'http.route': '/chat'})\n"
        "    print(tracing.outgoing()['traceparent'], tracing.enabled())\n"
        "tracing.request_spans({}, tracing.Phase('worker request', 1.0, 2.0), [], {})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [TRACEPARENT, "False"]


def test_a_server_span_is_the_parent_of_what_is_published(exporter: InMemorySpanExporter) -> None:
    with tracing.server_span({"traceparent": TRACEPARENT, "tracestate": TRACESTATE}, "POST /chat", {}):
        sent = tracing.outgoing()
    (span,) = exporter.get_finished_spans()
    context = span.get_span_context()
    assert hex_id(context.trace_id, 32) == TRACE_ID and hex_id(span.parent.span_id, 16) == PARENT_ID
    assert sent == {"traceparent": f"00-{TRACE_ID}-{hex_id(context.span_id, 16)}-01", "tracestate": TRACESTATE}


def test_request_spans_have_their_real_times(exporter: InMemorySpanExporter) -> None:
    root = tracing.Phase("worker request", 100.0, 100.5)
    phases = [tracing.Phase("queue wait", 100.0, 100.1), tracing.Phase("prefill", 100.1, None)]
    tracing.request_spans({"traceparent": TRACEPARENT}, root, phases, {"gen_ai.request.model": "m"})
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"worker request", "queue wait"}  # a phase with an unknown end is left out
    request, wait = spans["worker request"], spans["queue wait"]
    assert request.end_time - request.start_time == pytest.approx(0.5e9, abs=1e3)
    assert wait.start_time == request.start_time and wait.end_time - wait.start_time == pytest.approx(0.1e9, abs=1e3)
    assert request.start_time == tracing.wall_ns(100.0)
    assert wait.parent.span_id == request.get_span_context().span_id
    assert hex_id(request.parent.span_id, 16) == PARENT_ID and request.attributes["gen_ai.request.model"] == "m"


# --- across the bus --------------------------------------------------------------------------------------------------


@pytest.mark.model
async def test_http_trace_headers_reach_the_worker_untouched(
    worker: RunningWorker, bridge: Bridge, http: httpx.AsyncClient, nats_server: NatsServer
) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    async with watching(nats_server.url, "llm.chat") as seen:
        answer = await http.post("/chat", json={"chat_id": "t", "user_prompt": "Hi", "max_tokens": 2}, headers=headers)
        assert answer.status_code == 200, answer.text
        message = await asyncio.wait_for(seen.get(), 10)
        assert (message.headers["traceparent"], message.headers["tracestate"]) == (TRACEPARENT, TRACESTATE)

        body = {"chat_id": "s", "user_prompt": "Hi", "max_tokens": 2, "stream": True}
        async with http.stream("POST", "/chat", json=body, headers=headers) as streamed:
            assert streamed.status_code == 200
            await streamed.aread()
        assert (await asyncio.wait_for(seen.get(), 10)).headers["traceparent"] == TRACEPARENT

        forged = {"traceparent": "00-not-a-trace", "tracestate": TRACESTATE}
        assert (
            await http.post("/chat", json={"chat_id": "f", "user_prompt": "Hi", "max_tokens": 1}, headers=forged)
        ).status_code == 200
        message = await asyncio.wait_for(seen.get(), 10)
        assert "traceparent" not in message.headers and "tracestate" not in message.headers


@pytest.mark.model
async def test_one_http_request_is_one_trace_from_the_bridge_into_the_worker(
    worker: RunningWorker, bridge: Bridge, http: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    body = {"chat_id": "t", "user_prompt": "What is the capital of France?", "max_tokens": 8}
    answer = await http.post("/chat", json=body, headers={"traceparent": TRACEPARENT})
    assert answer.status_code == 200, answer.text
    spans = await spans_named(exporter, "POST /chat", "worker request", *WORKER_PHASES)
    assert {hex_id(span.get_span_context().trace_id, 32) for span in spans} == {TRACE_ID}
    by_name = {span.name: span for span in spans}
    bridge_span, request = by_name["POST /chat"], by_name["worker request"]
    assert hex_id(bridge_span.parent.span_id, 16) == PARENT_ID
    assert (
        bridge_span.attributes["http.route"] == "/chat" and bridge_span.attributes["http.response.status_code"] == 200
    )
    assert request.parent.span_id == bridge_span.get_span_context().span_id
    assert request.attributes["gen_ai.usage.output_tokens"] == answer.json()["usage"]["completion_tokens"]
    for name in WORKER_PHASES:
        assert by_name[name].parent.span_id == request.get_span_context().span_id, name
    assert bridge_span.start_time <= request.start_time <= request.end_time <= bridge_span.end_time
    ordered = [by_name[name] for name in WORKER_PHASES]
    assert all(a.end_time <= b.start_time + 1000 for a, b in itertools.pairwise(ordered))


@pytest.fixture
async def durable_pair(fresh_nats_server: NatsServer) -> AsyncIterator[Bridge]:
    """A durable tiny-model worker and a durable bridge on a server of their own."""
    config = Config(nats_url=fresh_nats_server.url, durable=True, request_timeout=60)
    running = await start_worker(config, tiny_model())
    try:
        async with running_bridge(config) as bridge:
            yield bridge
    finally:
        await running.shutdown()


async def test_durable_jobs_carry_the_trace_to_the_worker(
    durable_pair: Bridge, fresh_nats_server: NatsServer, exporter: InMemorySpanExporter
) -> None:
    async with watching(fresh_nats_server.url, "llm.jobs.chat") as seen, durable_pair.client() as http:
        body = {"chat_id": "d", "user_prompt": "Hi", "max_tokens": 3}
        answer = await http.post("/chat", json=body, headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
        assert answer.status_code == 200, answer.text
        job = await asyncio.wait_for(seen.get(), 10)
    spans = await spans_named(exporter, "POST /chat", "worker request")
    by_name = {span.name: span for span in spans}
    bridge_id = hex_id(by_name["POST /chat"].get_span_context().span_id, 16)
    assert job.headers["traceparent"] == f"00-{TRACE_ID}-{bridge_id}-01" and job.headers["tracestate"] == TRACESTATE
    request = by_name["worker request"]  # the worker read the trace from the job's own headers
    assert hex_id(request.get_span_context().trace_id, 32) == TRACE_ID
    assert hex_id(request.parent.span_id, 16) == bridge_id


async def test_durable_jobs_carry_the_headers_untouched_without_spans(
    durable_pair: Bridge, fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    async with watching(fresh_nats_server.url, "llm.jobs.chat") as seen, durable_pair.client() as http:
        body = {"chat_id": "d", "user_prompt": "Hi", "max_tokens": 2}
        answer = await http.post("/chat", json=body, headers={"traceparent": TRACEPARENT})
        assert answer.status_code == 200, answer.text
        job = await asyncio.wait_for(seen.get(), 10)
    assert job.headers["traceparent"] == TRACEPARENT and "tracestate" not in job.headers
