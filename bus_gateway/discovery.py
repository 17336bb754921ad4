"""`$SRV` discovery: every instance of a micro service answers PING, INFO and STATS, so a client gathers replies.

NATS cannot say how many replies will come, so `gather` waits until `expect` replies arrived (when the caller knows
how many instances there are), or until `window` seconds passed, or until `settle` seconds passed without a new one.
Tests and tools that must see every worker pass `expect`; they never rely on the settle window.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from schemas.subjects import is_no_responders

DISCOVERY_WINDOW = 0.5
DISCOVERY_SETTLE = 0.15


async def gather(
    nc: NATS,
    subject: str,
    window: float = DISCOVERY_WINDOW,
    *,
    expect: int | None = None,
    settle: float | None = DISCOVERY_SETTLE,
) -> list[dict[str, Any]]:
    """The JSON replies to one message on `subject`, one per instance (by `id`). `settle=None` waits the whole
    window (for when missing a slow instance matters more than the wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: dict[str, dict[str, Any]] = {}
    try:
        await nc.publish(subject, b"", reply=inbox)
        while (wait := deadline - loop.time()) > 0 and (expect is None or len(replies) < expect):
            if replies and expect is None and settle is not None:
                wait = min(wait, settle)
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                break
            if is_no_responders(msg.headers):
                break
            reply = _json_object(msg.data)
            if reply is not None:
                replies[str(reply.get("id", len(replies)))] = reply
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return list(replies.values())


def prefix_of(reply: Mapping[str, Any]) -> str:
    """The subject prefix a `$SRV` reply's worker serves (its `subject_prefix` metadata); "" when it does not say."""
    metadata = reply.get("metadata")
    prefix = metadata.get("subject_prefix") if isinstance(metadata, Mapping) else None
    return prefix if isinstance(prefix, str) else ""


def on_prefix(prefix: str, subject_prefix: str | None) -> bool:
    """Whether a worker on `prefix` ("": it does not say, as an older llmbus) belongs to the bus of
    `subject_prefix` (None: any). `$SRV` subjects are shared by every prefix on a server, so every worker answers."""
    return subject_prefix is None or prefix in ("", subject_prefix)


@dataclass
class BusModels:
    """The models on the bus: name -> number of workers, the names whose workers claim to be the default, and the
    names that a worker serves with `--durable` (one that reads that model's job queue)."""

    workers: dict[str, int] = field(default_factory=dict)
    defaults: set[str] = field(default_factory=set)
    durable: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, infos: list[dict], subject_prefix: str | None = None) -> BusModels:
        """From INFO replies; with `subject_prefix`, only the workers on that prefix (another prefix is another bus
        that shares the NATS server)."""
        models = cls()
        for info in infos:
            if not on_prefix(prefix_of(info), subject_prefix):
                continue
            metadata = info.get("metadata") or {}
            name = metadata.get("model")
            if isinstance(name, str) and name:
                models.workers[name] = models.workers.get(name, 0) + 1
                if metadata.get("default_model") == "true":
                    models.defaults.add(name)
                if metadata.get("durable") != "false":  # a worker that does not say (an older llmbus) may take jobs
                    models.durable.add(name)
        return models

    def listing(self) -> str:
        return ", ".join(sorted(self.workers)) or "none"


class Discovery:
    """The `$SRV` side of a `BusClient`: every worker's PING, INFO and STATS, and the models they serve."""

    async def ping(self, timeout: float = DISCOVERY_WINDOW, *, expect: int | None = None) -> list[dict]:
        """Every worker's `$SRV.PING` reply (name, id, version, metadata); draining workers do not answer."""
        return await self._gather("PING", timeout, expect)

    async def info(self, timeout: float = DISCOVERY_WINDOW, *, expect: int | None = None) -> list[dict]:
        """Every serving worker's `$SRV.INFO` reply (adds description and endpoints)."""
        return await self._gather("INFO", timeout, expect)

    async def stats(self, timeout: float = DISCOVERY_WINDOW, *, expect: int | None = None) -> list[dict]:
        """Every worker's `$SRV.STATS` reply, draining ones included; each endpoint's `data` holds its figures."""
        return await self._gather("STATS", timeout, expect)

    async def models(self, timeout: float = DISCOVERY_WINDOW) -> list[str]:
        """The model names the serving workers have, from their INFO `metadata.model`, sorted."""
        return sorted((await self.bus_models(timeout)).workers)

    async def bus_models(self, timeout: float = DISCOVERY_WINDOW, *, thorough: bool = False) -> BusModels:
        """Each model on the bus with its number of serving workers, and the ones that claim to be the default.
        `thorough` waits the whole `timeout` for slow workers instead of stopping soon after the last reply: a quick
        look misses a worker whose reply comes `DISCOVERY_SETTLE` after the one before, so a caller that acts on a
        worker's absence (a model is not served, or is the only one: `inference_worker.routing`) looks thoroughly."""
        self._check_connected()
        settle = None if thorough else DISCOVERY_SETTLE
        infos = await gather(self.nc, f"$SRV.INFO.{self.service_name}", timeout, settle=settle)
        return BusModels.of(infos, self.subjects.prefix)

    async def _gather(self, verb: str, timeout: float, expect: int | None) -> list[dict[str, Any]]:
        self._check_connected()
        return await gather(self.nc, f"$SRV.{verb}.{self.service_name}", timeout, expect=expect)


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # any service may answer $SRV: ignore junk
        return None
    return value if isinstance(value, dict) else None
