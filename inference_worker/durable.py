"""Durable jobs: the worker side of the JetStream work queue (`--durable`).

A client publishes a chat to `<prefix>.jobs.chat` (or `.jobs.chat.batched`) with its reply subject in the
`Llmbus-Reply-To` header and its request id in `Llmbus-Request-Id`. The `LLM_JOBS` work-queue stream keeps the job
until a worker acks it; all workers share one durable pull consumer (`job_consumer`). A `Job` is answered like a
micro request (`respond` / `respond_error`): the answer goes to the reply subject first and the ack follows it, so a
worker that dies mid-generation leaves its jobs unacked and JetStream redelivers them to another worker after
`ack_wait`. Long generations send in-progress acks so that they are not redelivered.

A job that failed (an internal error, or a worker that stopped before finishing it) goes back to the queue after a
delay that doubles with each delivery (1 s, 2 s, 4 s... at most 30 s). Delivery `max_attempts + 1` of a job never
runs: it answers the client with an error and terminates the job, so a job that kills or fails every worker it
reaches stops with a clear answer. An answer can reach a client twice when a worker dies between publishing it and
acking; the client keeps the first per request id (bus_gateway.jobs).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from schemas import ErrorBody, Subjects, WireError, encode
from schemas.errors import error_headers
from schemas.subjects import JOBS_CONSUMER, JOBS_STREAM, MSG_ID, REQUEST_ID, message_size, model_token

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from llmbus.config import Config

log = logging.getLogger("llmbus.jobs")

STREAM_NAME = JOBS_STREAM
CONSUMER_NAME = JOBS_CONSUMER
RETRYABLE_CODES = frozenset({"500", "503"})  # an internal error or a worker that stopped: another delivery may work
FIRST_REDELIVERY_DELAY = 1.0  # seconds before a failed job's next delivery; doubles with each delivery
MAX_REDELIVERY_DELAY = 30.0
FETCH_TIMEOUT = 1.0  # also bounds how long a draining worker waits for its last fetch
REPLY_SUBJECT = re.compile(r"^[^\s*>]{1,255}$")


class Clock(Protocol):
    """The NATS server's time (`job_consumer.ServerClock`): what a job's JetStream timestamp is compared with."""

    def now(self) -> float: ...


@dataclass(frozen=True, slots=True)
class JobLimits:
    """The explicit limits of the stream and its consumer (created with them when missing)."""

    subjects: str = "llm.jobs.>"
    stream: str = STREAM_NAME
    max_age: float = 3600.0
    max_msgs: int = 10_000
    max_attempts: int = 3
    ack_wait: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> JobLimits:
        return cls(
            subjects=Subjects(config.subject_prefix).jobs,
            max_age=config.jobs_max_age,
            max_msgs=config.jobs_max_msgs,
            max_attempts=config.jobs_max_deliver,
            ack_wait=config.jobs_ack_wait,
        )

    @property
    def max_deliver(self) -> int:
        """The consumer's limit: the attempts, plus one delivery that only answers the error."""
        return self.max_attempts + 1

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[self.subjects],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,  # a full queue refuses new jobs rather than dropping queued ones
            max_age=self.max_age,
            max_msgs=self.max_msgs,
            duplicate_window=min(120.0, self.max_age),  # a re-published job (same Nats-Msg-Id) is stored once
        )

    def consumer_config(self, name: str, filters: list[str]) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            filter_subjects=filters,
        )


def job_consumers(subjects: Subjects, model: str) -> dict[str, list[str]]:
    """The durable consumers a worker of `model` pulls from: the model-less jobs (shared by every worker, which
    forwards a job for another model to that model's queue) and its own model's jobs. A work-queue stream lets no
    two consumers share a subject, so their filters do not overlap."""
    return {
        CONSUMER_NAME: [subjects.jobs_chat, subjects.jobs_chat_batched],
        f"{CONSUMER_NAME}-{model_token(model)}": [subjects.model_jobs(model)],
    }


class JetStreamUnavailable(RuntimeError):
    pass


