"""The HTTP bridge: a Litestar app over a `BusClient`, served by uvicorn (serve.py).

Routes: `POST /chat`, `POST /chat/batched` (chat_api), `POST /v1/chat/completions`, `GET /v1/models` (openai_api),
`GET /healthz` (bridge up and NATS connected), `GET /readyz` (a worker on the bridge's subject prefix answers
`$SRV.PING`; readiness.py), `GET /openapi.json`
(and an offline viewer at `/docs`), `GET /metrics` (Prometheus; metrics.py, which also carries each request's trace
context onto the bus), and the web page (web.py: `/`, `/bus`, `/bus.json`, `/static/`).
With API keys configured, `/chat*`, `/v1/*` and `/bus.json` need `Authorization: Bearer <key>` (`/readyz` stays
open for probes, without the model list).
Optional: HTTPS (`http_tls_cert`/`http_tls_key`), a requests-per-minute limit per API key on `/chat*` and `/v1/*`
(429 with `Retry-After`), and CORS for the configured origins only (off by default).
With `durable`, non-streaming chats go through the JetStream work queue (`JobClient`); streams stay core.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, Router, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig

from bus_gateway.auth import ApiKeyError, RateLimited, api_key_guard, rate_limit_guard
from bus_gateway.batch_api import chat_batched
from bus_gateway.chat_api import chat
from bus_gateway.client import BusClient
from bus_gateway.http_errors import error_response, retry_headers
from bus_gateway.jobs import JobClient
from bus_gateway.metrics import BridgeMetrics, CountingErrors, metrics_endpoint, observe_http
from bus_gateway.model_catalog import ModelCatalog
from bus_gateway.openai_api import openai_router
from bus_gateway.openai_translate import ApiFailure
from bus_gateway.openai_types import ChatCompletionRequest
from bus_gateway.openapi_doc import WireJsonRenderPlugin, with_request_bodies
from bus_gateway.readiness import Readiness, readyz
from bus_gateway.web import OfflineDocsPlugin, docs_router, web_routes
from llmbus.config import Config
from llmbus.connection import connected_to
from schemas import BatchRequest, ChatRequest, ErrorBody
from schemas.errors import ERRORS

log = logging.getLogger("llmbus.gateway")

ClientFactory = Callable[[], Awaitable[BusClient]]
EXPOSED_HEADERS = ["Retry-After"]  # what a browser app may read of an answer, beyond the CORS-safelisted headers

REQUEST_BODIES = {
    ("/chat", "post"): ChatRequest,
    ("/chat/batched", "post"): BatchRequest,
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
}


class HealthBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: str
    nats: str
    server: str | None = None


@get("/healthz", summary="The bridge is up and connected to NATS", sync_to_thread=False, tags=["health"])
def healthz(state: State) -> Response[HealthBody]:
    bus: BusClient = state["bus"]
    nc = bus.nc
    if nc.is_connected:
        return Response(HealthBody(status="ok", nats="connected", server=connected_to(nc)))
    nats_state = "closed" if nc.is_closed else "reconnecting" if nc.is_reconnecting else "disconnected"
    return Response(
        HealthBody(status="unavailable", nats=nats_state),
        status_code=503,
        headers=retry_headers(ERRORS["not_connected"]),
    )


@get("/openapi.json", include_in_schema=False, sync_to_thread=False, media_type="application/vnd.oai.openapi+json")
def openapi_json(request: Request) -> dict[str, Any]:
    return with_request_bodies(request.app.openapi_schema.to_schema(), REQUEST_BODIES)


def http_exception_response(request: Request, exc: Exception) -> Response[Any]:
    """Framework errors (404, 405, 413 body too large, 500) in the error shape of the API that was called."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = exc.detail if isinstance(exc, HTTPException) else "internal error in the bridge"
    if status >= 500:
        log.exception("error serving %s %s", request.method, request.url.path, exc_info=exc)
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return Response(ApiFailure(status, message, kind).body(), status_code=status)
    return error_response(status, message)


def api_key_error_response(_: Request, exc: ApiKeyError) -> Response[ErrorBody]:
    return Response(ErrorBody(error=exc.message, code=401), status_code=401, headers={"WWW-Authenticate": "Bearer"})


