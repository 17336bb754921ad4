"""OpenAI-compatible API: `POST /v1/chat/completions` (JSON or SSE) and `GET /v1/models`, over the same bus.

Point any OpenAI SDK at it: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<key, or anything>")`.
The served model names are the workers' `$SRV.INFO` metadata `model` (`model_catalog`); the request must name one
exactly. An answer cut off before it finished (the bridge stopping, a cancel the client did not send) is an error,
never a finish reason (`openai_answers`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath
from litestar.types import Guard

from bus_gateway.auth import ApiKeyError, tenant_headers
from bus_gateway.bus_errors import BusError
from bus_gateway.chat_api import not_served, sender_of
from bus_gateway.client import BusClient
from bus_gateway.disconnect import ClientGone, unless_disconnected
from bus_gateway.model_catalog import ModelCatalog
from bus_gateway.openai_answers import ChunkRenderer, cut_off, is_cut_off, to_completion
from bus_gateway.openai_translate import ApiFailure, from_bus_error, parse_request, to_chat_request
from bus_gateway.openai_types import ChatCompletion, ModelCard, ModelList, OpenAIErrorBody
from bus_gateway.sse import EndWithError, open_stream, sse_event, sse_response
from llmbus.config import Config
from schemas import ChatChunk

__all__ = ["ModelCatalog", "openai_router"]

DONE = b"data: [DONE]\n\n"


def failure_response(failure: ApiFailure) -> Response[OpenAIErrorBody]:
    retry_after = 1 if failure.status in (429, 503) else None  # the table's Retry-After for both
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    return Response(failure.body(), status_code=failure.status, headers=headers)


def api_key_error_response(_: Request, exc: ApiKeyError) -> Response[OpenAIErrorBody]:
    failure = ApiFailure(401, exc.message, "invalid_request_error", None, "invalid_api_key")
    return Response(failure.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})


def catalog_of(state: State) -> ModelCatalog:
    return state["models"]


ERRORS = {
    status: ResponseSpec(OpenAIErrorBody, description=description, generate_examples=False)
    for status, description in {
        400: "Invalid or unsupported parameter (OpenAI error format)",
        401: "Missing or wrong API key (when keys are configured)",
        404: "Unknown model",
        429: "Workers overloaded (see Retry-After)",
        503: "No worker on the bus, or the answer was cut off before it finished (see Retry-After)",
        504: "No answer within the timeout",
    }.items()
}


@post(
    "/chat/completions",
    status_code=200,
    summary="OpenAI-compatible chat completion",
    description=(
        "OpenAI Chat Completions: model, messages, max_tokens / max_completion_tokens, temperature (default 1), "
        "top_p, stop, seed, stream, stream_options.include_usage (with `stream: true` only), user. `stream: true` "
        "answers SSE chunks ending with `data: [DONE]`; an answer cut off before it finished (the bridge stopping) "
        "is a 503, or ends its stream with an error event and no `[DONE]`. n > 1, tools, logprobs, penalties and "
        "non-text response formats are 400s."
    ),
    responses=ERRORS,
)
async def chat_completions(request: Request, state: State) -> Response[ChatCompletion]:
    parsed = parse_request(await request.body())
    if isinstance(parsed, ApiFailure):
        return failure_response(parsed)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    bus_request = to_chat_request(parsed, completion_id)
    if isinstance(bus_request, ApiFailure):
        return failure_response(bus_request)
    model = await catalog_of(state).resolve(parsed.model)
    if isinstance(model, ApiFailure):
        return failure_response(model)
    bus_request = msgspec.structs.replace(bus_request, model=model)  # answered by that model's workers only
    bus: BusClient = state["bus"]
    config: Config = state["config"]
    created = int(time.time())
    if bus_request.stream:
        try:
            opened = await open_stream(request, bus, bus_request, config.request_timeout, tenant_headers(request))
        except ClientGone:
            return failure_response(CLIENT_GONE)
        if isinstance(opened, BusError):
            return failure_response(from_bus_error(opened))
        include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
        renderer = ChunkRenderer(completion_id, created, model, include_usage)

        def render(chunk: ChatChunk) -> Iterator[bytes]:
            events = [sse_event(msgspec.json.encode(out)) for out in renderer.render(chunk)]
            if chunk.done and is_cut_off(chunk.finish_reason):  # its text, then the error; no [DONE]
                raise EndWithError([*events, render_failure(cut_off(bridge_stopping(state)))])
            return iter(events)

        return sse_response(opened, render, render_stream_error, trailer=DONE)
    if state.get("jobs") and (unserved := await not_served(state, model)) is not None:
        return failure_response(from_bus_error(unserved))  # a durable job that no worker of its model would read
    try:
        sending = sender_of(state).chat(bus_request, config.request_timeout, headers=tenant_headers(request))
        reply = await unless_disconnected(request, sending)
    except BusError as exc:
        return failure_response(from_bus_error(exc))
    except ClientGone:
        return failure_response(CLIENT_GONE)
    if is_cut_off(reply.finish_reason):
        return failure_response(cut_off(bridge_stopping(state)))
    return Response(to_completion(reply, completion_id, created))


CLIENT_GONE = ApiFailure(499, "client closed the request", "invalid_request_error")


def bridge_stopping(state: State) -> bool:
    """Whether the bridge is ending its open streams as it stops (serve.py sets `stopping`)."""
    return bool(state.get("stopping"))


def render_failure(failure: ApiFailure) -> bytes:
    """An error as the last event of an OpenAI stream: `data: {"error": {...}}`, which the SDKs raise."""
    return sse_event(msgspec.json.encode(failure.body()))


def render_stream_error(exc: BusError) -> bytes:
    return render_failure(from_bus_error(exc))


@get("/models", summary="The models the workers on the bus serve (OpenAI format)", responses=ERRORS)
async def list_models(state: State) -> Response[ModelList]:
    catalog = catalog_of(state)
    try:
        names = await catalog.listing()
    except BusError as exc:
        return failure_response(from_bus_error(exc))
    return Response(ModelList(data=[catalog.card(name) for name in names]))


@get("/models/{model:path}", summary="One served model (OpenAI format)", responses=ERRORS)
async def retrieve_model(model: FromPath[str], state: State) -> Response[ModelCard]:
    name = model.lstrip("/")
    catalog = catalog_of(state)
    resolved = await catalog.resolve(name)
    if isinstance(resolved, ApiFailure):
        return failure_response(resolved)
    return Response(catalog.card(resolved))


def openai_router(guards: list[Guard]) -> Router:
    return Router(
        path="/v1",
        route_handlers=[chat_completions, list_models, retrieve_model],
        guards=guards,
        exception_handlers={ApiKeyError: api_key_error_response},
        tags=["openai"],
    )
