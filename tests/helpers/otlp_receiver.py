"""A tiny OTLP/HTTP trace receiver on loopback, for tests of real span export: it answers `POST /v1/traces`
(`application/x-protobuf`, gzip or deflate too) as a collector does and records every span it was sent.

    with OtlpReceiver() as receiver:  # OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint
        spans = receiver.wait_for(lambda spans: ..., timeout=30)
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One exported span; ids in lowercase hex, `parent_span_id` empty for a root span."""

    service: str  # its resource's service.name
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    attributes: dict[str, Any]


def plain(value: AnyValue) -> Any:
    """An OTLP attribute value as Python: str, bool, int, float, bytes, list or dict."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return as_dict(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def as_dict(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: plain(pair.value) for pair in pairs}


def spans_of(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    found = []
    for resource_spans in request.resource_spans:
        service = str(as_dict(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(
                    ReceivedSpan(
                        service=service,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        attributes=as_dict(span.attributes),
                    )
                )
    return found


class OtlpReceiver:
    """The collector end of OTLP/HTTP traces on 127.0.0.1 (a free port), served from a thread while open.
    `spans`: what arrived; `bodies`: every export request as received (decompressed); `refused`: requests it
    answered with an error (a wrong path, content type or body), which a test can assert is empty."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.bodies: list[bytes] = []
        self.refused: list[str] = []
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout: float) -> list[ReceivedSpan]:
        """The spans received so far, once `done` holds for them (checked as each export arrives); AssertionError
        naming what did arrive when it does not within `timeout` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: done(list(self.spans)), timeout):
                seen = [(span.service, span.name) for span in self.spans]
                raise AssertionError(f"spans missing after {timeout:.0f}s; received {seen}, refused {self.refused}")
            return list(self.spans)

    def _received(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self._changed:
            self.bodies.append(body)
            self.spans.extend(spans_of(request))
            self._changed.notify_all()

    def _refuse(self, why: str) -> None:
        with self._changed:
            self.refused.append(why)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                content_type = self.headers.get("Content-Type", "")
                if self.path != TRACES_PATH or content_type != PROTOBUF:
                    receiver._refuse(f"POST {self.path} ({content_type})")
                    return self._answer(404 if self.path != TRACES_PATH else 415, b"")
                try:
                    encoding = self.headers.get("Content-Encoding", "").lower()
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    receiver._received(body)
                except Exception as exc:  # a body that is not an export request: the test should hear of it
                    receiver._refuse(f"bad body: {exc!r}")
                    return self._answer(400, b"")
                return self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", PROTOBUF)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: pytest shows the test's own output

        return Handler
