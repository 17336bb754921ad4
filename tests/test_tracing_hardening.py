"""Span export settings and shutdown, from a review of the tracing setup: a collector that accepts but never answers
cannot hold up a process's exit, and `OTEL_TRACES_EXPORTER` exports where it says (`otlp`, `console`) or stops
the start with a clear error, never sending OTLP to localhost for a value it does not know.

Each exporting process is a real child process (the OpenTelemetry SDK's tracer provider is process-wide)."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from helpers.faults import subprocess_env
from helpers.observability import SilentCollector
from llmbus import tracing
from llmbus.nats_server import free_port

# One span, then `tracing.shutdown()` once a line comes on stdin (the parent says when its export is in flight).
EXPORTING = """
import sys, time
from llmbus import tracing
print("exporting over", tracing.setup_from_env("llmbus-test"), flush=True)
now = time.monotonic()
tracing.request_spans(None, tracing.Phase("worker request", now - 0.1, now), [], {"llmbus.code": 200})
sys.stdin.readline()
tracing.shutdown()
print("shut down", flush=True)
"""
SDK_SHUTDOWN_WAIT_S = 30.0  # what the SDK's own shutdown waits for an export in flight (BatchProcessor.shutdown)
EXIT_WITHIN_S = SDK_SHUTDOWN_WAIT_S * 2 / 3  # the exit must not wait for the SDK: far sooner than its own wait


async def exporting_process(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        EXPORTING,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env() | env,
    )


async def finish(proc: asyncio.subprocess.Process, within: float) -> tuple[str, str]:
    """Tell the process to shut its tracing down, and read what it wrote; killed when it has not exited `within`."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(b"\n"), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(), err.decode()


async def test_a_collector_that_never_answers_does_not_hold_up_the_exit() -> None:
    """The span's export is in flight to a collector that accepted the connection and never answers, with an
    exporter timeout of 120 s: `shutdown` waited for the SDK (30 s here, the exporter timeout when shorter), and the
    process's exit with it. Now it waits `SHUTDOWN_TIMEOUT_S`, then lets the export go."""
    async with SilentCollector() as collector:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "120",  # seconds
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # milliseconds: the span goes out at once
        }
        proc = await exporting_process(env)
        connected = asyncio.ensure_future(collector.connected.wait())
        await asyncio.wait({connected, asyncio.ensure_future(proc.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert connected.done(), (await finish(proc, 5))[1]  # the export is in flight, and never answered
        out, err = await finish(proc, EXIT_WITHIN_S)
    assert proc.returncode == 0, err
    assert "exporting over OTLP (http/protobuf)" in out and "shut down" in out
    assert "spans not exported within 2 s of the shutdown are lost" in err


async def test_the_console_exporter_prints_the_spans() -> None:
    proc = await exporting_process({"OTEL_TRACES_EXPORTER": "console"})
    out, err = await finish(proc, 120)
    assert proc.returncode == 0, err
    assert "exporting over the console (stdout)" in out
    body = out[out.index("{") : out.rindex("}") + 1]
    span = json.loads(body)
    assert span["name"] == "worker request" and span["attributes"]["llmbus.code"] == 200


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": " OTLP "}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, []),
        ({"OTEL_TRACES_EXPORTER": "zipkin", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_the_exporters_the_variables_ask_for(env: dict[str, str], wanted: list[str]) -> None:
    assert tracing.exporters_wanted(env) == wanted


@pytest.mark.parametrize("value", ["zipkin", "otlp,jaeger", "none,otlp", ","])
def test_an_exporter_it_does_not_support_is_refused(value: str) -> None:
    with pytest.raises(RuntimeError, match="unsupported OTEL_TRACES_EXPORTER") as refused:
        tracing.exporters_wanted({"OTEL_TRACES_EXPORTER": value})
    assert repr(value) in str(refused.value) and "use otlp, console, both (otlp,console) or none" in str(refused.value)


@pytest.mark.parametrize("part", ["worker", "gateway"])
async def test_an_unsupported_traces_exporter_stops_the_start_with_a_clear_message(part: str) -> None:
    """`OTEL_TRACES_EXPORTER=zipkin` exported OTLP to localhost:4317. Nothing listens on the NATS URL here: the
    process must fail on its tracing settings, before it connects."""
    command = [sys.executable, "-m", "llmbus.cli", part, "--nats-url", f"nats://127.0.0.1:{free_port()}"]
    env = subprocess_env() | {"OTEL_TRACES_EXPORTER": "zipkin"}
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2, err.decode()
    message = "llmbus: error: unsupported OTEL_TRACES_EXPORTER 'zipkin': use otlp, console, both (otlp,console) or none"
    assert message in err.decode()
    assert b"llmbus: ready" not in out
