"""The bridge's metrics at `GET /metrics` (Prometheus text format), and the trace context of each HTTP request.

- `llmbus_http_requests_total{method, route, status}`: requests answered; `route` is the route's template
  (`/v1/models/{model}`), `unmatched` for a path no route serves, so the label set stays bounded.
- `llmbus_http_request_duration_seconds{method, route}`: from the request to the last byte of the answer (a stream's
  whole length).
- `llmbus_http_requests_in_flight`: requests being served now (a scrape counts itself).
- `llmbus_bus_errors_total{code}`: the `BusError`s the bridge's bus calls raised, by code (no worker, overload,
  timeout, a worker's 400...).

`observe_http` wraps the whole app (404s and errors included) and serves each request inside its trace context
(`llmbus.tracing.server_span`), so the bus messages it publishes carry the caller's `traceparent`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import generate_latest

from bus_gateway.bus_errors import BusError
from llmbus import tracing
from schemas.errors import ERRORS

ASGIApp = Callable[[dict[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
KNOWN_CODES = frozenset(str(spec.code) for spec in ERRORS.values())
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
UNMATCHED = "unmatched"


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "llmbus_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "llmbus_http_request_duration_seconds",
            "HTTP request time, to the last byte of the answer.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("llmbus_http_requests_in_flight", "HTTP requests being served.", registry=self.registry)
        self.bus_errors = Counter(
            "llmbus_bus_errors", "Errors of the bridge's bus calls, by code.", ["code"], registry=self.registry
        )

    def bus_error(self, exc: BusError) -> None:
        code = str(exc.code)
        self.bus_errors.labels(code=code if code in KNOWN_CODES else "other").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics_endpoint(request: Request) -> Response[bytes]:
    metrics: BridgeMetrics = request.app.state["metrics"]
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def observe_http(app: ASGIApp, metrics: BridgeMetrics) -> ASGIApp:
    """Wrap an ASGI app: count and time each HTTP request, and serve it inside its trace context."""

    async def observed(scope: dict[str, Any], receive: Callable[..., Awaitable[Any]], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        status = 500  # unless the app starts a response
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ())}

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight.inc()
        with tracing.server_span(headers, f"{method} {UNMATCHED}", {"http.request.method": method}) as span:
            try:
                await app(scope, receive, send_and_note)
            finally:
                route = scope.get("path_template") or UNMATCHED
                span.update(f"{method} {route}", {"http.route": route, "http.response.status_code": status})
                if status >= 500:
                    span.failed()
                metrics.in_flight.dec()
                metrics.requests.labels(method=method, route=route, status=str(status)).inc()
                metrics.latency.labels(method=method, route=route).observe(time.perf_counter() - started)

    return observed


class CountingErrors:
    """A `BusClient` or `JobClient` whose calls count the `BusError`s they raise (a stream's too, mid-stream).
    Everything else is the wrapped client's."""

    def __init__(self, client: Any, metrics: BridgeMetrics) -> None:
        self._client = client
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute) or name.startswith("_"):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attribute(*args, **kwargs)
            if inspect.isasyncgen(result):
                return self._stream(result)
            if inspect.isawaitable(result):
                return self._call(result)
            return result

        return call

    async def _call(self, pending: Awaitable[Any]) -> Any:
        try:
            return await pending
        except BusError as exc:
            self._metrics.bus_error(exc)
            raise

    async def _stream(self, stream: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        try:
            async for item in stream:
                yield item
        except BusError as exc:
            self._metrics.bus_error(exc)
            raise
        finally:
            await stream.aclose()  # closing this one closes (and cancels) the bus stream