def rate_limited_response(request: Request, exc: RateLimited) -> Response[Any]:
    headers = {"Retry-After": str(exc.retry_after)}
    if request.url.path.startswith("/v1/"):
        spec = ERRORS["rate_limited"]
        failure = ApiFailure(429, exc.message, spec.openai_type, None, spec.openai_code)
        return Response(failure.body(), status_code=429, headers=headers)
    return Response(ErrorBody(error=exc.message, code=429), status_code=429, headers=headers)


def cors_config(origins: Sequence[str]) -> CORSConfig | None:
    """CORS only for the configured origins (none: off, so browsers on other sites cannot read the answers). Those
    origins may send any request header (a preflight gets the headers it asked for back): SDKs add their own, as
    the OpenAI JS SDK's `x-stainless-*`, and the origin is what CORS trusts, not the header names. No credentials
    (cookies): the API key is a header. `Retry-After` is exposed, so an app can read when to retry a 429 or 503."""
    if not origins:
        return None
    return CORSConfig(
        allow_origins=list(origins),
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
        allow_credentials=False,
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )


def https_options(config: Config) -> dict[str, Any]:
    """uvicorn's TLS settings, checked first so that a bad certificate or key is a clear error at start."""
    if not config.http_tls_cert:
        return {}
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.http_tls_cert, config.http_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeError(f"cannot load the HTTPS certificate and key: {exc.__class__.__name__}: {exc}") from None
    return {"ssl_certfile": config.http_tls_cert, "ssl_keyfile": config.http_tls_key}


def create_app(
    client: BusClient | ClientFactory, config: Config, *, on_startup: Sequence[Callable[[Litestar], Any]] = ()
) -> Litestar:
    """The bridge app. `client` is a connected BusClient (the caller closes it) or a factory run at startup
    (whose client the app closes at shutdown). `on_startup` hooks run once the client is in place."""
    metrics = BridgeMetrics()
    keys = config.all_api_keys()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        owned = not isinstance(client, BusClient)
        bus = client if isinstance(client, BusClient) else await client()
        jobs = JobClient(bus.nc, bus.subjects, timeout=config.request_timeout) if config.durable else None
        app.state["metrics"] = metrics
        app.state["bus"] = CountingErrors(bus, metrics)
        app.state["jobs"] = CountingErrors(jobs, metrics) if jobs is not None else None
        app.state["config"] = config
        app.state["models"] = ModelCatalog(app.state["bus"])
        app.state["readiness"] = Readiness(app.state["bus"], show_models=not keys)
        try:
            yield
        finally:
            if jobs is not None:
                await jobs.close()
            if owned:
                await bus.close()

    key_guards = api_key_guard(keys)
    guards = key_guards + rate_limit_guard(config.rate_limit_per_minute, keyed=bool(keys))
    app = Litestar(
        route_handlers=[
            healthz,
            readyz,
            openapi_json,
            metrics_endpoint,
            Router(path="/", route_handlers=[chat, chat_batched], guards=guards, tags=["chat"]),
            openai_router(guards),
            *web_routes(key_guards),
        ],
        lifespan=[lifespan],
        on_startup=list(on_startup),
        logging_config=None,  # the embedding process (llmbus up, tests) owns logging
        exception_handlers={
            HTTPException: http_exception_response,
            ApiKeyError: api_key_error_response,
            RateLimited: rate_limited_response,
            Exception: http_exception_response,
        },
        cors_config=cors_config(config.cors_origins),
        openapi_config=OpenAPIConfig(
            title="llmbus HTTP bridge",
            version="0.1.0",
            description="LLM chat inference over NATS: native /chat API and an OpenAI-compatible /v1 API.",
            path="/docs",
            openapi_router=docs_router("/docs"),
            render_plugins=[OfflineDocsPlugin(path="/"), WireJsonRenderPlugin(REQUEST_BODIES, path="/openapi.json")],
        ),
    )
    app.asgi_handler = observe_http(app.asgi_handler, metrics)  # outermost: sees 404s and errors too
    return app
