"""The worker's side of the job queue: pull as many jobs as fit, keep them alive, refuse forged reply subjects.

All workers share one durable pull consumer. A worker fetches a job only when it surely fits (`jobs_to_fetch`), so
no job is ever refused, nak'd or counted as a failed delivery for capacity reasons. Jobs are keyed by (reply subject,
request id), so another client's job with the same request id is a different job, never adopted into this one.
A job's answer goes only to a reply subject under one of the worker's reply prefixes (`micro.reply_allowed`, as for
core requests): server permissions cannot enforce this, because a durable worker legitimately holds JetStream API
and ack rights.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from inference_worker import replies
from inference_worker.durable import FETCH_TIMEOUT, Job
from inference_worker.job_stream import JobLimits, ensure_jobs_stream
from inference_worker.micro import ReplyGate
from inference_worker.requests import request_id_of
from schemas import WireError, content_type
from schemas.subjects import JOBS_CONSUMER, REPLY_TO, REQUEST_ID, model_token

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

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


class ServerClock:
    """The NATS server's time, estimated from this host's clock plus a measured offset.

    JetStream stamps each job with the server's time. A worker whose clock runs ahead of the server's would find
    every job old (and answer 504 to all of them), so the worker measures the offset from the `ts` field of a
    JetStream API reply (the server's time when it answered), at start and every `REFRESH_S` seconds."""

    REFRESH_S = 60.0

    def __init__(self, local: Callable[[], float] = time.time) -> None:
        self.local = local
        self.offset = 0.0

    def now(self) -> float:
        return self.local() + self.offset

    async def measure(self, nc: NATS, stream: str) -> None:
        sent = self.local()
        try:
            reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
        except nats.errors.Error as exc:
            log.warning("could not read the NATS server's clock: %r", exc)
            return
        received = self.local()
        stamp = server_time(reply.data)
        if stamp is not None:
            self.offset = stamp - (sent + received) / 2


def server_time(data: bytes) -> float | None:
    """The `ts` of a JetStream API reply as a POSIX time (nanoseconds cut to microseconds)."""
    try:
        text = json.loads(data).get("ts")
        head, _, rest = str(text).rstrip("Z").partition(".")
        stamp = datetime.fromisoformat(f"{head}.{(rest + '000000')[:6]}+00:00")
    except (ValueError, AttributeError, TypeError):
        return None
    return stamp.timestamp()


class JobHost(Protocol):
    """What the consumer needs from the worker."""

    def jobs_wanted(self) -> int: ...

    async def wait_for_capacity(self) -> None: ...

    async def run_job(self, job: Job) -> None: ...


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
        self.terms = dict.fromkeys(consumers, limits)  # each consumer's ack_wait and attempts, as the server has them
        self.held: dict[tuple[str, str], Job] = {}
        outcomes = ("answered", "failed", "requeued", "given_up", "abandoned", "refused", "forwarded")
        self.counts = dict.fromkeys(("received", "redelivered", *outcomes), 0)
        self._subs: list[JetStreamContext.PullSubscription] = []
        self._fetching = asyncio.Lock()  # one fetch at a time, so the consumers share one capacity
        self._stop_pulling = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._consumed: set[str] = set()  # models whose job queue has its durable consumer

    async def start(self) -> None:
        self.terms = await ensure_jobs_stream(self.js, self.limits, self.consumers)
        await self.clock.measure(self.nc, self.limits.stream)
        for name in self.consumers:
            self._subs.append(await self.js.pull_subscribe_bind(durable=name, stream=self.limits.stream))
        pulls = zip(self.consumers, self._subs, strict=True)
        self._tasks = [asyncio.create_task(self._pull(name, sub), name="llmbus-jobs-pull") for name, sub in pulls]
        self._tasks.append(asyncio.create_task(self._keep_alive(), name="llmbus-jobs-progress"))

    async def stop_pulling(self) -> None:
        """Take no more jobs (the last fetch ends within FETCH_TIMEOUT); the jobs held keep running."""
        self._stop_pulling.set()
        if self._tasks:
            await asyncio.wait(self._tasks[: len(self._subs)])

    async def close(self) -> None:
        self._stop_pulling.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs = []

    async def takes_jobs_for(self, model: str) -> bool:
        """Whether `model`'s job queue has its durable consumer (some worker of it ran with --durable); a job
        forwarded to a queue without one would wait unread until it expires. Once seen, a consumer stays known."""
        if model in self._consumed:
            return True
        try:
            await self.js.consumer_info(self.limits.stream, f"{JOBS_CONSUMER}-{model_token(model)}")
        except nats.js.errors.NotFoundError:
            return False
        except nats.errors.Error:
            return True  # unknown (a timeout): forward, as before this check
        self._consumed.add(model)
        return True

    def batch_queries(self) -> int:
        """The queries of the batch jobs running here: each comes back to the workers as a request of its own."""
        return sum(job.queries for job in self.held.values())

    def snapshot(self) -> dict:
        return {"held": len(self.held), "clock_offset_s": round(self.clock.offset, 3), **self.counts}

    async def _pull(self, consumer: str, sub: JetStreamContext.PullSubscription) -> None:
        while not self._stop_pulling.is_set():
            if self.host.jobs_wanted() <= 0:
                await first_of(self.host.wait_for_capacity(), self._stop_pulling.wait())
                continue
            async with self._fetching:
                wanted = self.host.jobs_wanted()
                try:
                    msgs = await sub.fetch(batch=wanted, timeout=FETCH_TIMEOUT) if wanted > 0 else []
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                except Exception as exc:  # a reconnect or a JetStream hiccup: try again shortly
                    log.warning("fetching jobs failed: %r", exc)
                    await first_of(asyncio.sleep(FETCH_TIMEOUT), self._stop_pulling.wait())
                    continue
                for msg in msgs:
                    try:
                        await self._take(msg, self.terms[consumer].max_attempts)
                    except Exception:  # one job that cannot be taken (or answered) must not stop the pulling
                        log.exception("taking a durable job failed; it will be redelivered")

    async def _take(self, msg: Msg, max_attempts: int) -> None:
        headers = msg.headers or {}
        metadata = msg.metadata
        checked = request_id_of(headers) if REQUEST_ID in headers else f"job-{metadata.sequence.stream}"
        request_id = checked if isinstance(checked, str) else f"job-{metadata.sequence.stream}"
        reply_to = headers.get(REPLY_TO, "")
        self.counts["received"] += 1
        if metadata.num_delivered > 1:
            self.counts["redelivered"] += 1
        if (running := self.held.get((reply_to, request_id))) is not None:
            running.adopt(msg)
            return
        if not self.replies.allows(reply_to, f"durable job {request_id} (its {REPLY_TO})"):
            await msg.term()
            self.counts["refused"] += 1
            return
        job = Job(self.nc, msg, request_id, reply_to, max_attempts, self.clock, on_settled=self._settled)
        if isinstance(checked, WireError):  # an id that is no subject token: a 400, as in core mode
            [answer] = replies.error(content_type(headers), checked)
            await job.respond_error(checked, answer.data, answer.headers)
            return
        if job.attempt > max_attempts:
            await job.give_up()
            return
        self.held[job.key] = job
        await self.host.run_job(job)

    def _settled(self, job: Job) -> None:
        if self.held.get(job.key) is job:
            del self.held[job.key]
        self.counts[job.outcome] += 1

    async def _keep_alive(self) -> None:
        interval = max(0.2, min(terms.ack_wait for terms in self.terms.values()) / 3)
        next_clock = time.monotonic() + ServerClock.REFRESH_S
        while True:
            await asyncio.sleep(interval)
            for job in list(self.held.values()):
                with contextlib.suppress(nats.errors.Error):
                    await job.keep_alive()
            if time.monotonic() >= next_clock:
                next_clock = time.monotonic() + ServerClock.REFRESH_S
                await self.clock.measure(self.nc, self.limits.stream)


async def first_of(*waits: Awaitable[object]) -> None:
    """Wait until one of `waits` is done, then cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
