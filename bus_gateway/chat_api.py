"""The native HTTP API: `POST /chat` (JSON or SSE) and `POST /chat/batched`, one-to-one with the bus subjects.

Bodies are decoded with the wire codec (`schemas.decode_chat_request` / `decode_batch`), so invalid input gets
the same message over HTTP as over NATS. Errors are `ErrorBody` JSON (`{"error", "code"}`); 503 and 429 carry
`Retry-After`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec
from litestar import Request, Response, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

from bus_gateway.auth import tenant_headers
from bus_gateway.bus_errors import BusError, model_not_found, no_durable_worker
from bus_gateway.client import BusClient
from bus_gateway.disconnect import ClientGone, unless_disconnected
from bus_gateway.http_errors import bus_error_response, client_gone
from bus_gateway.model_catalog import ModelCatalog
from bus_gateway.sse import open_stream, sse_event, sse_response
from llmbus.config import Config
from schemas import (
    BatchResponse,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ErrorBody,
    WireError,
    decode_chat_request,
)


class ChatSender(Protocol):
    """Where non-streaming chats go: `BusClient` (core request-reply) or `JobClient` (durable JetStream jobs)."""

    async def chat(
        self, request: ChatRequest, timeout: float | None = None, *, headers: dict[str, str] | None = None
    ) -> ChatResponse: ...

    async def chat_batched(
        self, queries: Sequence[ChatRequest], timeout: float | None = None, *, headers: dict[str, str] | None = None
    ) -> BatchResponse: ...


def bus_of(state: State) -> BusClient:
    return state["bus"]


def sender_of(state: State) -> ChatSender:
    """Durable jobs when the bridge runs with `durable`, core request-reply otherwise."""
    return state.get("jobs") or state["bus"]


async def not_served(state: State, model: str) -> BusError | None:
    """For a durable job naming `model`: a 404 when workers are on the bus and none serves it with `--durable`
    (its `$SRV.INFO` metadata `durable`). Its queue would keep the job unread until it expires, and the caller would
    wait out its timeout (core request-reply gets the same 404 from no-responders). With no worker on the bus at
    all, the job is queued for the next one to start. A model not in the catalog's view is refused only after a
    thorough look that ended after this call began (`ModelCatalog.looked_since`): a slow worker is not missed."""
    catalog: ModelCatalog = state["models"]
    since = catalog.now()
    if model in (await catalog.models()).durable:
        return None
    models = await catalog.looked_since(since)
    if not models.workers or model in models.durable:
        return None
    if model not in models.workers:
        return model_not_found(model, sorted(models.workers))
    return no_durable_worker(model, sorted(models.durable))


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
        return bus_error_response(parsed)
    timeout = config_of(state).request_timeout
    if parsed.stream:  # streams always use core request-reply (durable jobs do not stream)
        try:
            opened = await open_stream(request, bus_of(state), parsed, timeout, tenant_headers(request))
        except ClientGone:
            return client_gone()
        if isinstance(opened, BusError):
            return bus_error_response(opened)
        return sse_response(opened, render_chunk, render_stream_error)
    try:
        if parsed.model and state.get("jobs") and (unserved := await not_served(state, parsed.model)) is not None:
            return bus_error_response(unserved)
        sending = sender_of(state).chat(parsed, timeout, headers=tenant_headers(request))
        return Response(await unless_disconnected(request, sending))
    except BusError as exc:
        return bus_error_response(exc)
    except ClientGone:
        return client_gone()
