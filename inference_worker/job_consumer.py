"""The worker's side of the job queue: pull as many jobs as fit, keep them alive, refuse forged reply subjects.

All workers share one durable pull consumer. A worker fetches a job only when it surely fits (`jobs_to_fetch`), so
no job is ever refused, nak'd or counted as a failed delivery for capacity reasons. Jobs are keyed by (reply subject,
request id), so another client's job with the same request id is a different job, never adopted into this one. A
redelivery of the job running here (the same stored message: its stream sequence) is adopted; another message with
the key of a job running here (the client stored it again after JetStream's de-duplication window) is answered 409
`duplicate_request` and acked, so it neither runs nor comes back. A job answered without running (an invalid request
id, a duplicate, a delivery past its attempts) leaves the log line, span and failure count of a refused request.
A job's answer goes only to a reply subject under one of the worker's reply prefixes (`reply_gate.reply_allowed`, as for
core requests): server permissions cannot enforce this, because a durable worker legitimately holds JetStream API
and ack rights. A stream or consumer deleted under a running worker is made again at its next fetch (`job_queues`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from inference_worker.durable import Job
from inference_worker.job_queues import JobQueues, first_of
from inference_worker.job_stream import JobLimits
from inference_worker.reply_gate import ReplyGate
from inference_worker.requests import request_id_of
from inference_worker.server_clock import ServerClock
from schemas import WireError
from schemas.subjects import JOBS_CONSUMER, REPLY_TO, REQUEST_ID, model_token

if TYPE_CHECKING:
    from llmbus.config import Config

log = logging.getLogger("llmbus.jobs")


def jobs_to_fetch(held: int, idle: bool, config: Config) -> int:
    """How many jobs to fetch now, `held` counting the requests held and the queries of the batch jobs running: none
    while the engine is full; else as many as surely fit `max_pending` even if each is a batch of
    `max_batch_queries` (whose queries come back to the workers as requests); one when idle."""
    if held >= config.max_batch_size:
        return 0
    fits = (config.max_pending - held) // config.max_batch_queries
    return min(config.max_batch_size - held, fits) if fits else int(idle)


class JobHost(Protocol):
    """What the consumer needs from the worker."""

    def jobs_wanted(self) -> int: ...

    async def wait_for_capacity(self) -> None: ...

    async def run_job(self, job: Job) -> None: ...

    async def refuse_job(self, job: Job, failure: WireError, received: float) -> None:
        """Answer `job` with `failure` before it runs, as a core request refused at intake is answered."""
        ...

    def job_refused(self, job: Job, code: int, received: float) -> None:
        """`job` was answered `code` before it ran (by `Job.give_up`): its failure count, log line and span."""
        ...


class JobConsumer:
    """Pulls jobs into a worker: as many as it has room for, in-progress acks while they run, redeliveries adopted.

    Jobs are keyed by (reply subject, request id), so another client's job with the same request id is a different
    job, never adopted into this one."""

    def __init__(
        self,
        nc: NATS,
        host: JobHost,
        limits: JobLimits,
        consumers: dict[str, list[str]],
        reply_prefixes: tuple[str, ...],
        clock: ServerClock,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.host = host
        self.limits = limits
        self.consumers = consumers
        self.replies = ReplyGate(reply_prefixes)
        self.clock = clock
        self.held: dict[tuple[str, str], Job] = {}
        outcomes = ("answered", "failed", "requeued", "given_up", "abandoned", "refused", "forwarded")
        self.counts = dict.fromkeys(("received", "redelivered", *outcomes), 0)
        self._fetching = asyncio.Lock()  # one fetch at a time, so the consumers share one capacity
        self._stop_pulling = asyncio.Event()
        self.queues = JobQueues(self.js, limits, consumers, self._stop_pulling)
        self._pulls: list[asyncio.Task] = []
        self._progress: asyncio.Task | None = None
        self._consumed: set[str] = set()  # models whose job queue has its durable consumer

    async def start(self) -> None:
        await self.queues.make()
        await self.clock.measure(self.nc, self.limits.stream)
        self._pulls = [asyncio.create_task(self._pull(name), name="llmbus-jobs-pull") for name in self.consumers]
        self._progress = asyncio.create_task(self._keep_alive(), name="llmbus-jobs-progress")

    async def stop_pulling(self) -> None:
        """Take no more jobs (the last fetch ends within FETCH_TIMEOUT); the jobs held keep running."""
        self._stop_pulling.set()
        if self._pulls:
            await asyncio.wait(self._pulls)

    async def close(self) -> None:
        self._stop_pulling.set()
        tasks = [*self._pulls, *([self._progress] if self._progress is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pulls, self._progress = [], None
        await self.queues.close()

    async def takes_jobs_for(self, model: str) -> bool:
        """Whether `model`'s job queue has its durable consumer (some worker of it ran with --durable); a job
        forwarded to a queue without one would wait unread until it expires. Once seen, a consumer stays known (until
        `queue_exists` finds it gone)."""
        if model in self._consumed:
            return True
        try:
            return await self.queue_exists(model)
        except nats.errors.Error:
            return True  # unknown (a timeout): forward, as before this check

    async def queue_exists(self, model: str) -> bool:
        """Whether `model`'s durable consumer exists now, asked of the server (a model no worker serves at the moment:
        its queue may have been deleted since it was seen). Raises `nats.errors.Error` when the server cannot tell."""
        try:
            await self.js.consumer_info(self.limits.stream, f"{JOBS_CONSUMER}-{model_token(model)}")
        except nats.js.errors.NotFoundError:
            self._consumed.discard(model)
            return False
        self._consumed.add(model)
        return True

    def batch_queries(self) -> int:
        """The queries of the batch jobs running here: each comes back to the workers as a request of its own."""
        return sum(job.queries for job in self.held.values())

    def snapshot(self) -> dict:
        return {"held": len(self.held), "clock_offset_s": round(self.clock.offset, 3), **self.counts}

    async def _pull(self, consumer: str) -> None:
        while not self._stop_pulling.is_set():
            if self.host.jobs_wanted() <= 0:
                await first_of(self.host.wait_for_capacity(), self._stop_pulling.wait())
                continue
            async with self._fetching:
                try:
                    msgs = await self.queues.fetch(consumer, self.host.jobs_wanted())
                except nats.errors.ConnectionClosedError:
                    return
                for msg in msgs:
                    try:
                        await self._take(msg, self.queues.terms[consumer].max_attempts)
                    except Exception:  # one job that cannot be taken (or answered) must not stop the pulling
                        log.exception("taking a durable job failed; it will be redelivered")

    async def _take(self, msg: Msg, max_attempts: int) -> None:
        received = time.monotonic()
        headers = msg.headers or {}
        metadata = msg.metadata
        sequence = metadata.sequence.stream
        checked = request_id_of(headers) if REQUEST_ID in headers else f"job-{sequence}"
        request_id = checked if isinstance(checked, str) else f"job-{sequence}"
        reply_to = headers.get(REPLY_TO, "")
        self.counts["received"] += 1
        if metadata.num_delivered > 1:
            self.counts["redelivered"] += 1
        if (running := self.held.get((reply_to, request_id))) is not None:
            if running.sequence == sequence:  # a redelivery of the job running here (an in-progress ack came late)
                running.adopt(msg)
                return
            if not running.is_copy(msg):  # its own copy, stored again as it stops, is the job from now on
                await self._refuse_duplicate(running, msg, received)
                return
        if not self.replies.allows(reply_to, f"durable job {request_id} (its {REPLY_TO})"):
            await msg.term()
            self.counts["refused"] += 1
            return
        job = Job(self.nc, msg, request_id, reply_to, max_attempts, self.clock, on_settled=self._settled)
        if isinstance(checked, WireError):  # an id that is no subject token: a 400, as in core mode
            await self.host.refuse_job(job, checked, received)
            return
        if job.attempt > max_attempts:
            if await job.give_up():
                self.host.job_refused(job, 500, received)
            return
        self.held[job.key] = job
        await self.host.run_job(job)

    async def _refuse_duplicate(self, running: Job, msg: Msg, received: float) -> None:
        """Another stored message with the key of the job running here: a client stored it again (after JetStream's
        de-duplication window) while the first runs. Adopting it would ack one message for the other's answer and
        leave the first to run again or be given up; it gets a 409 instead, and is acked, so it does not come back."""
        duplicate = Job(self.nc, msg, running.request_id, running.reply_to, running.max_attempts, self.clock)
        message = (
            f"durable job {running.request_id} is already running (stream sequence {running.sequence}); this copy "
            f"(stream sequence {duplicate.sequence}) is not run: use a new request id for a new job"
        )
        log.warning("job %s: %s", running.request_id, message)
        await self.host.refuse_job(duplicate, WireError.of("duplicate_request", message), received)
        if duplicate.outcome == "failed":  # answered and acked (not `abandoned`: then it comes back after ack_wait)
            self.counts["refused"] += 1

    def _settled(self, job: Job) -> None:
        if self.held.get(job.key) is job:
            del self.held[job.key]
        self.counts[job.outcome] += 1

    async def _keep_alive(self) -> None:
        """In-progress acks for the jobs held, every third of the shortest ack_wait the server has for the consumers;
        every `ServerClock.REFRESH_S` seconds, those terms and the server's clock are read again, in a task of their
        own (`_refresh`): a slow JetStream API reply must not hold up the in-progress acks."""
        next_refresh, refreshing = time.monotonic() + ServerClock.REFRESH_S, None
        try:
            while True:
                interval = max(0.2, min(terms.ack_wait for terms in self.queues.terms.values()) / 3)
                await asyncio.sleep(max(0.0, min(interval, next_refresh - time.monotonic())))
                for job in list(self.held.values()):
                    with contextlib.suppress(nats.errors.Error):
                        await job.keep_alive()
                if time.monotonic() >= next_refresh and (refreshing is None or refreshing.done()):
                    next_refresh = time.monotonic() + ServerClock.REFRESH_S
                    refreshing = asyncio.create_task(self._refresh(), name="llmbus-jobs-refresh")
        finally:
            if refreshing is not None:
                refreshing.cancel()

    async def _refresh(self) -> None:
        await self.queues.follow_terms()
        await self.clock.measure(self.nc, self.limits.stream)
