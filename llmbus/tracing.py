"""Trace context across the bus: W3C `traceparent`/`tracestate` from HTTP into NATS headers (durable jobs too), and
spans when OpenTelemetry is installed and configured.

Propagation needs no OpenTelemetry. The bridge serves each HTTP request inside `server_span(headers, ...)`, which
keeps the request's valid trace headers for the duration (a context variable); `BusClient` and `JobClient` put
`outgoing()` on every message they publish. Without spans, that is the client's `traceparent` and `tracestate`
exactly as they came. Trace headers are user input: only a well-formed `traceparent` (and a well-formed
`tracestate` beside it) is carried, anything else is dropped, so no user text reaches a NATS header unchecked.

Spans: install the `[otel]` extra and point the standard OpenTelemetry variables at a collector, e.g.
`OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317` (or `OTEL_TRACES_EXPORTER=otlp`). `setup_from_env` then exports
over OTLP (`OTEL_EXPORTER_OTLP_PROTOCOL`: grpc, the default, or http/protobuf), batched, with the service name from
`OTEL_SERVICE_NAME` (default: the part's). `OTEL_TRACES_EXPORTER` takes `otlp`, `console` (the SDK's JSON spans on
stdout, for a look without a collector), both (`otlp,console`) or `none`; any other value stops the start with an
error that names it. `OTEL_SDK_DISABLED=true` turns it off. The bridge's span is the parent of the message it
publishes; the worker emits its spans (the request, queue wait, prefill, decode, reply) when it answers, with their
real start and end times (`request_spans`). At exit `shutdown` exports what is still buffered, waiting at most
`SHUTDOWN_TIMEOUT_S`: a collector that accepts but never answers cannot hold up the process's exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from schemas.subjects import TRACEPARENT, TRACESTATE

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the [otel] extra is not installed: headers still pass through
    otel_trace = None

_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_VALUE_CHAR = r"\x21-\x2b\x2d-\x3c\x3e-\x7e"  # printable ASCII but `,` and `=`
_TRACESTATE_MEMBER = re.compile(rf"[a-z0-9][a-z0-9_\-*/@]{{0,255}}=[{_VALUE_CHAR} ]{{0,255}}[{_VALUE_CHAR}]")
MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBERS = 32
WALL_OFFSET = time.time() - time.monotonic()  # monotonic + this = wall-clock seconds, measured once
SHUTDOWN_TIMEOUT_S = 2.0  # how long `shutdown` waits for the last export (the SDK's own wait is 30 s)
EXPORTERS = ("otlp", "console")  # the OTEL_TRACES_EXPORTER values that export; `none` turns traces off

log = logging.getLogger("llmbus.tracing")

TraceHeaders = dict[str, str]

_incoming: ContextVar[TraceHeaders] = ContextVar("llmbus_trace_headers", default={})  # noqa: B039 (never mutated)
_tracer: Any = None  # an OpenTelemetry Tracer once spans are on
_provider: Any = None  # the TracerProvider that `setup_from_env` made (flushed by `shutdown`)


def trace_headers(headers: Mapping[str, str] | None) -> TraceHeaders:
    """The valid W3C trace headers among `headers` (names in any case), values untouched; invalid ones dropped.
    A `tracestate` travels only beside a valid `traceparent`."""
    if not headers:
        return {}
    found = {name.lower(): value for name, value in headers.items() if name.lower() in (TRACEPARENT, TRACESTATE)}
    parent = found.get(TRACEPARENT)
    if parent is None or not _TRACEPARENT.fullmatch(parent):
        return {}
    carried = {TRACEPARENT: parent}
    state = found.get(TRACESTATE)
    if state is not None and valid_tracestate(state):
        carried[TRACESTATE] = state
    return carried


def valid_tracestate(value: str) -> bool:
    if not value or len(value) > MAX_TRACESTATE:
        return False
    members = [member.strip(" \t") for member in value.split(",")]
    members = [member for member in members if member]
    return 0 < len(members) <= MAX_TRACESTATE_MEMBERS and all(_TRACESTATE_MEMBER.fullmatch(m) for m in members)


def trace_id_of(headers: Mapping[str, str] | None) -> str | None:
    """The 32-hex trace id of a message's valid `traceparent`, for logs."""
    parent = trace_headers(headers).get(TRACEPARENT)
    return parent[3:35] if parent else None


def enabled() -> bool:
    """True when spans are recorded and exported (OpenTelemetry installed and configured)."""
    return _tracer is not None


def outgoing() -> TraceHeaders:
    """The trace headers for a message published now: the current span's context when spans are on, else the
    headers of the request being served, as they came (empty outside one)."""
    if _tracer is not None:
        span = otel_trace.get_current_span()
        if span.get_span_context().is_valid:
            carrier: TraceHeaders = {}
            TraceContextTextMapPropagator().inject(carrier)
            return trace_headers(carrier)
    return dict(_incoming.get())


class ServerSpan:
    """The span of one served request (a no-op without spans): rename it once the route is known, set its status."""

    def __init__(self, span: Any = None) -> None:
        self.span = span

    def update(self, name: str, attributes: Mapping[str, Any]) -> None:
        if self.span is not None:
            self.span.update_name(name)
            self.span.set_attributes(dict(attributes))

    def failed(self) -> None:
        if self.span is not None:
            self.span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR))


