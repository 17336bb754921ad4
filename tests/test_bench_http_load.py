"""The bench's HTTP load against a server that closes kept-alive connections without saying so, as llama.cpp's
`llama-server` did after every streamed answer: a real aiohttp client and a real socket server on loopback."""

from __future__ import annotations

import asyncio

from llmbus.bench.http_load import OpenAITarget, http_client, stream_over_http
from llmbus.bench.stats import RequestRecord

ANSWER = (
    b'data: {"choices":[{"delta":{"content":"Paris"}}]}\n\n'
    b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


class OneAnswerPerConnection:
    """Answers the first request of each connection with a streamed chat completion, keeping the connection open
    (HTTP/1.1, no `Connection: close`), then drops the connection when a second request arrives on it."""

    def __init__(self) -> None:
        self.connections = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ANSWER), ANSWER))
        await writer.drain()
        if await reader.read(1):  # the next request on this connection
            self.dropped += 1
        writer.transport.abort()


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)


async def test_a_request_on_a_connection_the_server_dropped_is_sent_again_on_a_new_one() -> None:
    server = OneAnswerPerConnection()
    target = OpenAITarget("peer", await server.start(), "smollm2")

    async def ask() -> RequestRecord:
        return await stream_over_http(client, target, "Capital of France?", 8, 30.0)

    try:
        async with http_client(8) as client:
            records = [await ask() for _ in range(3)]
            assert (server.dropped, server.connections) == (2, 3)  # the 2nd and 3rd went first to a used connection
            records += await asyncio.gather(*(ask() for _ in range(8)))  # 8 answered connections in the pool now
            dropped = server.dropped
            records.append(await ask())  # tries each of the 8 in turn, then a new connection
            assert server.dropped - dropped == 8
    finally:
        assert server.server is not None
        server.server.close()
    assert [record.error for record in records] == [None] * 12
    assert all(record.ok and record.finish_reason == "stop" for record in records)
