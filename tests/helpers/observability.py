"""Hooks for the observability tests: the requests a worker holds (`HoldWatch`), a trace collector that accepts
connections and never answers (`SilentCollector`), and the request log lines pytest caught."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inference_worker.held import Held
from llmbus import tracing

if TYPE_CHECKING:
    from inference_worker.worker import Worker


class HoldWatch:
    """Keeps each request a worker holds (its `Held`, with the `received` time its figures count from) and sets
    `holding` once the first is held: by then the engine thread has it."""

    def __init__(self, worker: Worker) -> None:
        self.held: list[Held] = []
        self.holding = asyncio.Event()
        self._hold = worker.held.hold
        worker.held.hold = self._holding  # type: ignore[method-assign]

    def _holding(self, held: Held) -> None:
        self._hold(held)
        self.held.append(held)
        self.holding.set()


class SilentCollector:
    """A loopback TCP listener that accepts every connection, reads what comes, and never answers: an OTLP
    collector whose every export hangs. `connected` is set once an exporter connected (its export is in flight)."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._readers: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> SilentCollector:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._readers:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._readers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._readers.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connected.set()
        try:
            while await reader.read(65536):  # until the exporter's process closes the connection
                pass
        finally:
            writer.close()


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The structured fields of every `llmbus.requests` line caught, in order."""
    return [r.llmbus_fields for r in caplog.records if r.name == "llmbus.requests"]  # type: ignore[attr-defined]


def lines_of(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, Any]]:
    return [line for line in request_lines(caplog) if line["request_id"] == request_id]


def at_info(caplog: pytest.LogCaptureFixture) -> None:
    """Catch the request lines (INFO) and everything above."""
    caplog.set_level(logging.INFO)


@contextlib.contextmanager
def spans_in_memory() -> Iterator[InMemorySpanExporter]:
    """Spans on, into memory, until the block ends (then tracing is off again)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.configure(provider)
    try:
        yield memory
    finally:
        tracing.configure(None)
        provider.shutdown()
