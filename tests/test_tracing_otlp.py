"""Real span export: a bridge and a worker started as an operator starts them (`python -m llmbus.cli gateway|worker`,
the OTLP settings in the standard OTEL_* variables) send their spans over OTLP/HTTP to a collector (a tiny receiver
on loopback), as one trace under the caller's `traceparent`, without the prompt."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from helpers.faults import WorkerProcess, subprocess_env
from helpers.otlp_receiver import OtlpReceiver, ReceivedSpan
from helpers.tiny_model import save_model_directory, tiny_model
from llmbus.nats_server import NatsServer, free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
WORKER_PHASES = ("queue wait", "prefill", "decode", "reply")
BRIDGE_SERVICE, WORKER_SERVICE = "llmbus-gateway", "llmbus-worker"  # `llmbus gateway|worker`: setup_from_env's names
SECRET = "heliotrope-walrus-5821"  # in the prompt only: no exported span may carry it
PROMPT = f"Tell me everything about the {SECRET} in one sentence."
READY_TIMEOUT_S = 120.0
EXPORT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def otlp_env(endpoint: str, protocol: str = "http/protobuf") -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # milliseconds: batches go out soon after a span ends
    }


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama (with SmolLM2's tokenizer) saved as a model directory, for `worker --model`."""
    return save_model_directory(tiny_model(), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


async def stop(process: WorkerProcess) -> None:
    """SIGTERM (the process flushes its spans and exits), SIGKILL if it has not exited in time."""
    if process.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(TimeoutError):
            await process.wait(STOP_TIMEOUT_S)
    await process.ensure_stopped()


@pytest.fixture
async def traced_stack(
    fresh_nats_server: NatsServer, receiver: OtlpReceiver, tiny_model_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[str, list[WorkerProcess]]]:
    """A worker and an HTTP bridge, each its own process exporting to `receiver`: (the bridge's URL, the processes)."""
    url, env, http_port = fresh_nats_server.url, otlp_env(receiver.endpoint), free_port()
    worker_env = env | {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}  # the bridge's exports stay uncompressed
    processes = [await WorkerProcess.start(url, tmp_path, "worker", "--model", str(tiny_model_dir), env=worker_env)]
    try:
        bridge_flags = ("--http-host", "127.0.0.1", "--http-port", str(http_port))
        processes.append(await WorkerProcess.start(url, tmp_path, "gateway", *bridge_flags, part="gateway", env=env))
        for process in processes:  # both load at once; wait for each in turn
            await process.wait_ready(READY_TIMEOUT_S)
        yield f"http://127.0.0.1:{http_port}", processes
    finally:
        await asyncio.gather(*(stop(process) for process in processes))


def ancestry(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[str]:
    """The span ids above `span`, nearest first, ending with the first parent that is not among `spans`."""
    by_id = {s.span_id: s for s in spans}
    chain = []
    while span.parent_span_id:
        chain.append(span.parent_span_id)
        if span.parent_span_id not in by_id or len(chain) > len(spans):
            break
        span = by_id[span.parent_span_id]
    return chain


async def test_the_bridge_and_the_worker_export_one_trace_over_otlp_http(
    traced_stack: tuple[str, list[WorkerProcess]], receiver: OtlpReceiver
) -> None:
    bridge_url, processes = traced_stack
    body = {"chat_id": "otlp", "user_prompt": PROMPT, "max_tokens": 8}
    async with httpx.AsyncClient(base_url=bridge_url, timeout=60, trust_env=False) as http:
        answer = await http.post("/chat", json=body, headers={"traceparent": TRACEPARENT})
    assert answer.status_code == 200, answer.text

    wanted = {(BRIDGE_SERVICE, "POST /chat"), (WORKER_SERVICE, "worker request")}
    wanted |= {(WORKER_SERVICE, phase) for phase in WORKER_PHASES}
    try:
        spans = await asyncio.to_thread(
            receiver.wait_for, lambda got: wanted <= {(s.service, s.name) for s in got}, EXPORT_TIMEOUT_S
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(p.log_tail() for p in processes)) from None

    assert receiver.refused == []
    assert sorted((s.service, s.name) for s in spans) == sorted(wanted)  # one request: exactly its spans
    assert {s.trace_id for s in spans} == {TRACE_ID}
    by_name = {s.name: s for s in spans}
    bridge_span, request = by_name["POST /chat"], by_name["worker request"]
    assert bridge_span.parent_span_id == PARENT_ID
    assert bridge_span.attributes["http.route"] == "/chat"
    assert bridge_span.attributes["http.response.status_code"] == 200
    assert ancestry(request, spans) == [bridge_span.span_id, PARENT_ID]
    for phase in WORKER_PHASES:
        assert ancestry(by_name[phase], spans) == [request.span_id, bridge_span.span_id, PARENT_ID], phase
    assert request.attributes["gen_ai.usage.output_tokens"] == answer.json()["usage"]["completion_tokens"]

    for span in spans:
        for key, value in span.attributes.items():
            assert SECRET not in str(value), f"{span.service} span {span.name!r} attribute {key} carries the prompt"
    assert receiver.bodies and not any(SECRET.encode() in exported for exported in receiver.bodies)


@pytest.mark.parametrize(
    ("part", "variable"),
    [
        ("worker", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ("gateway", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ("worker", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),  # it wins over a valid general one, and is named
    ],
)
async def test_an_unsupported_otlp_protocol_stops_the_start_with_a_clear_message(
    part: str, variable: str, tmp_path: Path
) -> None:
    # Nothing listens on the NATS URL: the process must fail on its tracing settings, before it connects.
    command = [sys.executable, "-m", "llmbus.cli", part, "--nats-url", f"nats://127.0.0.1:{free_port()}"]
    env = subprocess_env() | otlp_env(f"http://127.0.0.1:{free_port()}", protocol="http/protobuf")
    env[variable] = "http/json"
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2, err.decode()
    message = f"llmbus: error: unsupported {variable} 'http/json': use grpc or http/protobuf"
    assert message in err.decode()
    assert b"llmbus: ready" not in out
