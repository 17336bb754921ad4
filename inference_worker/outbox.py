"""Answers out: the engine's events become messages (`replies`) on each held request's reply subject, in order.

The engine thread hands each step's events to `put` (thread-safe); one task (`run`) publishes them. `close` lets
that task publish everything already queued before it stops, so a stopping worker never drops finished work.
Each final answer is recorded in `metrics` once it is out (with its log line and spans), and every error answer
is counted by code.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from inference_worker import replies
from inference_worker.engine import Accepted, Event, Failed, Finished, TokenDelta
from inference_worker.held import HeldRequests, Replier
from inference_worker.metrics import WorkerMetrics
from schemas import WireError

log = logging.getLogger("llmbus.worker")


class Outbox:
    def __init__(self, held: HeldRequests, model: str, on_release: Callable[[], None], metrics: WorkerMetrics) -> None:
        self.held = held
        self.model = model
        self.on_release = on_release
        self.metrics = metrics
        self.errors_by_code: Counter[str] = Counter()
        self._events: asyncio.Queue[list[Event] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def put(self, events: list[Event]) -> None:
        """From any thread. The events are copied now: the caller may reuse its list once this returns."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, list(events))

    async def run(self) -> None:
        while (events := await self._events.get()) is not None:
            await self.publish(events)

    def close(self) -> None:
        """`run` returns once it has published every event `put` before this call (from any thread: the end mark
        takes the same way as the events, so it cannot overtake those still on their way to the loop)."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, None)

    async def publish(self, events: list[Event]) -> None:
        for event in events:
            try:
                await self._publish(event)
            except Exception:  # one answer that cannot be published must not strand the others
                log.exception("failed to publish the answer to %s", event.request_id)

    async def _publish(self, event: Event) -> None:
        if isinstance(event, Accepted | TokenDelta):
            held = self.held.get(event.request_id)
            if held is not None and held.stream:
                message = replies.accepted(held) if isinstance(event, Accepted) else replies.delta(held, event.text)
                await self.send(held.replier, [message])
            return
        held = self.held.release(event.request_id)
        if held is None:
            return
        self.on_release()
        try:
            if isinstance(event, Finished):
                await self.send(held.replier, replies.finished(held, event, self.model))
            elif isinstance(event, Failed):
                failure = WireError(event.code, event.message, event.name)
                await self.send(
                    held.replier, replies.error(held.kind, failure, stream=held.stream, request_id=held.request_id)
                )
        finally:  # answered or not (a publish that raised), the request is done: its figures and its log line
            self.metrics.answered(held, event)

    async def send(self, replier: Replier, messages: list[replies.Outgoing]) -> None:
        for message in messages:
            if message.error is not None:
                self.count(message.error.code)
                await replier.respond_error(message.error, message.data, message.headers)
            else:
                await replier.respond(message.data, message.headers, final=message.final)

    def count(self, code: int) -> None:
        self.errors_by_code[str(code)] += 1
        self.metrics.failed(code)
