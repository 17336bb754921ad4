"""Blocking torch work awaited from the event loop, in a thread that ends with it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_a_thread_of_its_own(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` in a new thread that ends with it. A torch op run in a long-lived thread (asyncio's
    executor) leaves that thread's OpenMP pool alive, and libgomp then counts more threads than cores and stops
    spinning at its barriers: a worker that loaded its model in the executor decoded one row at 25 ms a token, not
    13-14 (AMD EPYC, measured with `llmbus bench --concurrency 1`)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[object], None], value: object) -> None:
        if not done.done():  # the awaiting task may have been cancelled meanwhile
            outcome(value)

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, done.set_result, result)

    threading.Thread(target=run, name="llmbus-load", daemon=True).start()
    return await done
