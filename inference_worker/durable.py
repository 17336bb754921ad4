"""Durable jobs: the worker side of the JetStream work queue (`--durable`).

A client publishes a chat to `<prefix>.jobs.chat` (or `.jobs.chat.batched`) with its reply subject in the
`Llmbus-Reply-To` header and its request id in `Llmbus-Request-Id`. The `LLM_JOBS` work-queue stream keeps the job
until a worker acks it; all workers share one durable pull consumer (`job_consumer`). A `Job` is answered like a
micro request (`respond` / `respond_error`): the answer goes to the reply subject first and the ack follows it, so a
worker that dies mid-generation leaves its jobs unacked and JetStream redelivers them to another worker after
`ack_wait`. Long generations send in-progress acks so that they are not redelivered.

A job that failed (an internal error, a worker whose engine died) goes back to the queue after a delay that doubles
with each delivery (1 s, 2 s, 4 s... at most 30 s). Delivery `max_attempts + 1` of a job never runs: it answers the
client with an error and terminates the job, so a job that kills or fails every worker it reaches stops with a
clear answer. A job that a clean shutdown interrupts is stored again at once, that delivery not charged
(`requeue`): on its model's queue once it was routed, else on the queue it came from. A job stored again
(`requeue`, `forward`) carries its first publication time and the attempts charged so far in headers, so neither
its age nor its attempts restart. An answer can reach a client twice when a worker dies between publishing it and
acking; the client keeps the first per request id (bus_gateway.jobs). An error answer's body is encoded as its
`Content-Type` header says: MessagePack for a MessagePack job, as its other answers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from inference_worker.answer_size import answer_too_large, in_its_place
from inference_worker.held import Outcome
from schemas import ErrorBody, WireError, content_type, encode
from schemas.errors import MAX_BODY_MESSAGE, clean_text, error_headers
from schemas.subjects import CONTENT_TYPE, JOB_ATTEMPTS, JOB_PUBLISHED, MSG_ID, MSGPACK, REQUEST_ID, message_size

log = logging.getLogger("llmbus.jobs")

RETRYABLE_CODES = frozenset({"500", "503"})  # an internal error or a worker that stopped: another delivery may work
FIRST_REDELIVERY_DELAY = 1.0  # seconds before a failed job's next delivery; doubles with each delivery
MAX_REDELIVERY_DELAY = 30.0
FETCH_TIMEOUT = 1.0  # also bounds how long a draining worker waits for its last fetch
PUBLISHED = JOB_PUBLISHED
ATTEMPTS = JOB_ATTEMPTS


class Clock(Protocol):
    """The NATS server's time (`server_clock.ServerClock`): what a job's JetStream timestamp is compared with."""

    def now(self) -> float: ...


class Job:
    """One delivery of a durable job, answered like a micro `Request`: publish to the reply inbox, then ack."""

    def __init__(
        self,
        nc: NATS,
        msg: Msg,
        request_id: str,
        reply_to: str,
        max_attempts: int,
        clock: Clock,
        on_settled: Callable[[Job], None] | None = None,
    ) -> None:
        self.nc = nc
        self.msg = msg
        self.request_id = request_id
        self.reply_to = reply_to
        self.max_attempts = max_attempts
        self.clock = clock
        self.on_settled = on_settled
        self.outcome = ""  # answered, failed, requeued, forwarded, given_up or abandoned once settled
        self.queries = 0  # a batch job running here: its number of queries (`JobConsumer.batch_queries`)
        self.requeue_to = msg.subject  # where a clean shutdown stores it: its queue, or its model's once routed
        self.answer_outcome: Outcome | None = None  # what the last `respond` / `respond_error` did (`held.Outcome`)
        self.copy_id: str | None = None  # the `Nats-Msg-Id` of its copy once it is being stored again (`_store_again`)
        self.too_large: WireError | None = None  # the 413 published in place of an answer over the max payload

    @property
    def key(self) -> tuple[str, str]:
        return (self.reply_to, self.request_id)

    @property
    def settled(self) -> bool:
        return bool(self.outcome)

    @property
    def subject(self) -> str:
        return self.msg.subject

    @property
    def data(self) -> bytes:
        return self.msg.data

    @property
    def headers(self) -> dict[str, str] | None:
        return self.msg.headers

    @property
    def reply(self) -> str:
        return self.reply_to

    @property
    def sequence(self) -> int:
        """The job's stream sequence: the same for each delivery of one stored message, another for each message."""
        return self.msg.metadata.sequence.stream

    @property
    def attempt(self) -> int:
        """This delivery's number: JetStream's count, plus the deliveries charged before the job was stored again."""
        return self.msg.metadata.num_delivered + int(header_number(self.headers, ATTEMPTS) or 0)

    @property
    def published(self) -> float:
        """When the client published the job (server time), also when it was stored again since (`PUBLISHED`)."""
        stored = self.msg.metadata.timestamp.timestamp()
        return min(stored, header_number(self.headers, PUBLISHED) or stored)

    @property
    def age(self) -> float:
        """Seconds since the client published the job, on the server's clock: its `timeout` counts from then. The
        worker's own clock may be off (see `ServerClock`), so it never compares its time with the server's stamp."""
        return max(0.0, self.clock.now() - self.published)

    def adopt(self, msg: Msg) -> None:
        """A redelivery of this job (the same stored message: its `sequence`) while this worker still runs it: ack
        the newest delivery when done. Another message with the same key is another job (`JobConsumer._take`)."""
        self.msg = msg

    def is_copy(self, msg: Msg) -> bool:
        """Whether `msg` is this job's own copy, being stored again (`requeue`, `forward`) while it settles."""
        return self.copy_id is not None and (msg.headers or {}).get(MSG_ID) == self.copy_id

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None, *, final: bool = True) -> Outcome:
        """The job's answer: `published` (then acked; `too_large` says when a 413 went in its place), or `settled`
        when it was answered before (nothing sent)."""
        if self.settled:
            return self._answered("settled")
        await self._final(data, {**(headers or {}), REQUEST_ID: self.request_id}, "answered", self.msg.ack)
        return self._answered("published")

    async def respond_error(
        self, error: WireError, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> Outcome:
        """A retryable failure (an internal error, a worker that stopped) goes back to the queue, after a delay that
        grows with each delivery, while attempts remain (`redelivered`); a clean shutdown's job is stored again, not
        charged (`requeued`); any other error is the job's final answer (`published`). Neither put-back publishes
        anything: the client's answer comes from the worker that takes the job next."""
        return self._answered(await self._error(error, data, headers))

    def _answered(self, outcome: Outcome) -> Outcome:
        self.answer_outcome = outcome
        return outcome

    async def _error(self, error: WireError, data: bytes, headers: dict[str, str] | None) -> Outcome:
        if self.settled:
            return "settled"
        if error.name == "shutting_down":
            return await self.requeue(self.requeue_to)
        code = str(error.code)
        if code in RETRYABLE_CODES and self.attempt < self.max_attempts:
            delay = redelivery_delay(self.attempt)
            log.info("job %s: %s; redelivering in %.1fs (attempt %d)", self.request_id, code, delay, self.attempt)
            await self._settle("requeued", lambda: self.msg.nak(delay=delay))
            return "redelivered"
        if code in RETRYABLE_CODES:
            error = WireError(
                error.code, f"{error.message} (giving up after {self.attempt} deliveries: max deliveries)", error.name
            )
            body = ErrorBody(clean_text(error.message, MAX_BODY_MESSAGE), error.code)
            data = encode(body, content_type(headers))  # as the answer's headers say: JSON, or MessagePack
        answer_headers = {**(headers or {}), **error_headers(error.code, error.message, error.name or None)}
        settle = self.msg.ack if code not in RETRYABLE_CODES else self.msg.term
        await self._final(data, {**answer_headers, REQUEST_ID: self.request_id}, "failed", settle)
        return "published"

    async def give_up(self) -> bool:
        """This delivery is past the attempts: answer the client with an error (encoded as the job was) and stop
        redelivery; returns whether the answer was published. JetStream delivers the job no more (max_deliver), so
        it is terminated even when the answer cannot be published (logged as an error: its client gets no answer and
        waits out its timeout); nothing is left that looks as if it will run again. A term that fails too is logged:
        the job stays in the stream until max_age."""
        attempts = self.attempt - 1
        description = (
            f"durable job {self.request_id} failed: no worker finished it in {attempts} "
            f"deliver{'y' if attempts == 1 else 'ies'} (each attempt failed or its worker died); "
            f"giving up (max deliveries: {attempts})"
        )
        kind, typed = self._encoding()
        headers = {**typed, **error_headers(500, description), REQUEST_ID: self.request_id}
        published = True
        try:
            await self.nc.publish(self.reply_to, encode(ErrorBody(description, 500), kind), headers=headers)
        except Exception as exc:
            published = False
            log.error(
                "job %s: its give-up answer could not be published (%r); terminating it anyway", self.request_id, exc
            )
        try:
            await self._settle("given_up", self.msg.term)
        except Exception as exc:
            log.error("job %s: terminating it failed (%r); it stays in the stream until max_age", self.request_id, exc)
        return published

    async def forward(self, subject: str) -> None:
        """Store this job again on `subject` (another model's job queue), then ack it here: it is never lost, and
        the worker that takes it answers the same reply subject."""
        await self._store_again(subject, "forwarded", self.attempt - 1)

    async def requeue(self, subject: str) -> Outcome:
        """A clean shutdown interrupted this job: store it again on `subject` (its model's queue, or for a job not
        routed yet and a model-less batch the queue it came from), where another worker takes it at once. This
        delivery is not charged: a nak would count it, and rolling restarts could use up every attempt."""
        log.info("job %s: worker stopping; stored again on %s", self.request_id, subject)
        return await self._store_again(subject, "requeued", self.attempt - 1)

    async def _store_again(self, subject: str, outcome: str, charged: int) -> Outcome:
        """Its `Nats-Msg-Id` gets this message's stream sequence as a suffix, so the store does not take it for a
        duplicate of itself, while a second try for the same message (a worker that died before its ack) is. Until
        this job is settled, a fetch may bring the copy back to this worker: `copy_id` tells it from another job with
        the same key (`is_copy`). Returns `requeued`, or `published` when the job could not be stored again and its
        client got a 413."""
        if self.settled:
            return "settled"
        headers = {**(self.headers or {}), PUBLISHED: f"{self.published:.6f}", ATTEMPTS: str(max(0, charged))}
        headers[MSG_ID] = f"{headers.get(MSG_ID, self.request_id)}>{self.msg.metadata.sequence.stream}"
        if (size := message_size(self.data, headers)) > self.nc.max_payload:  # its longer id pushed it over
            limit = self.nc.max_payload
            message = f"job of {size} bytes (with its forwarding headers) exceeds the NATS max payload of {limit}"
            return await self.respond_error(WireError.of("too_large", message), encode(ErrorBody(message, 413)))
        self.copy_id = headers[MSG_ID]
        await self.nc.jetstream().publish(subject, self.data, headers=headers)
        await self._settle(outcome, self.msg.ack)
        return "requeued"

    def _encoding(self) -> tuple[str, dict[str, str]]:
        """The job's encoding (JSON or MessagePack), and the headers that say it on an answer of the worker's own."""
        kind = content_type(self.headers)
        return kind, {CONTENT_TYPE: MSGPACK} if kind == MSGPACK else {}

    async def keep_alive(self) -> None:
        if not self.settled:
            await self.msg.in_progress()

    async def _final(
        self, data: bytes, headers: dict[str, str], outcome: str, settle: Callable[[], Awaitable[None]]
    ) -> None:
        """A final answer, then its ack or term. An answer over the server's max payload could never be published
        (and the job would run again after each ack_wait): the client gets a 413 in its place (`answer_size`), the
        job is acked, and it keeps that 413 (`too_large`), so that it counts as one, not as what it replaced."""
        if (error := answer_too_large(self.nc, data, headers)) is not None:
            log.warning("job %s: %s; answering 413", self.request_id, error.message)
            data, headers = in_its_place(error, headers)
            outcome, settle = "failed", self.msg.ack
        await self._publish(data, headers)
        self.too_large = error
        await self._settle(outcome, settle)

    async def _publish(self, data: bytes, headers: dict[str, str]) -> None:
        """The answer first; the ack only once it is out. If it cannot be published, let the job go unacked (no more
        in-progress acks): JetStream redelivers it after ack_wait."""
        try:
            await self.nc.publish(self.reply_to, data, headers=headers)
        except Exception:
            self.outcome = "abandoned"
            if self.on_settled is not None:
                self.on_settled(self)
            raise

    async def _settle(self, outcome: str, settle: Callable[[], Awaitable[None]]) -> None:
        self.outcome = outcome
        if self.on_settled is not None:
            self.on_settled(self)
        await settle()


def header_number(headers: dict[str, str] | None, name: str) -> float | None:
    """A non-negative finite number from a header, or None."""
    try:
        value = float((headers or {}).get(name, ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def redelivery_delay(attempt: int) -> float:
    return min(MAX_REDELIVERY_DELAY, FIRST_REDELIVERY_DELAY * 2 ** max(0, attempt - 1))
