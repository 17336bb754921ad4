"""The messages of the AsyncAPI document (`schemas/asyncapi.py`): each is a payload from the wire Structs plus the
headers that travel with it. Payload schemas come from msgspec (`schema_components`); header schemas are built here
from the header names and patterns in `schemas/subjects.py` and the limits in `schemas/errors.py`."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.discovery import InfoResponse, PingResponse, StatsResponse
from schemas.errors import MAX_HEADER_MESSAGE, error_headers
from schemas.messages import (
    BatchDone,
    BatchItemDone,
    BatchRequest,
    BatchResponse,
    BatchResult,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ErrorBody,
    Usage,
)
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
EMPTY = "application/octet-stream"
TRACEPARENT_PATTERN = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

PAYLOADS: dict[str, type] = {
    t.__name__: t
    for t in (ChatRequest, ChatResponse, ChatChunk, BatchRequest, BatchResponse, BatchItemDone, BatchDone, ErrorBody)
}
DISCOVERY_PAYLOADS: dict[str, type] = {t.__name__: t for t in (PingResponse, InfoResponse, StatsResponse)}


def ref(name: str) -> Schema:
    return {"$ref": REF.format(name=name)}


def payload_schemas() -> dict[str, Schema]:
    """The JSON Schema of every payload Struct (and the Structs they use), keyed by Struct name."""
    _, components = msgspec.json.schema_components([*PAYLOADS.values(), *DISCOVERY_PAYLOADS.values()], ref_template=REF)
    return components


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
        "RequestHeaders": _headers("Headers of a request (all optional).", traced),
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


def _example(name: str, payload: Any = None, headers: dict[str, str] | None = None) -> Schema:
    example: Schema = {"name": name}
    if headers:
        example["headers"] = headers
    if payload is not None:
        example["payload"] = payload if isinstance(payload, dict) else msgspec.to_builtins(payload)
    return example


def _message(
    name: str, summary: str, payload: Schema, headers: str | None, *examples: Schema, content: str = JSON
) -> Schema:
    message: Schema = {"name": name, "summary": summary, "contentType": content, "payload": payload}
    if headers:
        message["headers"] = ref(headers)
    if examples:
        message["examples"] = list(examples)
    return message


MODEL = "SmolLM2-135M-Instruct"
USAGE = Usage(prompt_tokens=37, completion_tokens=8, total_tokens=45)
ANSWER = ChatResponse(
    chat_id="1", response="The capital of France is Paris.", finish_reason="stop", usage=USAGE, model=MODEL
)
EMPTY_QUERY = "invalid request: Expected `str` of length >= 1 - at `$.queries[1].user_prompt`"
FAILED = BatchResult(chat_id="b", error=EMPTY_QUERY, code=400)
ASK = {"chat_id": "1", "user_prompt": "What is the capital of France?", "max_tokens": 32}
ASK_STREAM = {"chat_id": "2", "user_prompt": "Count to 3", "stream": True}
BATCH = {"queries": [{"chat_id": "a", "user_prompt": "Hi"}, {"chat_id": "b", "user_prompt": "Name a colour."}]}
INBOX = "_INBOX.Qx2p7tYhXh0sXbeI7mnMhT"
CHUNK = {STREAM: STREAM_CHUNK, REQUEST_ID: "req-2"}
END = {STREAM: STREAM_END, REQUEST_ID: "req-2"}
JOB = {REPLY_TO: f"{INBOX}.req-3", REQUEST_ID: "req-3", MSG_ID: f"{INBOX}.req-3"}
EMPTY_BODY = {"type": "string", "maxLength": 0, "description": "Zero bytes, and no headers."}
STREAM_END_PAYLOAD = {
    "allOf": [
        ref("ChatChunk"),
        {"properties": {"done": {"const": True}}, "required": ["done", "finish_reason", "usage", "model"]},
    ]
}


def request_messages() -> dict[str, Schema]:
    return {
        "ChatRequest": _message(
            "ChatRequest",
            'One chat completion; `"stream": true` asks for a stream.',
            ref("ChatRequest"),
            "RequestHeaders",
            _example("one answer", ASK),
            _example("stream", ASK_STREAM, {REQUEST_ID: "req-2"}),
        ),
        "BatchRequest": _message(
            "BatchRequest",
            'Many chats in one message; `"stream": true` sends each result as soon as it is ready.',
            ref("BatchRequest"),
            "RequestHeaders",
            _example("two queries", BATCH),
        ),
        "ChatJob": _message(
            "ChatJob", "A ChatRequest as a durable job.", ref("ChatRequest"), "JobHeaders", _example("job", ASK, JOB)
        ),
        "BatchJob": _message(
            "BatchJob",
            "A BatchRequest as a durable job.",
            ref("BatchRequest"),
            "JobHeaders",
            _example("job", BATCH, JOB),
        ),
        "Cancel": _message(
            "Cancel",
            "Stops the request that the subject's id and `Llmbus-Reply-To` name.",
            {"description": "Ignored: send an empty body."},
            "CancelHeaders",
            _example("cancel", headers={REPLY_TO: f"{INBOX}.req-2"}),
            content=EMPTY,
        ),
        "DiscoveryRequest": _message("DiscoveryRequest", "An empty request.", EMPTY_BODY, None, content=EMPTY),
    }


def answer_messages() -> dict[str, Schema]:
    bad = ErrorBody("invalid request: unknown field `max_token`", 400)
    end = ChatChunk(chat_id="2", delta="", index=3, done=True, finish_reason="stop", usage=USAGE, model=MODEL)
    partial = BatchResponse.of([BatchResult.ok(msgspec.structs.replace(ANSWER, chat_id="a")), FAILED])
    failed = BatchResponse.of([FAILED])
    return {
        "ChatResponse": _message(
            "ChatResponse", "The answer to a chat.", ref("ChatResponse"), "AnswerHeaders", _example("answer", ANSWER)
        ),
        "ChatChunk": _message(
            "ChatChunk",
            "A stream message: first the accepted chunk (`index` 0, empty `delta`), then one per text delta.",
            ref("ChatChunk"),
            "StreamChunkHeaders",
            _example("accepted", ChatChunk(chat_id="2", delta="", index=0), CHUNK),
            _example("delta", ChatChunk(chat_id="2", delta="1, 2, 3", index=1), CHUNK),
        ),
        "ChatStreamEnd": _message(
            "ChatStreamEnd",
            "The end of a stream: `done: true`, with `finish_reason`, `usage` and `model`.",
            STREAM_END_PAYLOAD,
            "StreamEndHeaders",
            _example("end", end, END),
        ),
        "BatchResponse": _message(
            "BatchResponse",
            "Every query's result in input order (a failed query is `{chat_id, error, code}`).",
            ref("BatchResponse"),
            "AnswerHeaders",
            _example("partial success", partial),
        ),
        "BatchItemDone": _message(
            "BatchItemDone",
            "The result of query `index`, sent as soon as it is ready (in completion order).",
            ref("BatchItemDone"),
            "StreamChunkHeaders",
            _example("item", BatchItemDone(index=1, result=FAILED), CHUNK),
        ),
        "BatchDone": _message(
            "BatchDone",
            "The end of a streamed batch: how many queries were answered and how many failed.",
            ref("BatchDone"),
            "StreamEndHeaders",
            _example("end", BatchDone.of(1, 1), END),
        ),
        "Error": _message(
            "Error",
            "An error answer: the error headers, and an ErrorBody.",
            ref("ErrorBody"),
            "ErrorHeaders",
            _example("bad request", bad, error_headers(bad.code, bad.error, "bad_request")),
        ),
        "BatchFailed": _message(
            "BatchFailed",
            "Every query of a batch failed: the error headers, and the BatchResponse with each query's error.",
            ref("BatchResponse"),
            "ErrorHeaders",
            _example("all failed", failed, error_headers(400, failed.message or "", "bad_request")),
        ),
        "StreamSentinel": _message(
            "StreamSentinel",
            "The empty message after a stream's end; `nats req --replies 0` and nats.js `requestMany` stop at it.",
            EMPTY_BODY,
            None,
            content=EMPTY,
        ),
        **{
            name: _message(name, f"nats micro's {name.removesuffix('Response').upper()} answer.", ref(name), None)
            for name in DISCOVERY_PAYLOADS
        },
    }
