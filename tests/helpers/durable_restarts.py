"""Hooks for the durable-job restart tests (tests/test_durable_restarts.py): a write to the job consumers that lands
just after a worker's own, a worker whose answers cannot be published, events for what a worker's job consumer does
(terms and clock read again, a job taken, a redelivery), the acks JetStream receives, and a worker whose engine dies
on demand, run by `run_worker` as `llmbus worker` runs it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, ConsumerInfo
from nats.js.client import JetStreamContext

from inference_worker import worker as worker_module
from inference_worker.job_stream import STREAM_NAME
from inference_worker.worker import Worker
from llmbus.connection import flushed


class LateWriter:
    """A JetStream context whose `add_consumer` is followed at once by another worker's, made with `ack_wait`: two
    workers that found no consumer at the same moment both made it, and the last write holds on the server."""

    def __init__(self, js: JetStreamContext, other: JetStreamContext, ack_wait: float) -> None:
        self._js, self._other, self._ack_wait = js, other, ack_wait

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def add_consumer(self, stream: str, config: ConsumerConfig, **params: Any) -> ConsumerInfo:
        made = await self._js.add_consumer(stream, config, **params)
        await self._other.add_consumer(stream, config.evolve(ack_wait=self._ack_wait))
        return made


def failing_publishes(nc: NATS, subject: str) -> None:
    """`nc`'s publishes to `subject` raise, as when its outbound buffer is full while it reconnects; the rest
    (acks, JetStream API calls) go out."""
    publish = nc.publish

    async def publish_or_fail(to: str, payload: bytes = b"", *args: Any, **kwargs: Any) -> None:
        if to == subject:
            raise nats.errors.OutboundBufferLimitError()
        await publish(to, payload, *args, **kwargs)

    nc.publish = publish_or_fail  # type: ignore[method-assign]


class Counter:
    """Counts calls; `reached(n)` is set once there were `n`, `later(n)` once there were `n` more."""

    def __init__(self) -> None:
        self.count = 0
        self._events: dict[int, asyncio.Event] = {}

    def reached(self, count: int) -> asyncio.Event:
        event = self._events.setdefault(count, asyncio.Event())
        if self.count >= count:
            event.set()
        return event

    def later(self, more: int) -> asyncio.Event:
        """Set once `more` further calls were counted."""
        return self.reached(self.count + more)

    def add(self) -> None:
        self.count += 1
        for count, event in self._events.items():
            if self.count >= count:
                event.set()


class ConsumerWatch:
    """What a worker's job consumer does: `launches` counts the refreshes it began (the next one is due
    `ServerClock.REFRESH_S` after each), `refreshes` its reads of the server's clock (each right after it read the
    consumers' terms again), `taken` the jobs it finished taking, and `redelivered` is set when a delivery after the
    first reaches it."""

    def __init__(self, worker: Worker) -> None:
        assert worker.jobs is not None
        self.launches, self.refreshes, self.taken = Counter(), Counter(), Counter()
        self.redelivered = asyncio.Event()
        jobs, clock = worker.jobs, worker.jobs.clock
        measure, take, follow = clock.measure, jobs._take, jobs.queues.follow_terms

        async def following() -> None:
            self.launches.add()
            await follow()

        async def measured(*args: Any) -> None:
            await measure(*args)
            self.refreshes.add()

        async def taking(msg: Msg, max_attempts: int) -> None:
            if msg.metadata.num_delivered > 1:
                self.redelivered.set()
            try:
                await take(msg, max_attempts)
            finally:
                self.taken.add()

        clock.measure = measured  # type: ignore[method-assign]
        jobs._take = taking  # type: ignore[method-assign]
        jobs.queues.follow_terms = following  # type: ignore[method-assign]


async def counted(nc: NATS, subject: str, starting: bytes = b"") -> Counter:
    """A count of the messages on `subject` (those whose data starts with `starting`) from now on."""
    counter = Counter()

    async def seen(msg: Msg) -> None:
        if msg.data.startswith(starting):
            counter.add()

    await nc.subscribe(subject, cb=seen)
    return counter


class LogCount(logging.Handler):
    """Counts the records of `logger` whose message contains `text`, while installed (`with LogCount(...)`)."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger, self.text, self.seen = logging.getLogger(logger), text, Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.add()

    def __enter__(self) -> Counter:
        self.logger.addHandler(self)
        return self.seen

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


class AckWatch:
    """The acks the job stream receives from now on: `in_progress` counts the in-progress acks as they come, and
    `settled` says how the jobs were settled (each ack's first word: -NAK, +TERM; an ack is empty)."""

    def __init__(self, nc: NATS, sub: Subscription, in_progress: Counter) -> None:
        self.nc, self.sub, self.in_progress = nc, sub, in_progress

    @classmethod
    async def on(cls, nc: NATS) -> AckWatch:
        subject = f"$JS.ACK.{STREAM_NAME}.>"
        return cls(nc, await nc.subscribe(subject), await counted(nc, subject, b"+WPI"))

    async def settled(self, *publishers: NATS) -> list[bytes]:
        """The settling acks received once everything `publishers` sent reached the server: a flush is answered
        after the messages before it, and the server relays them to this watch before its own flush's answer."""
        for publisher in publishers:
            if not publisher.is_closed:
                await flushed(publisher)
        await flushed(self.nc)
        kinds = []
        while self.sub.pending_msgs:
            kind = (await self.sub.next_msg()).data.split(b" ")[0]
            if kind != b"+WPI":
                kinds.append(kind)
        return kinds


def recorded_workers(monkeypatch: pytest.MonkeyPatch) -> list[Worker]:
    """The `Worker`s that `run_worker` makes from now on, so a test can hook them."""
    made: list[Worker] = []

    class Recorded(Worker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(worker_module, "Worker", Recorded)
    return made
