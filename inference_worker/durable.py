"""Durable jobs: the worker side of the JetStream work queue (`--durable`).

A client publishes a chat to `<prefix>.jobs.chat` (or `.jobs.chat.batched`) with its reply inbox in the
`Llmbus-Reply-To` header and its request id in `Llmbus-Request-Id`. The `LLM_JOBS` work-queue stream keeps the job
until a worker acks it; all workers share one durable pull consumer and fetch only as many jobs as they have free
slots. A `Job` is answered like a micro request (`respond` / `respond_error`): the answer goes to the reply inbox
first and the ack follows it, so a worker that dies mid-generation leaves its jobs unacked and JetStream redelivers
them to another worker after `ack_wait`. Long generations send in-progress acks so that they are not redelivered.

Delivery `max_attempts + 1` of a job never runs: it answers the client with an error and terminates the job, so a
job that kills or fails every worker it reaches stops with a clear answer. An answer can reach a client twice when a
worker dies between publishing it and acking; the client keeps the first per request id (bus_gateway.jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from schemas import ErrorBody, Subjects, encode
from schemas.subjects import ERROR, ERROR_CODE, REPLY_TO, REQUEST_ID

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from llmbus.config import Config

log = logging.getLogger("llmbus.jobs")

STREAM_NAME = "LLM_JOBS"
CONSUMER_NAME = "llm-workers"
RETRYABLE_CODES = frozenset({"500", "503"})  # an internal error or a worker that stopped: another delivery may work
OVERLOAD_REDELIVERY_DELAY = 0.0
FAILURE_REDELIVERY_DELAY = 1.0
FETCH_TIMEOUT = 1.0  # also bounds how long a draining worker waits for its last fetch
REPLY_SUBJECT = re.compile(r"^[^\s*>]{1,255}$")


@dataclass(frozen=True, slots=True)
class JobLimits:
    """The explicit limits of the stream and its consumer (created with them when missing)."""

    subjects: str = "llm.jobs.>"
    stream: str = STREAM_NAME
    consumer: str = CONSUMER_NAME
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

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            filter_subject=self.subjects,
        )


class JetStreamUnavailable(RuntimeError):
    pass


async def ensure_jobs_stream(js: JetStreamContext, limits: JobLimits) -> None:
    """Create the work-queue stream and the shared durable consumer if they do not exist (existing ones are kept)."""
    try:
        await js.stream_info(limits.stream)
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        raise JetStreamUnavailable(
            "durable mode needs JetStream on the NATS server: run nats-server with -js (`llmbus up` enables it)"
        ) from None
    except nats.js.errors.NotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):  # another worker created it in between
            await js.add_stream(limits.stream_config())
    try:
        await js.consumer_info(limits.stream, limits.consumer)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(limits.stream, limits.consumer_config())


class Job:
    """One delivery of a durable job, answered like a micro `Request`: publish to the reply inbox, then ack."""

    def __init__(
        self,
        nc: NATS,
        msg: Msg,
        request_id: str,
        reply_to: str,
        max_attempts: int,
        on_settled: Callable[[Job], None] | None = None,
    ) -> None:
        self.nc = nc
        self.msg = msg
        self.request_id = request_id
        self.reply_to = reply_to
        self.max_attempts = max_attempts
        self.on_settled = on_settled
        self.outcome = ""  # answered, failed, requeued, given_up or abandoned once settled

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
    def attempt(self) -> int:
        return self.msg.metadata.num_delivered

    @property
    def age(self) -> float:
        """Seconds since the client published the job: its `timeout` counts from then, not from this delivery."""
        return max(0.0, time.time() - self.msg.metadata.timestamp.timestamp())

    def adopt(self, msg: Msg) -> None:
        """A redelivery of this job while this worker still runs it: ack the newest delivery when done."""
        self.msg = msg

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        if self.settled:
            return
        await self._publish(data, {**(headers or {}), REQUEST_ID: self.request_id})
        await self._settle("answered", self.msg.ack)

    async def respond_error(
        self, code: str, description: str, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        """A retryable failure (500, 503) goes back to the queue while attempts remain; any other error is final."""
        if self.settled:
            return
        if code in RETRYABLE_CODES and self.attempt < self.max_attempts:
            delay = OVERLOAD_REDELIVERY_DELAY if code == "503" else FAILURE_REDELIVERY_DELAY
            log.info("job %s: %s %s; redelivering (attempt %d)", self.request_id, code, description, self.attempt)
            await self._settle("requeued", lambda: self.msg.nak(delay=delay or None))
            return
        if code in RETRYABLE_CODES:
            description = f"{description} (giving up after {self.attempt} deliveries: max deliveries)"
            data = encode(ErrorBody(description, int(code)))
        answer_headers = {**(headers or {}), ERROR: description, ERROR_CODE: code, REQUEST_ID: self.request_id}
        await self._publish(data, answer_headers)
        await self._settle("failed", self.msg.ack if code not in RETRYABLE_CODES else self.msg.term)

    async def give_up(self) -> None:
        """This delivery is past the attempts: answer the client with an error and stop redelivery."""
        attempts = self.attempt - 1
        description = (
            f"durable job {self.request_id} failed: no worker finished it in {attempts} "
            f"deliver{'y' if attempts == 1 else 'ies'} (each attempt failed or its worker died); "
            f"giving up (max deliveries: {attempts})"
        )
        headers = {ERROR: description, ERROR_CODE: "500", REQUEST_ID: self.request_id}
        await self._publish(encode(ErrorBody(description, 500)), headers)
        await self._settle("given_up", self.msg.term)

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


class JobHost(Protocol):
    """What the consumer needs from the worker."""

    def free_slots(self) -> int: ...

    async def wait_for_free_slot(self) -> None: ...

    async def run_job(self, job: Job) -> None: ...


class JobConsumer:
    """Pulls jobs into a worker: `fetch(batch=free slots)`, in-progress acks while they run, redeliveries adopted."""

    def __init__(self, nc: NATS, host: JobHost, limits: JobLimits) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.host = host
        self.limits = limits
        self.held: dict[str, Job] = {}
        outcomes = ("answered", "failed", "requeued", "given_up", "abandoned")
        self.counts = dict.fromkeys(("received", "redelivered", *outcomes), 0)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stop_pulling = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await ensure_jobs_stream(self.js, self.limits)
        self._sub = await self.js.pull_subscribe_bind(durable=self.limits.consumer, stream=self.limits.stream)
        self._tasks = [
            asyncio.create_task(self._pull(), name="llmbus-jobs-pull"),
            asyncio.create_task(self._keep_alive(), name="llmbus-jobs-progress"),
        ]

    async def stop_pulling(self) -> None:
        """Take no more jobs (the last fetch ends within FETCH_TIMEOUT); the jobs held keep running."""
        self._stop_pulling.set()
        if self._tasks:
            await asyncio.wait([self._tasks[0]])

    async def close(self) -> None:
        self._stop_pulling.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    def snapshot(self) -> dict:
        return {"held": len(self.held), **self.counts}

    async def _pull(self) -> None:
        while not self._stop_pulling.is_set():
            free = self.host.free_slots()
            if free <= 0:
                await _first_of(self.host.wait_for_free_slot(), self._stop_pulling.wait())
                continue
            try:
                msgs = await self._sub.fetch(batch=free, timeout=FETCH_TIMEOUT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # a reconnect or a JetStream hiccup: try again shortly
                log.warning("fetching jobs failed: %r", exc)
                await _first_of(asyncio.sleep(FETCH_TIMEOUT), self._stop_pulling.wait())
                continue
            for msg in msgs:
                try:
                    await self._take(msg)
                except Exception:  # one job that cannot be taken (or answered) must not stop the pulling
                    log.exception("taking a durable job failed; it will be redelivered")

    async def _take(self, msg: Msg) -> None:
        headers = msg.headers or {}
        metadata = msg.metadata
        request_id = headers.get(REQUEST_ID) or f"job-{metadata.sequence.stream}"
        self.counts["received"] += 1
        if metadata.num_delivered > 1:
            self.counts["redelivered"] += 1
        if (running := self.held.get(request_id)) is not None:
            running.adopt(msg)
            return
        reply_to = headers.get(REPLY_TO, "")
        if not REPLY_SUBJECT.match(reply_to):
            log.warning("job %s has no valid %s header: nobody to answer, dropping it", request_id, REPLY_TO)
            await msg.term()
            self.counts["failed"] += 1
            return
        job = Job(self.nc, msg, request_id, reply_to, self.limits.max_attempts, on_settled=self._settled)
        if job.attempt > self.limits.max_attempts:
            await job.give_up()
            return
        self.held[request_id] = job
        await self.host.run_job(job)

    def _settled(self, job: Job) -> None:
        if self.held.get(job.request_id) is job:
            del self.held[job.request_id]
        self.counts[job.outcome] += 1

    async def _keep_alive(self) -> None:
        interval = max(0.2, self.limits.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            for job in list(self.held.values()):
                with contextlib.suppress(nats.errors.Error):
                    await job.keep_alive()


async def _first_of(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
