"""Pure functions between bytes and the wire Structs. Errors are values (`WireError`), never exceptions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from schemas.errors import ERRORS
from schemas.messages import BatchEnvelope, BatchItemError, ChatRequest
from schemas.subjects import CONTENT_TYPE, JSON, MSGPACK

T = TypeVar("T")

MAX_CHAT_ID = 256

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


class WireError(msgspec.Struct, frozen=True):
    """A request that cannot be served: `code` follows HTTP (400 bad input, 413 too large, 503, 504...), and `name`
    is its row in `schemas.errors.ERRORS` (empty: the default for the code)."""

    code: int
    message: str
    name: str = ""

    @classmethod
    def of(cls, name: str, message: str) -> WireError:
        return cls(ERRORS[name].code, message, name)


def content_type(headers: Mapping[str, str] | None) -> str:
    """The encoding a message uses: MessagePack when its Content-Type says so, JSON otherwise."""
    if headers and headers.get(CONTENT_TYPE, "").split(";")[0].strip().lower() == MSGPACK:
        return MSGPACK
    return JSON


def encode(obj: Any, kind: str = JSON) -> bytes:
    return _msgpack_encoder.encode(obj) if kind == MSGPACK else _json_encoder.encode(obj)


def decode(data: bytes, type_: type[T], kind: str = JSON) -> T | WireError:
    if not data:
        return WireError(400, "empty request body: expected a JSON object")
    try:
        if kind == MSGPACK:
            return msgspec.msgpack.decode(data, type=type_)
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        return WireError(400, f"invalid request: {exc}")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        name = "MessagePack" if kind == MSGPACK else "JSON"
        return WireError(400, f"malformed {name}: {exc}")
    except RecursionError:
        return WireError(400, "malformed request: nested too deeply")


def check_chat_request(request: ChatRequest) -> WireError | None:
    """Rules msgspec's types cannot say: exactly one of `user_prompt` / `messages`."""
    if request.messages is not None and (request.user_prompt is not None or request.system_prompt is not None):
        return WireError(400, "invalid request: give either `messages` or `user_prompt`/`system_prompt`, not both")
    if request.messages is None and request.user_prompt is None:
        return WireError(400, "invalid request: `user_prompt` (or `messages`) is required")
    if request.messages is not None and all(m.role == "system" for m in request.messages):
        return WireError(400, "invalid request: `messages` needs at least one user or assistant message")
    return None


def decode_chat_request(data: bytes, kind: str = JSON) -> ChatRequest | WireError:
    request = decode(data, ChatRequest, kind)
    if isinstance(request, WireError):
        return request
    return check_chat_request(request) or request


class Batch(msgspec.Struct, frozen=True):
    """A decoded batch: each query, or the error that query alone got, in input order; and whether to stream."""

    items: list[ChatRequest | BatchItemError]
    stream: bool = False


def decode_batch(data: bytes, kind: str = JSON) -> Batch | WireError:
    """Each query of a batch decodes on its own; the batch itself fails only when its envelope is bad."""
    envelope = decode(data, BatchEnvelope, kind)
    if isinstance(envelope, WireError):
        return envelope
    if not envelope.queries:
        return WireError(400, "invalid request: `queries` is empty; send at least one query")
    items: list[ChatRequest | BatchItemError] = []
    for index, raw in enumerate(envelope.queries):
        query = decode_chat_request(bytes(raw), kind)
        if isinstance(query, WireError):
            message = at_query(query.message, index)
            query = BatchItemError(chat_id=raw_chat_id(bytes(raw), kind), error=message, code=query.code)
        items.append(query)
    return Batch(items, envelope.stream)


def at_query(message: str, index: int, field: str = "") -> str:
    """A query's error with its position in the batch, as msgspec writes one (`... - at `$.queries[3].top_p``)."""
    where = f"$.queries[{index}]"
    if "`$" in message:
        return message.replace("`$", f"`{where}", 1)
    return f"{message} - at `{where}{field}`"


def raw_chat_id(data: bytes, kind: str = JSON) -> str | None:
    """Best-effort `chat_id` of a query that failed to decode, so its error can still be matched."""
    try:
        obj = msgspec.msgpack.decode(data) if kind == MSGPACK else msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    value = obj.get("chat_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= MAX_CHAT_ID else None


def stop_strings(request: ChatRequest) -> tuple[str, ...]:
    if request.stop is None:
        return ()
    if isinstance(request.stop, str):
        return (request.stop,) if request.stop else ()
    return tuple(request.stop)


def conversation(request: ChatRequest) -> list[dict[str, str]]:
    """The chat-template input of a request, whichever form it came in."""
    if request.messages is not None:
        return [{"role": m.role, "content": m.content} for m in request.messages]
    turns = []
    if request.system_prompt:
        turns.append({"role": "system", "content": request.system_prompt})
    turns.append({"role": "user", "content": request.user_prompt or ""})
    return turns
