"""A worker says it serves only once the server has its subscriptions.

nats.py's `flush()` writes its PING to the socket at once, ahead of the SUB commands `subscribe` left queued for the
connection's flusher task, so its PONG could come back before the server had read them. Over TLS the server reads
each write as a record of its own, and a loaded server may answer the PING before it reads the next record: CI saw a
worker report it served, and a request sent at once came back as a no-responders 503 ("no inference worker is
listening on tiny.chat"), about 1 start in 130 in a loop over TLS. `PingGate` makes that server's delay certain: it
holds whatever a client sends after a PING, so only a PONG that comes after the SUBs proves the server has them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus_gateway.client import BusClient
from helpers.workers import tiny_worker
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import ChatRequest

PING = b"PING\r\n"
HOLD_S = 0.5


class PingGate:
    """A TCP proxy in front of a nats-server that, after each PING a client sends, holds what that client sends
    next for `hold` seconds (the server's answers pass at once)."""

    def __init__(self, upstream: str, hold: float = HOLD_S) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 4222
        self.hold = hold
        self.url = ""
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[PingGate]:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            self._server.close()
            for pump in self._pumps:
                pump.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accepted(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_connection(self.host, self.port)
        for pump in (self._to_server(client_in, server_out), self._copy(server_in, client_out)):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                while (end := data.find(PING)) >= 0:
                    writer.write(data[: end + len(PING)])
                    await writer.drain()
                    data = data[end + len(PING) :]
                    await asyncio.sleep(self.hold)  # what came after the PING reaches the server late
                writer.write(data)
                await writer.drain()
        writer.close()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


async def echo(msg: Msg) -> None:
    await msg.respond(b"echo: " + msg.data)


async def test_a_subscription_is_on_the_server_once_flushed(fresh_nats_server: NatsServer, fresh_nc: NATS) -> None:
    async with PingGate(fresh_nats_server.url).running() as gate:
        subscriber = await nats.connect(gate.url)
        try:
            await subscriber.subscribe("flushed.echo", queue="q", cb=echo)
            await flushed(subscriber)
            answer = await fresh_nc.request("flushed.echo", b"hi", timeout=10, headers={"a": "b"})  # 503: raises
        finally:
            await subscriber.close()
    assert answer.data == b"echo: hi"


async def test_a_started_worker_answers_a_request_sent_at_once(fresh_nats_server: NatsServer, fresh_nc: NATS) -> None:
    """Sent the moment `start` returns, on the model-less subject, as the CI test's client did: answered, never a
    no-responders 503 from a server that had not seen the worker's SUBs yet."""
    request = ChatRequest(chat_id="at-once", user_prompt="hi", max_tokens=2)
    async with (
        PingGate(fresh_nats_server.url).running() as gate,
        tiny_worker(gate.url, max_tokens_cap=4),
        BusClient(fresh_nc, timeout=60) as client,
    ):
        chunks = [chunk async for chunk in client.stream(request)]
    assert chunks[-1].done and chunks[-1].usage.completion_tokens == 2
