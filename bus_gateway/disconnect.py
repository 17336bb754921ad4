"""Stop bus work when the HTTP client goes away: a non-streaming chat whose caller disconnected is cancelled on the
worker (as streams already are), so an abandoned call, or each of an SDK's retries, costs no full generation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from litestar import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready; the bus work was cancelled."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, but cancel it (the bus clients then cancel on the worker) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


async def _wait_for_disconnect(request: Request) -> None:
    """Read ASGI messages after the body until `http.disconnect` (the server sends it when the client leaves)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
