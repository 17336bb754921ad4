"""The messages of the AsyncAPI document (`schemas/asyncapi.py`): each is a payload from the wire Structs plus the
headers that travel with it. Payload schemas come from msgspec (`schema_components`); header schemas are
`schemas/asyncapi_headers.py`'s."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.asyncapi_headers import REF, Schema, ref
from schemas.discovery import InfoResponse, PingResponse, StatsResponse
from schemas.errors import error_headers
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
    WorkerLeft,
)
from schemas.subjects import (
    JSON,
    MSG_ID,
    REPLY_TO,
    REQUEST_ID,
    STREAM,
    STREAM_CHUNK,
    STREAM_END,
)

EMPTY = "application/octet-stream"

PAYLOADS: dict[str, type] = {
    t.__name__: t
    for t in (
        ChatRequest,
        ChatResponse,
        ChatChunk,
        BatchRequest,
        BatchResponse,
        BatchItemDone,
        BatchDone,
        ErrorBody,
        WorkerLeft,
    )
}
DISCOVERY_PAYLOADS: dict[str, type] = {t.__name__: t for t in (PingResponse, InfoResponse, StatsResponse)}


def payload_schemas() -> dict[str, Schema]:
    """The JSON Schema of every payload Struct (and the Structs they use), keyed by Struct name."""
    _, components = msgspec.json.schema_components([*PAYLOADS.values(), *DISCOVERY_PAYLOADS.values()], ref_template=REF)
    return components


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
        "WorkerLeft": _message(
            "WorkerLeft",
            "A worker left the bus: the model it served, and its micro service id.",
            ref("WorkerLeft"),
            None,
            _example("left", WorkerLeft(model=MODEL, id="Qx2p7tYhXh0sXbeI7mnMhU")),
        ),
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
