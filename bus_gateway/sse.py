"""Server-Sent Events over a bus stream: open it (so early errors still get a proper HTTP status), then relay it.

The relay always closes the bus stream: at its end, on an error, and when the HTTP client goes away
(Litestar cancels the sending task, and the response's background task closes what is left). Closing a bus
stream that has not ended publishes `llm.cancel.<request_id>`, so the worker frees the slot.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable

from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from bus_gateway.bus_errors import BusError
from bus_gateway.client import BusClient
from schemas import ChatChunk, ChatRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: bytes | str, event: str | None = None) -> bytes:
    """One SSE event. `data` must be a single line (compact JSON is)."""
    payload = data.encode() if isinstance(data, str) else data
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"


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
    bus: BusClient, request: ChatRequest, timeout: float, headers: dict[str, str] | None = None
) -> OpenStream | BusError:
    """Start a stream and wait for its first chunk (the worker's `accepted` chunk, sent before any token, so the SSE
    headers go out at once); a failure before it (no worker, 400, 503...) is returned, for a proper HTTP status.
    `timeout` is the stream's idle timeout: a long generation that keeps producing tokens is never cut."""
    rest = bus.stream(request, timeout, headers=headers)
    try:
        first = await anext(rest)
    except BusError as exc:
        await rest.aclose()
        return exc
    except StopAsyncIteration:
        return BusError(502, "the worker ended the stream without a chunk", name="bad_reply")
    return OpenStream(first, rest)


def sse_response(
    stream: OpenStream,
    render: Callable[[ChatChunk], Iterable[bytes]],
    on_error: Callable[[BusError], bytes],
    trailer: bytes = b"",
) -> Stream:
    """The `text/event-stream` response: each chunk through `render`, a mid-stream error through `on_error`."""

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in stream.chunks():
                for event in render(chunk):
                    yield event
        except BusError as exc:
            yield on_error(exc)
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