async def ensure_jobs_stream(js: JetStreamContext, limits: JobLimits, consumers: dict[str, list[str]]) -> None:
    """Create the work-queue stream and the durable consumers if they do not exist; a consumer whose filter is not
    `consumers`' (an older llmbus's `llm.jobs.>`, which would overlap the per-model consumers) is updated."""
    try:
        await js.stream_info(limits.stream)
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        raise JetStreamUnavailable(
            "durable mode needs JetStream on the NATS server: run nats-server with -js (`llmbus up` enables it)"
        ) from None
    except nats.js.errors.NotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):  # another worker created it in between
            await js.add_stream(limits.stream_config())
    for name, filters in consumers.items():
        try:
            info = await js.consumer_info(limits.stream, name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is None or sorted(info.config.filter_subjects or [info.config.filter_subject]) != sorted(filters):
            await js.add_consumer(limits.stream, limits.consumer_config(name, filters))


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
        self.outcome = ""  # answered, failed, requeued, given_up or abandoned once settled

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
    def attempt(self) -> int:
        return self.msg.metadata.num_delivered

    @property
    def age(self) -> float:
        """Seconds since the client published the job, on the server's clock: its `timeout` counts from then. The
        worker's own clock may be off (see `ServerClock`), so it never compares its time with the server's stamp."""
        return max(0.0, self.clock.now() - self.msg.metadata.timestamp.timestamp())

    def adopt(self, msg: Msg) -> None:
        """A redelivery of this job while this worker still runs it: ack the newest delivery when done."""
        self.msg = msg

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None, *, final: bool = True) -> None:
        if self.settled:
            return
        await self._publish(data, {**(headers or {}), REQUEST_ID: self.request_id})
        await self._settle("answered", self.msg.ack)

    async def respond_error(self, error: WireError, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """A retryable failure (an internal error, a worker that stopped) goes back to the queue, after a delay that
        grows with each delivery, while attempts remain; any other error is the job's final answer."""
        if self.settled:
            return
        code = str(error.code)
        if code in RETRYABLE_CODES and self.attempt < self.max_attempts:
            delay = redelivery_delay(self.attempt)
            log.info("job %s: %s; redelivering in %.1fs (attempt %d)", self.request_id, code, delay, self.attempt)
            await self._settle("requeued", lambda: self.msg.nak(delay=delay))
            return
        if code in RETRYABLE_CODES:
            error = WireError(
                error.code, f"{error.message} (giving up after {self.attempt} deliveries: max deliveries)", error.name
            )
            data = encode(ErrorBody(error.message, error.code))
        answer_headers = {**(headers or {}), **error_headers(error.code, error.message, error.name or None)}
        await self._publish(data, {**answer_headers, REQUEST_ID: self.request_id})
        await self._settle("failed", self.msg.ack if code not in RETRYABLE_CODES else self.msg.term)

    async def give_up(self) -> None:
        """This delivery is past the attempts: answer the client with an error and stop redelivery."""
        attempts = self.attempt - 1
        description = (
            f"durable job {self.request_id} failed: no worker finished it in {attempts} "
            f"deliver{'y' if attempts == 1 else 'ies'} (each attempt failed or its worker died); "
            f"giving up (max deliveries: {attempts})"
        )
        headers = {**error_headers(500, description), REQUEST_ID: self.request_id}
        await self._publish(encode(ErrorBody(description, 500)), headers)
        await self._settle("given_up", self.msg.term)

    async def forward(self, subject: str) -> None:
        """Store this job again on `subject` (another model's job queue), then ack it here: it is never lost, and
        the worker that takes it answers the same reply subject. Its `Nats-Msg-Id` gets the subject as a suffix,
        so the store does not take it for a duplicate of itself."""
        if self.settled:
            return
        headers = dict(self.headers or {})
        headers[MSG_ID] = f"{headers.get(MSG_ID, self.request_id)}>{subject}"
        if (size := message_size(self.data, headers)) > self.nc.max_payload:  # its longer id pushed it over
            limit = self.nc.max_payload
            message = f"job of {size} bytes (with its forwarding headers) exceeds the NATS max payload of {limit}"
            return await self.respond_error(WireError.of("too_large", message), encode(ErrorBody(message, 413)))
        await self.nc.jetstream().publish(subject, self.data, headers=headers)
        await self._settle("forwarded", self.msg.ack)

    async def keep_alive(self) -> None:
        if not self.settled:
            await self.msg.in_progress()

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


def redelivery_delay(attempt: int) -> float:
    return min(MAX_REDELIVERY_DELAY, FIRST_REDELIVERY_DELAY * 2 ** max(0, attempt - 1))
