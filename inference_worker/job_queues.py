"""The worker's hold on the job stream's consumers: one pull subscription bound to each, and each one's terms
(ack_wait and attempts) as the server has them. Both are made at start (`make`); the terms are read again while jobs
run (`follow_terms`); a stream or consumer deleted under a running worker is made again at its next fetch
(`_recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from inference_worker.durable import FETCH_TIMEOUT
from inference_worker.job_stream import JobLimits, consumer_terms, ensure_jobs_stream

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

log = logging.getLogger("llmbus.jobs")

MAX_RECOVERY_DELAY = 10.0  # seconds: the longest wait between fetches while the job queue cannot be reached


class JobQueues:
    """The pull subscriptions (`subs`) and terms (`terms`) of the `consumers`, by consumer name. `stopping` cuts short
    the wait before fetching again after a failed fetch."""

    def __init__(
        self, js: JetStreamContext, limits: JobLimits, consumers: dict[str, list[str]], stopping: asyncio.Event
    ) -> None:
        self.js = js
        self.limits = limits
        self.consumers = consumers
        self.stopping = stopping
        self.terms = dict.fromkeys(consumers, limits)  # each consumer's ack_wait and attempts, as the server has them
        self.subs: dict[str, JetStreamContext.PullSubscription] = {}
        self.backoff = FETCH_TIMEOUT  # before the next fetch after a failed one (`_recover`)

    async def make(self) -> None:
        """Make the stream and consumers where missing (`ensure_jobs_stream`), follow their terms, and bind one pull
        subscription to each consumer (in place of any bound before)."""
        self.terms = await ensure_jobs_stream(self.js, self.limits, self.consumers)
        bound = {
            name: await self.js.pull_subscribe_bind(durable=name, stream=self.limits.stream) for name in self.consumers
        }
        old, self.subs = self.subs, bound
        for sub in old.values():
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def close(self) -> None:
        for sub in self.subs.values():
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self.subs = {}

    async def fetch(self, consumer: str, batch: int) -> list[Msg]:
        """Up to `batch` jobs from `consumer`, within `FETCH_TIMEOUT` (none came: []). A failed fetch gives none, after
        `_recover`; a closed connection raises `nats.errors.ConnectionClosedError`."""
        try:
            msgs = await self.subs[consumer].fetch(batch=batch, timeout=FETCH_TIMEOUT) if batch > 0 else []
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        except nats.errors.ConnectionClosedError:
            raise
        except Exception as exc:  # a reconnect, a JetStream hiccup, or the queue deleted under this worker
            await self._recover(consumer, exc)
            return []
        self.backoff = FETCH_TIMEOUT
        return msgs

    async def _recover(self, consumer: str, exc: Exception) -> None:
        """A fetch from `consumer` failed. When the server says that consumer or the stream is gone (an operator
        deleted it, a server lost its JetStream store), make the stream and the consumers again and bind new pull
        subscriptions (`make`), as at start. Jobs published while the stream was gone were refused to their
        clients; the jobs held here are answered as usual (a new consumer on the old stream may deliver them once
        more, and the client keeps the first answer). Otherwise (a reconnect, a timeout), or when making them fails,
        fetch again after a backoff that doubles from `FETCH_TIMEOUT` up to `MAX_RECOVERY_DELAY`."""
        log.warning("fetching jobs from %s failed: %r", consumer, exc)
        try:
            await self.js.consumer_info(self.limits.stream, consumer)
        except nats.js.errors.NotFoundError:
            log.warning("the job stream %s or its consumer %s is gone; making them again", self.limits.stream, consumer)
            try:
                return await self.make()
            except Exception as failed:  # JetStreamUnavailable, a timeout: the pull loop must go on
                log.warning("making the job stream %s again failed: %r", self.limits.stream, failed)
        except Exception:
            pass  # the server cannot tell now: fetch again after the backoff
        await first_of(asyncio.sleep(self.backoff), self.stopping.wait())
        self.backoff = min(MAX_RECOVERY_DELAY, self.backoff * 2)

    async def follow_terms(self) -> None:
        """Read each consumer's ack_wait and attempts from the server again and follow them. Workers that start
        together with other `--jobs-*` flags may each make a consumer, and the last one's settings hold on the server:
        a worker that kept its own would send in-progress acks too seldom for the server's shorter ack_wait, and its
        jobs would be redelivered to another worker while still running. A change is logged as a warning."""
        for name in self.consumers:
            try:
                terms = await consumer_terms(self.js, self.limits, name)
            except Exception:  # gone (the pull loop makes it again) or no answer: keep what is known
                continue
            held = self.terms[name]
            if (terms.ack_wait, terms.max_attempts) != (held.ack_wait, held.max_attempts):
                log.warning(
                    "the JetStream consumer %s now has ack_wait %s and max_deliver %d (this worker's flags: %s and %d);"
                    " following it",
                    *(name, terms.ack_wait, terms.max_deliver, self.limits.ack_wait, self.limits.max_deliver),
                )
                self.terms = {**self.terms, name: terms}


async def first_of(*waits: Awaitable[object]) -> None:
    """Wait until one of `waits` is done, then cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
