"""Share a host's cores among the workers that run on it.

Each worker uses one torch thread per core by default. Two workers on one machine would then run twice as many
busy threads as there are cores, and each step of each waits for threads the other has preempted (a drain under
load took 13 s to over 60 s here). With `threads` left at 0 (auto), a worker counts the workers on its own host
(`$SRV.PING` metadata `host`) every few seconds and uses `cores // workers` threads, at least one. A worker
always counts itself, even while it drains (a draining worker no longer answers PING, but still computes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger("llmbus.worker")

RECOUNT_S = 5.0

Ping = Callable[[], Awaitable[list[dict]]]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def workers_on_host(replies: list[dict], host: str, own_id: str) -> int:
    """This worker and the others on `host` (by their `$SRV.PING` replies)."""
    others = {reply.get("id") for reply in replies if reply.get("metadata", {}).get("host") == host}
    return 1 + len(others - {own_id})


def fair_threads(total_cores: int, workers: int) -> int:
    return max(1, total_cores // max(1, workers))


async def share_threads(
    ping: Ping, set_threads: Callable[[int], None], own_id: str, interval: float = RECOUNT_S
) -> None:
    """Recount the workers on this host every `interval` seconds and set this worker's thread count."""
    host = socket.gethostname()
    current = cores()
    while True:
        with contextlib.suppress(Exception):  # a discovery hiccup keeps the current setting
            wanted = fair_threads(cores(), workers_on_host(await ping(), host, own_id))
            if wanted != current:
                log.info("%d cores shared by the workers on %s: using %d torch threads", cores(), host, wanted)
                set_threads(wanted)
                current = wanted
        await asyncio.sleep(interval)