@contextlib.contextmanager
def server_span(headers: Mapping[str, str] | None, name: str, attributes: Mapping[str, Any]) -> Iterator[ServerSpan]:
    """Serve one request inside its trace: `outgoing()` carries its trace headers, and with spans on a server span
    (a child of the caller's `traceparent`) is current until the block ends."""
    carried = trace_headers(headers)
    token = _incoming.set(carried)
    try:
        if _tracer is None:
            yield ServerSpan()
            return
        parent = TraceContextTextMapPropagator().extract(carried)
        span = _tracer.start_span(name, context=parent, kind=otel_trace.SpanKind.SERVER, attributes=dict(attributes))
        attached = otel_context.attach(otel_trace.set_span_in_context(span))
        try:
            yield ServerSpan(span)
        finally:
            otel_context.detach(attached)
            span.end()
    finally:
        _incoming.reset(token)


@dataclass(frozen=True, slots=True)
class Phase:
    """A named stretch of a request, in monotonic seconds; skipped when either end is unknown."""

    name: str
    start: float | None
    end: float | None


def request_spans(
    headers: Mapping[str, str] | None, root: Phase, phases: Sequence[Phase], attributes: Mapping[str, Any]
) -> None:
    """Emit a finished request's spans at once, with their real times: `root` (a child of the message's
    `traceparent`, or a new trace) and each of `phases` under it. A no-op without spans."""
    if _tracer is None or root.start is None or root.end is None:
        return
    parent = TraceContextTextMapPropagator().extract(trace_headers(headers))
    span = _tracer.start_span(
        root.name,
        context=parent,
        kind=otel_trace.SpanKind.SERVER,
        start_time=wall_ns(root.start),
        attributes=dict(attributes),
    )
    inside = otel_trace.set_span_in_context(span)
    for phase in phases:
        if phase.start is not None and phase.end is not None:
            child = _tracer.start_span(phase.name, context=inside, start_time=wall_ns(phase.start))
            child.end(end_time=wall_ns(max(phase.start, phase.end)))
    span.end(end_time=wall_ns(root.end))


def wall_ns(monotonic: float) -> int:
    return int((monotonic + WALL_OFFSET) * 1e9)


def configure(provider: Any) -> None:
    """Record spans with this OpenTelemetry `TracerProvider` (tests use one with an in-memory exporter); None: off."""
    global _tracer
    if provider is not None and otel_trace is None:
        raise RuntimeError("spans need OpenTelemetry: pip install 'llmbus[otel]'")
    _tracer = None if provider is None else provider.get_tracer("llmbus")


def exporters_wanted(env: Mapping[str, str] | None = None) -> list[str]:
    """The trace exporters the standard OTEL_* variables ask for (`EXPORTERS`), none when traces stay off: those
    `OTEL_TRACES_EXPORTER` names (comma-separated), else OTLP when an OTLP endpoint is set. Raises RuntimeError for
    a value it does not support, rather than exporting somewhere the operator did not ask for."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    value = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not value:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [name.strip().lower() for name in value.split(",")]
    if names == ["none"]:
        return []
    if any(name not in EXPORTERS for name in names):
        raise RuntimeError(
            f"unsupported OTEL_TRACES_EXPORTER {value!r}: use otlp, console, both (otlp,console) or none"
        )
    return list(dict.fromkeys(names))


def requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for trace export (raises as `exporters_wanted` does)."""
    return bool(exporters_wanted(env))


def setup_from_env(service: str) -> str | None:
    """Turn spans on when the OTEL_* variables ask for them: OTLP and/or console export, batched. Returns what it set
    up (for the log), or None when spans stay off. Raises RuntimeError when they are asked for but OpenTelemetry is
    missing, or for an OTEL_TRACES_EXPORTER or OTLP protocol it does not support."""
    global _provider
    wanted = exporters_wanted()
    if not wanted or _tracer is not None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise RuntimeError("OTEL_* asks for traces, but OpenTelemetry is missing: pip install 'llmbus[otel]'") from None
    exporters = [_exporter(name) for name in wanted]
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    _provider = TracerProvider(resource=Resource.create({} if named else {"service.name": service}))
    for exporter, _ in exporters:
        _provider.add_span_processor(BatchSpanProcessor(exporter))
    otel_trace.set_tracer_provider(_provider)
    configure(_provider)
    return " and ".join(described for _, described in exporters)


def _exporter(name: str) -> tuple[Any, str]:
    """The exporter called `name` in OTEL_TRACES_EXPORTER, and how the start's log line describes it."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(), "the console (stdout)"
    variable = next((v for v in _PROTOCOL_VARIABLES if os.environ.get(v)), _PROTOCOL_VARIABLES[-1])
    protocol = os.environ.get(variable, "grpc")
    return _otlp_exporter(variable, protocol), f"OTLP ({protocol})"


_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")  # the first set wins


def _otlp_exporter(variable: str, protocol: str) -> Any:
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            raise RuntimeError(f"unsupported {variable} {protocol!r}: use grpc or http/protobuf")
    except ImportError:
        raise RuntimeError("the OTLP exporter is missing: pip install 'llmbus[otel]'") from None
    return OTLPSpanExporter()  # endpoint, headers, timeout... from the OTEL_EXPORTER_OTLP_* variables


def shutdown(timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Export the spans still buffered (at exit), waiting at most `timeout` seconds. The SDK's shutdown waits for an
    export in flight (up to the exporter's timeout, or its own 30 s), so it runs in a daemon thread: a collector
    that accepts but never answers costs the spans still buffered, not a stuck exit."""
    global _provider
    if _provider is not None:
        closing = threading.Thread(target=_provider.shutdown, name="llmbus-trace-shutdown", daemon=True)
        closing.start()
        closing.join(timeout)
        if closing.is_alive():
            log.warning("tracing: spans not exported within %.0f s of the shutdown are lost", timeout)
        _provider = None
    configure(None)
