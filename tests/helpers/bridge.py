"""Helpers for the bridge and client tests: run the real bridge (`run_gateway`, uvicorn on a free loopback port),
watch cancel messages, play a hung worker, and read SSE bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus_gateway.serve import run_gateway
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import free_port

API_KEY = "sk-llmbus-test"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


@dataclass
class Bridge:
    config: Config
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def url(self) -> str:
        return f"http://{self.config.http_host}:{self.config.http_port}"

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=60, **kwargs)

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, STOP_TIMEOUT_S)


async def start_bridge(config: Config) -> Bridge:
    """Run the bridge in this event loop and wait until it accepts connections."""
    config = replace(config, http_host="127.0.0.1", http_port=free_port())
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_gateway(config, stop, ready))
    ready_wait = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, ready_wait}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready_wait.cancel()
        task.result()
        raise RuntimeError("the bridge returned before it was ready")
    if ready_wait not in done:
        ready_wait.cancel()
        stop.set()
        raise TimeoutError(f"the bridge was not ready within {READY_TIMEOUT_S}s")
    return Bridge(config, stop, task)


@contextlib.asynccontextmanager
async def running_bridge(config: Config) -> AsyncIterator[Bridge]:
    bridge = await start_bridge(config)
    try:
        yield bridge
    finally:
        await bridge.shutdown()


class CancelWatch:
    """Records every `<prefix>.cancel.<id>` message on the bus."""

    def __init__(self, prefix: str = "llm") -> None:
        self.subject = f"{prefix}.cancel.*"
        self.seen: asyncio.Queue[str] = asyncio.Queue()

    async def on_msg(self, msg: Msg) -> None:
        self.seen.put_nowait(msg.subject.rsplit(".", 1)[-1])

    async def next_id(self, timeout: float = 10.0) -> str:
        return await asyncio.wait_for(self.seen.get(), timeout)


@contextlib.asynccontextmanager
async def watching_cancels(nc: NATS, prefix: str = "llm") -> AsyncIterator[CancelWatch]:
    watch = CancelWatch(prefix)
    sub = await nc.subscribe(watch.subject, cb=watch.on_msg)
    await flushed(nc)
    try:
        yield watch
    finally:
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def silent_responder(url: str, subject: str) -> AsyncIterator[NATS]:
    """A plain NATS subscriber that takes requests on `subject` and never answers (a hung worker)."""
    nc = await nats.connect(url)
    await nc.subscribe(subject)
    await flushed(nc)
    try:
        yield nc
    finally:
        await nc.close()


def sse_data(lines: list[str]) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


def sse_json(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(data) for data in sse_data(lines) if data != "[DONE]"]
