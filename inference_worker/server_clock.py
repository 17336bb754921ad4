"""The NATS server's time as a durable worker estimates it (`ServerClock`): what a job's JetStream timestamp, and
so its age, is compared with (`durable.Job.age`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime

import nats.errors
from nats.aio.client import Client as NATS

log = logging.getLogger("llmbus.jobs")


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
