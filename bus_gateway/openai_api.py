"""OpenAI-compatible API: `POST /v1/chat/completions` (JSON or SSE) and `GET /v1/models`, over the same bus.

Point any OpenAI SDK at it: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<key, or anything>")`.
The served model names are the workers' `$SRV.INFO` metadata `model`; the request must name one exactly.
"""

from __future__ import annotations

import asyncio
import time
import uuid

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
from bus_gateway.discovery import BusModels
from bus_gateway.openai_translate import (
    ApiFailure,
    ChunkRenderer,
    from_bus_error,
    parse_request,
    to_chat_request,
    to_completion,
)
from bus_gateway.openai_types import ChatCompletion, ModelCard, ModelList, OpenAIErrorBody
from bus_gateway.sse import open_stream, sse_event, sse_response
from llmbus.config import Config
from schemas import ChatChunk

CATALOG_TTL = 10.0
DONE = b"data: [DONE]\n\n"


class ModelCatalog:
    """The models the workers serve, with how many workers serve each, from `$SRV.INFO`.

    Gathering `$SRV.INFO` takes the discovery's settle window (about 0.15 s), so no caller waits on another's
    gathering unless it needs one itself: a catalog older than `ttl` is still answered while one gathering runs in
    the background, and callers that need a fresh one (`GET /v1/models`, a model not seen yet) share the gathering
    in flight. So polling `/v1/models`, or naming unknown models, never delays completions of served models."""

    def __init__(self, bus: BusClient, ttl: float = CATALOG_TTL) -> None:
        self.bus = bus
        self.ttl = ttl
        self.first_seen: dict[str, int] = {}
        self._models = BusModels()
        self._fetched_at: float | None = None
        self._gathering: asyncio.Future[BusModels] | None = None

    async def models(self, *, fresh: bool = False) -> BusModels:
        if fresh or self._fetched_at is None:
            return await asyncio.shield(self._gather())
        if asyncio.get_running_loop().time() - self._fetched_at > self.ttl:
            self._gather()
        return self._models

    def _gather(self) -> asyncio.Future[BusModels]:
        """The gathering in flight, or a new one."""
        if self._gathering is None:
            self._gathering = asyncio.ensure_future(self._fetch())
            self._gathering.add_done_callback(_seen)
        return self._gathering

    async def _fetch(self) -> BusModels:
        try:
            models = await self.bus.bus_models()
        finally:
            self._gathering = None
        self._models, self._fetched_at = models, asyncio.get_running_loop().time()
        for name in models.workers:
            self.first_seen.setdefault(name, int(time.time()))
        return models

    async def names(self, *, fresh: bool = False) -> list[str]:
        return sorted((await self.models(fresh=fresh)).workers)

    def card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.first_seen.get(name, 0), workers=self._models.workers.get(name, 0))

    async def resolve(self, model: str) -> str | ApiFailure:
        """`model` when a worker serves it; 404 when none does, 503 when no worker answers at all."""
        try:
            if model in await self.names() or model in await self.names(fresh=True):
                return model
            served = await self.names()
        except BusError as exc:
            return from_bus_error(exc)
        if not served:
            return ApiFailure(
                503, "no inference worker is on the bus (none answers $SRV.INFO)", "server_error", None, "no_responders"
            )
        return ApiFailure(
            404,
            f"The model `{model}` does not exist or is not served here; served: {', '.join(served)}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


def _seen(gathering: asyncio.Future[BusModels]) -> None:
    """A gathering whose callers all went away (or a background one) does not log its failure as never retrieved:
    the next caller that needs the catalog fresh gathers again and gets the error itself."""
    if not gathering.cancelled():
        gathering.exception()


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
        503: "No worker on the bus (see Retry-After)",
        504: "No answer within the timeout",
    }.items()
}


@post(
    "/chat/completions",
    status_code=200,
    summary="OpenAI-compatible chat completion",
    description=(
        "OpenAI Chat Completions: model, messages, max_tokens / max_completion_tokens, temperature (default 1), "
        "top_p, stop, seed, stream, stream_options.include_usage, user. `stream: true` answers SSE chunks ending "
        "with `data: [DONE]`. n > 1, tools, logprobs, penalties and non-text response formats are 400s."
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
        opened = await open_stream(bus, bus_request, config.request_timeout, tenant_headers(request))
        if isinstance(opened, BusError):
            return failure_response(from_bus_error(opened))
        include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
        renderer = ChunkRenderer(completion_id, created, model, include_usage)

        def render(chunk: ChatChunk) -> list[bytes]:
            return [sse_event(msgspec.json.encode(out)) for out in renderer.render(chunk)]

        return sse_response(opened, render, render_stream_error, trailer=DONE)
    if state.get("jobs") and (unserved := await not_served(state, model)) is not None:
        return failure_response(from_bus_error(unserved))  # a durable job that no worker of its model would read
    try:
        sending = sender_of(state).chat(bus_request, config.request_timeout, headers=tenant_headers(request))
        reply = await unless_disconnected(request, sending)
    except BusError as exc:
        return failure_response(from_bus_error(exc))
    except ClientGone:
        return failure_response(ApiFailure(499, "client closed the request", "invalid_request_error"))
    return Response(to_completion(reply, completion_id, created))


def render_stream_error(exc: BusError) -> bytes:
    return sse_event(msgspec.json.encode(from_bus_error(exc).body()))


@get("/models", summary="The models the workers on the bus serve (OpenAI format)", responses=ERRORS)
async def list_models(state: State) -> Response[ModelList]:
    catalog = catalog_of(state)
    try:
        names = await catalog.names(fresh=True)
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
