"""`$SRV` discovery: every instance of a micro service answers PING, INFO and STATS, so a client gathers replies.

NATS cannot say how many replies will come, so `gather` waits until `expect` replies arrived (when the caller knows
how many instances there are), or until `window` seconds passed, or until `settle` seconds passed without a new one.
Tests and tools that must see every worker pass `expect`; they never rely on the settle window.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from schemas.subjects import NATS_STATUS, NO_RESPONDERS

DISCOVERY_WINDOW = 0.5
DISCOVERY_SETTLE = 0.15


async def gather(
    nc: NATS,
    subject: str,
    window: float = DISCOVERY_WINDOW,
    *,
    expect: int | None = None,
    settle: float = DISCOVERY_SETTLE,
) -> list[dict[str, Any]]:
    """The JSON replies to one message on `subject`, one per instance (by `id`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: dict[str, dict[str, Any]] = {}
    try:
        await nc.publish(subject, b"", reply=inbox)
        while (wait := deadline - loop.time()) > 0 and (expect is None or len(replies) < expect):
            if replies and expect is None:
                wait = min(wait, settle)
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                break
            if (msg.headers or {}).get(NATS_STATUS) == NO_RESPONDERS:
                break
            reply = _json_object(msg.data)
            if reply is not None:
                replies[str(reply.get("id", len(replies)))] = reply
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return list(replies.values())


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None
