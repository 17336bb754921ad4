"""The header schemas of the AsyncAPI document (`schemas/asyncapi.py`): every header llmbus reads or writes, from the
names and patterns in `schemas/subjects.py` and the limits in `schemas/errors.py`, and the header sets each kind of
message carries. `asyncapi_messages.py` pairs them with the payloads."""

from __future__ import annotations

from typing import Any

from schemas.errors import MAX_HEADER_MESSAGE
from schemas.subjects import (
    CONTENT_TYPE,
    ERROR,
    ERROR_CODE,
    ERROR_NAME,
    JOB_ATTEMPTS,
    JOB_PUBLISHED,
    JSON,
    MSG_ID,
    MSGPACK,
    PROBE,
    REPLY_TO,
    REQUEST_ID,
    REQUEST_ID_PATTERN,
    STREAM,
    STREAM_CHUNK,
    STREAM_END,
    TENANT,
    TRACEPARENT,
    TRACESTATE,
)

Schema = dict[str, Any]
REF = "#/components/schemas/{name}"
TRACEPARENT_PATTERN = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


def ref(name: str) -> Schema:
    return {"$ref": REF.format(name=name)}


def _text(description: str, **constraints: Any) -> Schema:
    return {"type": "string", "description": description, **constraints}


HEADER_FIELDS: dict[str, Schema] = {
    CONTENT_TYPE: _text(
        f"`{MSGPACK}`: the body is MessagePack, and the answer is too. Absent or `{JSON}`: JSON.", enum=[JSON, MSGPACK]
    ),
    REQUEST_ID: _text(
        "The request's id: 1-128 of A-Z a-z 0-9 _ -. It names the cancel subject and tells two requests of one "
        "client apart; a worker makes one when it is absent and returns it on every stream message.",
        pattern=REQUEST_ID_PATTERN.pattern,
    ),
    TENANT: _text(
        "The tenant a request belongs to: admission rotates among tenants. The HTTP bridge sets it from the API "
        "key; a client may set it itself. Carried from a batch to each of its queries."
    ),
    TRACEPARENT: _text("W3C Trace Context; carried from a batch to each of its queries.", pattern=TRACEPARENT_PATTERN),
    TRACESTATE: _text("W3C Trace Context vendor state; carried with `traceparent`."),
    REPLY_TO: _text(
        "Durable job: the subject its answer is published to (under an allowed inbox prefix, `_INBOX.` by default; "
        "a job with any other is dropped without an answer). Cancel: the reply subject of the request to cancel."
    ),
    PROBE: _text(
        "Between workers: an empty message on a model's chat subject that a worker sends, with a reply subject of its "
        "own, before it forwards a request there; the server's no-responders status tells it nobody serves the "
        "model. A worker drops a message with this header unanswered. Clients do not set it."
    ),
    MSG_ID: _text("Durable job: equal to `Llmbus-Reply-To`, so JetStream stores a re-published job once."),
    JOB_PUBLISHED: _text(
        "Durable job stored again by a worker (forwarded to its model's queue, or put back at a clean shutdown): "
        "its first publication, in POSIX seconds of the NATS server's clock, from which its `timeout` counts. "
        "Clients do not set it."
    ),
    JOB_ATTEMPTS: _text(
        "Durable job stored again by a worker: the deliveries already charged to it, added to JetStream's count. "
        "Clients do not set it.",
        pattern="^[0-9]+$",
    ),
    ERROR: _text("A message for people (one line, control characters removed).", maxLength=MAX_HEADER_MESSAGE),
    ERROR_CODE: _text("The error's code, a number that follows HTTP (see `ErrorName`).", pattern="^[1-5][0-9]{2}$"),
    ERROR_NAME: ref("ErrorName"),
}


def _headers(description: str, names: list[str], required: tuple[str, ...] = (), **fixed: Schema) -> Schema:
    schema: Schema = {
        "type": "object",
        "description": description,
        "properties": {**{name: HEADER_FIELDS[name] for name in names}, **fixed},
    }
    if required:
        schema["required"] = list(required)
    return schema


def _marker(value: str, description: str) -> Schema:
    return {"type": "string", "const": value, "description": description}


def header_schemas() -> dict[str, Schema]:
    chunk = {STREAM: _marker(STREAM_CHUNK, "A stream message that is not the last.")}
    end = {STREAM: _marker(STREAM_END, "The last message of a stream (before the empty sentinel).")}
    traced = [CONTENT_TYPE, REQUEST_ID, TENANT, TRACEPARENT, TRACESTATE]
    return {
        "RequestHeaders": _headers("Headers of a request (all optional).", [*traced, PROBE]),
        "JobHeaders": _headers(
            "Headers of a durable job.",
            [REPLY_TO, REQUEST_ID, MSG_ID, JOB_PUBLISHED, JOB_ATTEMPTS, *traced[2:], CONTENT_TYPE],
            (REPLY_TO,),
        ),
        "CancelHeaders": _headers("Headers of a cancel.", [REPLY_TO], (REPLY_TO,)),
        "AnswerHeaders": _headers(
            f"Headers of a single answer: `{REQUEST_ID}` on a durable job's answer.", [CONTENT_TYPE, REQUEST_ID]
        ),
        "StreamChunkHeaders": _headers(
            "Headers of a stream message.", [REQUEST_ID, CONTENT_TYPE], (STREAM, REQUEST_ID), **chunk
        ),
        "StreamEndHeaders": _headers(
            "Headers of a stream's end message.", [REQUEST_ID, CONTENT_TYPE], (STREAM, REQUEST_ID), **end
        ),
        "ErrorHeaders": _headers(
            f"The ADR-32 error headers, plus `{ERROR_NAME}`; `{STREAM}: end` when the error ends a stream.",
            [ERROR_CODE, ERROR, ERROR_NAME, REQUEST_ID, CONTENT_TYPE],
            (ERROR_CODE, ERROR, ERROR_NAME),
            **end,
        ),
    }
