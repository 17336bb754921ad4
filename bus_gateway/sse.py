"""Server-Sent Events over a bus stream: open it (so early errors still get a proper HTTP status), then relay it.

The bus stream is always closed: at its end, on an error, when the HTTP client goes away while the stream is being
opened (before the worker's first chunk: `open_stream` watches for the disconnect) and while it is relayed (Litestar
cancels the sending task, and the response's background task closes what is left). Closing a bus stream that has
not ended publishes `llm.cancel.<request_id>` at once, so the worker frees the slot.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable

from litestar import Request
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from bus_gateway.bus_errors import BusError
from bus_gateway.client import BusClient
from bus_gateway.disconnect import ClientGone, unless_disconnected
from schemas import ChatChunk, ChatRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: bytes | str, event: str | None = None) -> bytes:
    """One SSE event. `data` must be a single line (compact JSON is)."""
    payload = data.encode() if isinstance(data, str) else data
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"


class EndWithError(Exception):
    """Raised by a renderer to end the stream: `events` (already rendered, the error last) are the last ones sent,
    and no trailer follows (for an answer that must not look complete)."""

    def __init__(self, events: list[bytes]) -> None:
        super().__init__("stream ended with an error")
        self.events = events


class OpenStream:
    """A bus stream whose first chunk has arrived: the worker accepted the request."""

    def __init__(self, first: ChatChunk, rest: AsyncGenerator[ChatChunk, None]) -> None:
        self.first = first
        self.rest = rest

    async def chunks(self) -> AsyncIterator[ChatChunk]:
        yield self.first
        if self.first.done:
            return
        async for chunk in self.rest:
            yield chunk

    async def close(self) -> None:
        """Ends the bus stream; one that had not ended is cancelled on the worker."""
        await self.rest.aclose()


async def open_stream(
    http: Request, bus: BusClient, request: ChatRequest, timeout: float, headers: dict[str, str] | None = None
) -> OpenStream | BusError:
    """Start a stream and wait for its first chunk (the worker's `accepted` chunk, sent before any token, so the SSE
    headers go out at once); a failure before it (no worker, 400, 503...) is returned, for a proper HTTP status.
    `timeout` is the stream's idle timeout: a long generation that keeps producing tokens is never cut.
    Raises `ClientGone` when the HTTP client `http` disconnects first: the stream is cancelled on the worker then,
    not after `timeout`."""
    rest = bus.stream(request, timeout, headers=headers)
    try:
        first = await unless_disconnected(http, anext(rest))
    except BusError as exc:
        await rest.aclose()
        return exc
    except ClientGone:
        await rest.aclose()  # already ended by the cancelled wait, which sent the cancel
        raise
    except StopAsyncIteration:
        return BusError(502, "the worker ended the stream without a chunk", name="bad_reply")
    return OpenStream(first, rest)


def sse_response(
    stream: OpenStream,
    render: Callable[[ChatChunk], Iterable[bytes]],
    on_error: Callable[[BusError], bytes],
    trailer: bytes = b"",
) -> Stream:
    """The `text/event-stream` response: each chunk through `render`, a mid-stream error through `on_error`, then
    `trailer`, unless an error ended the stream (a renderer may end it so: `EndWithError`)."""

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in stream.chunks():
                for event in render(chunk):
                    yield event
        except BusError as exc:
            yield on_error(exc)
            return
        except EndWithError as end:
            for event in end.events:
                yield event
            return
        finally:
            await stream.close()
        if trailer:
            yield trailer

    body = events()
    return Stream(
        body,
        media_type="text/event-stream",
        headers=SSE_HEADERS,
        background=BackgroundTask(_close_all, body, stream),
    )


async def _close_all(body: AsyncGenerator[bytes, None], stream: OpenStream) -> None:
    """After the response (finished or abandoned): close the relay, which closes (and cancels) the bus stream."""
    await body.aclose()
    await stream.close()
