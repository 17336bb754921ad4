"""Answers out: the engine's events become messages (`replies`) on each held request's reply subject, in order.

The engine thread hands each step's events to `put` (thread-safe); one task (`run`) publishes them. `close` lets
that task publish everything already queued before it stops, so a stopping worker never drops finished work.

Only an answer published to its client counts as answered (`held.Outcome`): then its error code is counted, and a
held request's final answer is recorded in `metrics` (figures, log line and spans), as is a request refused before
the engine held it (`refuse`: log line and span). A durable job put back on its queue instead (`requeued` by a
stopping worker, `redelivered` after an internal error) or an answer whose publish failed (`abandoned`) counts in
`WorkerMetrics.unanswered` only (`request_unanswered_total` in `$SRV.STATS`): the worker that takes the job next
answers it, and logs it. A request or durable job whose answer would not fit the server's max payload got a 413 in
its place (`answer_size`): it counts as that 413, never as a success, a batch whose queries succeeded too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from inference_worker import replies
from inference_worker.durable import Job
from inference_worker.engine import Accepted, Event, Failed, Finished, TokenDelta
from inference_worker.held import (
    ABANDONED,
    PUBLISHED,
    REDELIVERED,
    REQUEUED,
    SETTLED,
    Held,
    HeldRequests,
    Outcome,
    Replier,
)
from inference_worker.metrics import WorkerMetrics
from inference_worker.micro import Request
from inference_worker.requests import request_id_of
from schemas import WireError
from schemas.subjects import REQUEST_ID

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
            messages = self._final(held, event)
        except Exception:  # an answer that cannot even be built is no answer either
            self.metrics.unanswered(ABANDONED)
            raise
        if await self.answer(held.replier, messages) == PUBLISHED:
            self.metrics.answered(held, answered_as(held.replier, event))

    def _final(self, held: Held, event: Finished | Failed) -> list[replies.Outgoing]:
        if isinstance(event, Finished):
            return replies.finished(held, event, self.model)
        failure = WireError(event.code, event.message, event.name)
        return replies.error(held.kind, failure, stream=held.stream, request_id=held.request_id)

    async def answer(self, replier: Replier, messages: list[replies.Outgoing]) -> Outcome:
        """`send` a request's final answer; one that did not reach its client counts as unanswered, by outcome (a
        job answered before counts nowhere)."""
        outcome = await self.send(replier, messages)
        if outcome not in (PUBLISHED, SETTLED):
            self.metrics.unanswered(outcome)
        return outcome

    async def send(self, replier: Replier, messages: list[replies.Outgoing]) -> Outcome:
        """Publish `messages` in order; returns their outcome. An error answer counts by code once published. A
        durable job put back, or a publish that failed (logged here, not raised), ends the messages at once; so does
        the 413 answered in place of a message over the max payload (counted as a 413): after it, nothing more goes
        out (a job answered before says `settled` itself)."""
        if isinstance(replier, Request) and replier.too_large is not None:
            return PUBLISHED  # its answer already ended with that 413
        try:
            for message in messages:
                if message.error is not None:
                    outcome = await replier.respond_error(message.error, message.data, message.headers) or PUBLISHED
                else:
                    outcome = await replier.respond(message.data, message.headers, final=message.final) or PUBLISHED
                if outcome != PUBLISHED:
                    return outcome
                if (too_large := too_large_of(replier)) is not None:
                    self.count(too_large.code)
                    return PUBLISHED
                if message.error is not None:
                    self.count(message.error.code)
        except Exception:
            log.exception("failed to publish an answer to %s", replier.reply)
            return ABANDONED
        return PUBLISHED

    async def refuse(
        self,
        req: Replier,
        kind: str,
        failure: WireError,
        received: float,
        *,
        stream: bool = False,
        request_id: str | None = None,
    ) -> None:
        """Answer a request refused before the engine held it (invalid, unroutable, a duplicate, cancelled earlier,
        overloaded, a worker shutting down...) with `failure`. Once published it is counted by code and leaves the
        request log line and span that an answered request leaves (`WorkerMetrics.refused`), timed from `received`
        (when the message arrived); never its prompt. A stream's end message carries the request id: `request_id`,
        else the one the request sent when it is valid."""
        request_id = given_id(req, request_id)
        answer = replies.error(kind, failure, stream=stream, request_id=request_id)
        if await self.answer(req, answer) == PUBLISHED:
            code = (too_large_of(req) or failure).code
            self.metrics.refused(req.headers, request_id or "-", code, received, time.monotonic())

    def batch_answered(self, req: Replier, code: int | None) -> None:
        """The coordinator itself answered a batch (`batches`): with `code` when every query failed, else with their
        results (None); either, or the 413 that went in its place (`too_large_of`), counts once. A batch answered
        with its results counts nowhere (each query counted as a request), unless that 413 replaced them."""
        if (too_large := too_large_of(req)) is None and code is None:
            return
        outcome = req.answer_outcome if isinstance(req, Job) else PUBLISHED
        if outcome == PUBLISHED:
            self.count(too_large.code if too_large is not None else code)
        elif outcome in (REQUEUED, REDELIVERED, ABANDONED):
            self.metrics.unanswered(outcome)

    def count(self, code: int) -> None:
        self.errors_by_code[str(code)] += 1
        self.metrics.failed(code)


def too_large_of(replier: Replier) -> WireError | None:
    """The 413 a request (`micro.Request`) or durable job (`durable.Job._final`) answered in place of a message over
    the server's max payload: its answer ended there. None for every other."""
    return replier.too_large if isinstance(replier, Request | Job) else None


def answered_as(replier: Replier, event: Finished | Failed) -> Finished | Failed:
    """The final answer its client got: `event`, or the 413 in its place (`too_large_of`), so that an answer too large
    to publish never counts as a success."""
    if (error := too_large_of(replier)) is None:
        return event
    return Failed(event.request_id, error.code, error.message, event.timings, error.name)


def given_id(req: Replier, request_id: str | None) -> str | None:
    """The request id a refusal carries and logs: the one given, a job's, or the client's header when it is valid;
    None otherwise (an invalid id is user text, never logged or echoed)."""
    if request_id is not None:
        return request_id
    if isinstance(req, Job):
        return req.request_id
    given = request_id_of(req.headers) if REQUEST_ID in (req.headers or {}) else None
    return given if isinstance(given, str) else None
