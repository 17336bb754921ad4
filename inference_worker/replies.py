"""Pure reply building: a held request plus an engine event (or an error) becomes the messages to publish.

A stream is, in order: an `accepted` chunk as soon as the worker has taken the request (empty `delta`, so an HTTP
bridge can send its SSE headers before the first token), one chunk per text delta, the end message (`Llmbus-Stream:
end`, `done: true`, or the error headers), then an empty message: the sentinel that `nats req --replies 0` and
nats.js `requestMany` stop at. A single answer is one message.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference_worker.engine import Finished
from inference_worker.held import Held
from schemas import ChatChunk, ChatResponse, ErrorBody, Usage, WireError, encode
from schemas.errors import MAX_BODY_MESSAGE, clean_text
from schemas.subjects import CONTENT_TYPE, MSGPACK, REQUEST_ID, STREAM, STREAM_CHUNK, STREAM_END


@dataclass(frozen=True, slots=True)
class Outgoing:
    data: bytes
    headers: dict[str, str] | None = None
    final: bool = True
    error: WireError | None = None  # an ADR-32 error answer (its headers are added when it is sent)


SENTINEL = Outgoing(b"", None, final=False)


def headers_for(kind: str, extra: dict[str, str] | None = None) -> dict[str, str] | None:
    headers = dict(extra or {})
    if kind == MSGPACK:
        headers[CONTENT_TYPE] = MSGPACK
    return headers or None


def usage_of(event: Finished) -> Usage:
    return Usage(event.prompt_tokens, event.completion_tokens, event.prompt_tokens + event.completion_tokens)


def _chunk(held: Held, chunk: ChatChunk, marker: str, final: bool) -> Outgoing:
    headers = headers_for(held.kind, {STREAM: marker, REQUEST_ID: held.request_id})
    return Outgoing(encode(chunk, held.kind), headers, final=final)


def accepted(held: Held) -> Outgoing:
    held.chunks_sent += 1
    return _chunk(held, ChatChunk(chat_id=held.chat_id, delta="", index=0), STREAM_CHUNK, final=False)


def delta(held: Held, text: str) -> Outgoing:
    chunk = ChatChunk(chat_id=held.chat_id, delta=text, index=held.chunks_sent)
    held.chunks_sent += 1
    return _chunk(held, chunk, STREAM_CHUNK, final=False)


def finished(held: Held, event: Finished, model: str) -> list[Outgoing]:
    if not held.stream:
        response = ChatResponse(
            chat_id=held.chat_id,
            response=event.text,
            finish_reason=event.finish_reason,
            usage=usage_of(event),
            model=model,
        )
        return [Outgoing(encode(response, held.kind), headers_for(held.kind))]
    end = ChatChunk(
        chat_id=held.chat_id,
        delta="",
        index=held.chunks_sent,
        done=True,
        finish_reason=event.finish_reason,
        usage=usage_of(event),
        model=model,
    )
    return [_chunk(held, end, STREAM_END, final=True), SENTINEL]


def error(kind: str, failure: WireError, *, stream: bool = False, request_id: str | None = None) -> list[Outgoing]:
    """An error answer; on a stream it is the end message (with the request id), followed by the sentinel."""
    message = clean_text(failure.message, MAX_BODY_MESSAGE)
    extra = {STREAM: STREAM_END} if stream else {}
    if stream and request_id is not None:
        extra[REQUEST_ID] = request_id
    answer = Outgoing(encode(ErrorBody(message, failure.code), kind), headers_for(kind, extra), error=failure)
    return [answer, SENTINEL] if stream else [answer]
