"""The native HTTP API: `POST /chat` (JSON or SSE) and `POST /chat/batched`, one-to-one with the bus subjects.

Bodies are decoded with the wire codec (`schemas.decode_chat_request` / `decode_batch`), so invalid input gets
the same message over HTTP as over NATS. Errors are `ErrorBody` JSON (`{"error", "code"}`); 503 and 429 carry
`Retry-After`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import msgspec
from litestar import Request, Response, Router, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import Guard

from bus_gateway.client import BusClient, BusError
from bus_gateway.sse import open_stream, sse_event, sse_response
from llmbus.config import Config
from schemas import (
    BatchItemError,
    BatchResponse,
    BatchResult,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ErrorBody,
    WireError,
    decode_batch,
    decode_chat_request,
)

RETRY_AFTER_SECONDS = 1


class BatchErrorBody(msgspec.Struct, kw_only=True):
    """A batch whose every query failed: the common code (else 400), and each query's own error in order."""

    error: str
    code: int
    responses: list[BatchResult]
    partial_success: bool = False


def retry_headers(status: int) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else {}


def http_status(code: int) -> int:
    return code if 400 <= code <= 599 else 502


def error_response(code: int, message: str) -> Response[ErrorBody]:
    status = http_status(code)
    return Response(ErrorBody(error=message, code=status), status_code=status, headers=retry_headers(status))


def bus_error_response(exc: BusError) -> Response[ErrorBody]:
    return error_response(exc.code, exc.message)


class ChatSender(Protocol):
    """Where non-streaming chats go: `BusClient` (core request-reply) or `JobClient` (durable JetStream jobs)."""

    async def chat(self, request: ChatRequest, timeout: float | None = None) -> ChatResponse: ...

    async def chat_batched(self, queries: Sequence[ChatRequest], timeout: float | None = None) -> BatchResponse: ...


def bus_of(state: State) -> BusClient:
    return state["bus"]


def sender_of(state: State) -> ChatSender:
    """Durable jobs when the bridge runs with `durable`, core request-reply otherwise."""
    return state.get("jobs") or state["bus"]


def config_of(state: State) -> Config:
    return state["config"]


ERROR_RESPONSES = {
    400: ResponseSpec(ErrorBody, description="Invalid request: the message names the field", generate_examples=False),
    401: ResponseSpec(
        ErrorBody, description="Missing or wrong API key (when keys are configured)", generate_examples=False
    ),
    413: ResponseSpec(ErrorBody, description="Prompt, batch or message too large", generate_examples=False),
    503: ResponseSpec(
        ErrorBody, description="No worker on the bus, or workers overloaded (see Retry-After)", generate_examples=False
    ),
    504: ResponseSpec(ErrorBody, description="No answer from a worker within the timeout", generate_examples=False),
}


def render_chunk(chunk: ChatChunk) -> Iterable[bytes]:
    return (sse_event(msgspec.json.encode(chunk)),)


def render_stream_error(exc: BusError) -> bytes:
    return sse_event(msgspec.json.encode(ErrorBody(error=exc.message, code=exc.code)), event="error")


@post(
    "/chat",
    status_code=200,
    summary="One chat completion (llm.chat)",
    description=(
        'Body: a ChatRequest. With `"stream": true` the answer is `text/event-stream`: one `data: <ChatChunk>` '
        "event per text delta, the last with `done: true`, `finish_reason` and `usage`; an error after the stream "
        "started is an `event: error` with an ErrorBody. Closing the connection cancels the generation."
    ),
    responses=ERROR_RESPONSES,
)
async def chat(request: Request, state: State) -> Response[ChatResponse]:
    parsed = decode_chat_request(await request.body())
    if isinstance(parsed, WireError):
        return error_response(parsed.code, parsed.message)
    timeout = config_of(state).request_timeout
    if parsed.stream:  # streams always use core request-reply (durable jobs do not stream)
        opened = await open_stream(bus_of(state), parsed, timeout)
        if isinstance(opened, BusError):
            return bus_error_response(opened)
        return sse_response(opened, render_chunk, render_stream_error)
    try:
        return Response(await sender_of(state).chat(parsed, timeout))
    except BusError as exc:
        return bus_error_response(exc)


@post(
    "/chat/batched",
    status_code=200,
    summary="Many chat completions in one request (llm.chat.batched)",
    description=(
        'Body: `{"queries": [ChatRequest, ...]}`. `responses` come in input order; a failed query is '
        "`{chat_id, error, code}` and sets `partial_success` and `message`. Every query failed: 400 (or the "
        "queries' common code) with each query's error in `responses`."
    ),
    responses=ERROR_RESPONSES,
)
async def chat_batched(request: Request, state: State) -> Response[BatchResponse]:
    items = decode_batch(await request.body())
    if isinstance(items, WireError):
        return error_response(items.code, items.message)
    valid = [item for item in items if isinstance(item, ChatRequest)]
    answered: list[BatchResult] | None = []
    if valid:  # only valid queries travel; the invalid ones keep their local error, in place
        try:
            answered = (await sender_of(state).chat_batched(valid, config_of(state).request_timeout)).responses
        except BusError as exc:
            answered = batch_results_of(exc)
            if answered is None:
                return bus_error_response(exc)
    if len(answered) != len(valid):
        return error_response(502, f"the worker answered {len(answered)} results for {len(valid)} queries")
    return batch_response(merge_batch(items, answered))


def merge_batch(items: list[ChatRequest | BatchItemError], answered: list[BatchResult]) -> list[BatchResult]:
    """Each query's result in input order: the worker's for the queries sent, the local error for the others."""
    results = iter(answered)
    return [BatchResult.failed(item) if isinstance(item, BatchItemError) else next(results) for item in items]


def batch_results_of(exc: BusError) -> list[BatchResult] | None:
    """The per-query results a worker's whole-batch error carries in its body (a BatchResponse), if any."""
    if not exc.body:
        return None
    try:
        return msgspec.json.decode(exc.body, type=BatchResponse).responses
    except msgspec.DecodeError:
        return None


def batch_response(results: list[BatchResult]) -> Response[Any]:
    """200 with `partial_success` when some failed; when all failed, their common code (else 400) and each error."""
    failed = [result for result in results if result.error is not None]
    if len(failed) == len(results):
        codes = {result.code or 400 for result in failed}
        code = http_status(codes.pop()) if len(codes) == 1 else 400
        error = f"every query of the batch failed ({len(failed)} of {len(results)}); see `responses`"
        return Response(BatchErrorBody(error=error, code=code, responses=results), status_code=code)
    answer = BatchResponse(responses=results)
    if failed:
        answer.partial_success = True
        answer.message = f"{len(failed)} of {len(results)} queries failed; the others were answered"
    return Response(answer)


def chat_router(guards: list[Guard]) -> Router:
    return Router(path="/", route_handlers=[chat, chat_batched], guards=guards, tags=["chat"])
