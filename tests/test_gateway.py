"""The HTTP bridge over real sockets (uvicorn on loopback) and a real nats-server: status codes, error bodies,
health, OpenAPI, API keys, reconnects, and (with the real SmolLM2 worker) answers, SSE, batches and cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

import bus_gateway.serve as serve_module
from bus_gateway.client import BusClient
from bus_gateway.serve import run_gateway
from helpers.bridge import (
    API_KEY,
    Bridge,
    running_bridge,
    silent_responder,
    sse_json,
    start_bridge,
    watching_cancels,
)
from helpers.faults import wait_until
from helpers.workers import start_worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer, free_port

pytestmark = pytest.mark.timeout(120)

FRANCE = {"chat_id": "france", "user_prompt": "What is the capital of France?", "max_tokens": 16}


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status
    for fragment in fragments:
        assert fragment in body["error"], body
    return body


# --- health and documents -------------------------------------------------------------------------------------


async def test_healthz_is_up_and_readyz_needs_a_worker(lonely_http: httpx.AsyncClient) -> None:
    health = await lonely_http.get("/healthz")
    assert health.status_code == 200
    assert health.json()["nats"] == "connected"
    ready = await lonely_http.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["Retry-After"] == "1"
    assert ready.json()["workers"] == 0
    assert "$SRV.PING.llm-inference" in ready.json()["error"]


async def test_openapi_json_documents_both_apis(lonely_http: httpx.AsyncClient) -> None:
    response = await lonely_http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in ("/chat", "/chat/batched", "/healthz", "/readyz", "/v1/chat/completions", "/v1/models"):
        assert path in paths, path
    chat_body = paths["/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat_body == {"$ref": "#/components/schemas/ChatRequest"}
    schemas = document["components"]["schemas"]
    assert {"ChatRequest", "ChatResponse", "BatchRequest", "ErrorBody", "ChatCompletionRequest"} <= set(schemas)
    assert "chat_id" in schemas["ChatRequest"]["properties"]
    assert "503" in paths["/chat"]["post"]["responses"]


async def test_unknown_path_is_a_json_404(lonely_http: httpx.AsyncClient) -> None:
    assert_error(await lonely_http.get("/nope"), 404)


# --- no worker on the bus --------------------------------------------------------------------------------------


async def test_chat_without_worker_is_503_with_retry_after(lonely_http: httpx.AsyncClient) -> None:
    response = await lonely_http.post("/chat", json=FRANCE)
    assert_error(response, 503, "no inference worker is listening on llm.chat")
    assert response.headers["Retry-After"] == "1"


async def test_stream_without_worker_is_503_before_any_event(lonely_http: httpx.AsyncClient) -> None:
    response = await lonely_http.post("/chat", json=FRANCE | {"stream": True})
    assert_error(response, 503, "no inference worker")
    assert response.headers["content-type"].startswith("application/json")


async def test_batch_without_worker_is_503(lonely_http: httpx.AsyncClient) -> None:
    response = await lonely_http.post("/chat/batched", json={"queries": [FRANCE]})
    assert_error(response, 503, "llm.chat.batched")
    assert response.headers["Retry-After"] == "1"


async def test_hung_worker_is_a_504(lonely_nats: NatsServer) -> None:
    config = Config(nats_url=lonely_nats.url, subject_prefix="hung", request_timeout=0.3)
    async with (
        silent_responder(lonely_nats.url, "hung.chat"),
        running_bridge(config) as bridge,
        bridge.client() as http,
    ):
        response = await http.post("/chat", json=FRANCE)
    assert_error(response, 504, "no reply from a worker within 0.3s")


async def test_a_streamed_batch_is_cancelled_when_its_client_leaves_before_the_first_result(
    lonely_nats: NatsServer,
) -> None:
    """The first result of a streamed batch can take a whole generation; a client that leaves before it cancels
    the batch on the bus at once. Here the "worker" takes the batch and never answers."""
    config = Config(nats_url=lonely_nats.url, subject_prefix="leaving", request_timeout=120)
    taken = asyncio.Event()
    worker = await nats.connect(lonely_nats.url)
    try:

        async def take(_: object) -> None:
            taken.set()

        await worker.subscribe("leaving.chat.batched", cb=take)  # type: ignore[arg-type]
        async with running_bridge(config) as bridge, watching_cancels(worker, "leaving") as cancels:
            async with bridge.client() as http:
                body = {"stream": True, "queries": [FRANCE, FRANCE | {"chat_id": "second"}]}
                leaving = asyncio.create_task(http.post("/chat/batched", json=body))
                await taken.wait()
                leaving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await leaving
            assert await cancels.next_id(timeout=30)
    finally:
        await worker.close()


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "empty request body"),
        (b"[1, 2]", "Expected `object`"),
        (b'{"chat_id": "a"}', "`user_prompt` (or `messages`) is required"),
        (b'{"chat_id": "a", "user_prompt": "hi", "max_token": 5}', "max_token"),
        (b'{"chat_id": "a", "user_prompt": 5}', "$.user_prompt"),
        (b'{"chat_id": "", "user_prompt": "hi"}', "$.chat_id"),
        (b'{"chat_id": "a", "user_prompt": "hi", "temperature": 9}', "$.temperature"),
    ],
)
async def test_invalid_chat_is_400_naming_the_problem(
    lonely_http: httpx.AsyncClient, body: bytes, fragment: str
) -> None:
    assert_error(await lonely_http.post("/chat", content=body), 400, fragment)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"queries": []}', "`queries` is empty"),
        (b"{}", "queries"),
        (b'{"queries": 3}', "$.queries"),
        (b"nope", "malformed JSON"),
    ],
)
async def test_invalid_batch_is_400(lonely_http: httpx.AsyncClient, body: bytes, fragment: str) -> None:
    assert_error(await lonely_http.post("/chat/batched", content=body), 400, fragment)


async def test_batch_with_every_query_invalid_is_400_with_each_error(lonely_http: httpx.AsyncClient) -> None:
    batch = {"queries": [{"chat_id": "a"}, {"chat_id": "b", "user_prompt": 1}]}
    response = await lonely_http.post("/chat/batched", json=batch)
    body = assert_error(response, 400, "all 2 queries failed; see `responses`")
    assert [r["chat_id"] for r in body["responses"]] == ["a", "b"]
    assert all(r["code"] == 400 and r["error"] for r in body["responses"])
    assert "$.queries[1].user_prompt" in body["responses"][1]["error"]


async def test_request_over_the_nats_max_payload_is_413(lonely_http: httpx.AsyncClient) -> None:
    huge = {"chat_id": "huge", "user_prompt": "x" * 1_100_000}
    assert_error(await lonely_http.post("/chat", json=huge), 413, "exceeds the NATS max payload")


# --- API keys ----------------------------------------------------------------------------------------------------


async def test_api_key_required_on_chat_routes(keyed_bridge: Bridge) -> None:
    async with keyed_bridge.client() as http:
        missing = await http.post("/chat", json=FRANCE)
        assert_error(missing, 401, "missing API key")
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = await http.post("/chat/batched", json={"queries": [FRANCE]}, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "invalid API key")
        for key in (API_KEY, "sk-second"):
            allowed = await http.post("/chat", json=FRANCE, headers={"Authorization": f"Bearer {key}"})
            assert_error(allowed, 503, "no inference worker")  # past the key check; no worker on this server
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/openapi.json")).status_code == 200


# --- lifecycle -------------------------------------------------------------------------------------------------


async def test_busy_port_is_a_clear_error(lonely_nats: NatsServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = Config(nats_url=lonely_nats.url, http_port=port)
        with pytest.raises(OSError, match=f"HTTP port {port} on 127.0.0.1 is not available"):
            await run_gateway(config, asyncio.Event())


async def test_health_follows_the_nats_connection() -> None:
    """A nats-server restart: /healthz goes 503 while it is down, and 200 again once the bridge reconnects."""
    port = free_port()
    server = NatsServer(port=port, jetstream=False).start()
    try:
        async with running_bridge(Config(nats_url=server.url)) as bridge, bridge.client() as http:
            assert (await http.get("/healthz")).status_code == 200
            server.stop()
            down = await _wait_for_status(http, "/healthz", 503)
            assert down.json()["nats"] in ("reconnecting", "disconnected")
            assert down.headers["Retry-After"] == "1"
            refused = await http.post("/chat", json=FRANCE)
            assert_error(refused, 503, "not connected to NATS")
            server = NatsServer(port=port, jetstream=False).start()
            await _wait_for_status(http, "/healthz", 200)
            assert_error(await http.post("/chat", json=FRANCE), 503, "no inference worker")
    finally:
        server.stop()


async def _wait_for_status(http: httpx.AsyncClient, path: str, status: int, timeout: float = 15.0) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        response = await http.get(path)
        if response.status_code == status or loop.time() > deadline:
            assert response.status_code == status, f"{path} still {response.status_code} after {timeout}s"
            return response
        await asyncio.sleep(0.05)


# --- with the real worker ---------------------------------------------------------------------------------------


@pytest.mark.model
async def test_readyz_counts_the_worker(worker: object, http: httpx.AsyncClient) -> None:
    response = await http.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["workers"] == 1
    assert body["models"]


@pytest.mark.model
async def test_chat_answers_paris(worker: object, http: httpx.AsyncClient) -> None:
    response = await http.post("/chat", json=FRANCE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["chat_id"] == "france"
    assert "Paris" in body["response"]
    assert body["usage"]["completion_tokens"] > 0
    assert body["finish_reason"] in ("stop", "length")


@pytest.mark.model
async def test_chat_stream_is_sse_ending_with_done(worker: object, http: httpx.AsyncClient) -> None:
    request = FRANCE | {"chat_id": "sse", "stream": True}
    async with http.stream("POST", "/chat", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines()]
    chunks = sse_json(lines)
    assert len(chunks) >= 2
    assert chunks[-1]["done"] is True and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(chunk["chat_id"] == "sse" for chunk in chunks)
    assert "Paris" in "".join(chunk["delta"] for chunk in chunks)


@pytest.mark.model
async def test_batch_partial_success(worker: object, http: httpx.AsyncClient) -> None:
    batch = {
        "queries": [
            {"chat_id": "ok", "user_prompt": "Say hello.", "max_tokens": 4},
            {"chat_id": "bad", "user_prompt": ""},
            {"chat_id": "capped", "user_prompt": "hi", "max_tokens": 100000},
        ]
    }
    response = await http.post("/chat/batched", json=batch)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["chat_id"] for r in body["responses"]] == ["ok", "bad", "capped"]
    assert body["responses"][0]["response"]
    assert body["responses"][1]["code"] == 400 and "$.queries[1].user_prompt" in body["responses"][1]["error"]
    assert body["responses"][2]["code"] == 400 and "max_tokens_cap" in body["responses"][2]["error"]
    assert body["partial_success"] is True and body["message"]


@pytest.mark.model
async def test_worker_errors_pass_through(worker: object, http: httpx.AsyncClient) -> None:
    capped = await http.post("/chat", json={"chat_id": "c", "user_prompt": "hi", "max_tokens": 100000})
    assert_error(capped, 400, "max_tokens_cap")
    too_long = await http.post("/chat", json={"chat_id": "long", "user_prompt": "word " * 2500, "max_tokens": 4})
    assert_error(too_long, 400, "context window")


@pytest.mark.model
async def test_client_disconnect_cancels_the_generation(worker: object, bridge: Bridge, nc: NATS) -> None:
    request = {"chat_id": "gone", "user_prompt": "Write a long story.", "max_tokens": 200, "stream": True}
    async with watching_cancels(nc) as cancels:
        async with bridge.client() as http, http.stream("POST", "/chat", json=request) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    assert not json.loads(line[5:]).get("done", False)
                    break
        # the connection is closed here, long before 200 tokens
        assert await cancels.next_id(timeout=10)


@pytest.mark.model
async def test_overloaded_worker_is_503_with_retry_after(nats_server: NatsServer, smollm: object) -> None:
    config = Config(nats_url=nats_server.url, subject_prefix="tight", max_pending=1, request_timeout=30)
    tight = await start_worker(config, smollm)  # type: ignore[arg-type]
    try:
        async with running_bridge(config) as bridge, bridge.client() as http:
            hold = {"chat_id": "hold", "user_prompt": "Write a long story.", "max_tokens": 200, "stream": True}
            async with http.stream("POST", "/chat", json=hold) as held:
                assert held.status_code == 200
                async for line in held.aiter_lines():
                    if line.startswith("data:"):
                        break  # the worker now holds its one allowed request
                response = await http.post("/chat", json=FRANCE)
            assert_error(response, 503, "overloaded")
            assert response.headers["Retry-After"] == "1"
    finally:
        await tight.shutdown()


@pytest.mark.model
async def test_stopping_the_bridge_ends_open_streams_cleanly(
    worker: object, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve_module, "STREAM_GRACE", 0.2)
    bridge = await start_bridge(Config(nats_url=nats_server.url))
    request = {"chat_id": "cut", "user_prompt": "Write a very long story.", "max_tokens": 250, "stream": True}
    events: list[dict] = []
    try:
        async with bridge.client() as http, http.stream("POST", "/chat", json=request) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    bridge.stop.set()  # after the first event: the stream is open and generating
    finally:
        await bridge.shutdown()
    assert events[-1]["done"] is True
    assert events[-1]["finish_reason"] == "cancelled"
    assert events[-1]["usage"]["completion_tokens"] < 250


@pytest.mark.model
async def test_durable_bridge_sends_chats_through_jetstream(smollm: object) -> None:
    with NatsServer() as server:  # its own JetStream: the LLM_JOBS stream name is fixed
        config = Config(nats_url=server.url, durable=True, request_timeout=60)
        durable_worker = await start_worker(config, smollm)  # type: ignore[arg-type]
        try:
            async with running_bridge(config) as bridge, bridge.client() as http:
                answer = await http.post("/chat", json=FRANCE)
                assert answer.status_code == 200, answer.text
                assert "Paris" in answer.json()["response"]
                batch = {"queries": [FRANCE | {"chat_id": "b1", "max_tokens": 4}, {"chat_id": "b2"}]}
                partial = await http.post("/chat/batched", json=batch)
                assert partial.status_code == 200, partial.text
                assert partial.json()["partial_success"] is True
                typo = await http.post("/chat", json=FRANCE | {"model": "no-such-model"})  # never stored, never waits
                assert typo.status_code == 404 and "`no-such-model`" in typo.json()["error"], typo.text
                async with http.stream("POST", "/chat", json=FRANCE | {"stream": True}) as streamed:
                    assert streamed.status_code == 200  # streams stay on core request-reply
                    assert sse_json([line async for line in streamed.aiter_lines()])[-1]["done"] is True
            nc = await nats.connect(server.url)
            try:
                jobs = await nc.jetstream().stream_info("LLM_JOBS")
            finally:
                await nc.close()
            assert jobs.state.last_seq == 2, "the chat and the batch each went through the work queue once"
        finally:
            await durable_worker.shutdown()


@pytest.mark.model
async def test_a_non_streaming_client_that_disconnects_cancels_its_generation(
    worker: object, bridge: Bridge, nc: NATS
) -> None:
    """Without this, an abandoned call (or each retry of an SDK that timed out) generated to `max_tokens`."""
    cancelled_before = await worker_figure(nc, "requests_cancelled")
    request = {"chat_id": "gone", "user_prompt": "Write a very long story.", "max_tokens": 250}
    async with watching_cancels(nc) as cancels, bridge.client() as http:
        call = asyncio.ensure_future(http.post("/chat", json=request))

        async def held() -> bool:
            return await worker_figure(nc, "pending") > 0

        await wait_until(held, 120, "the worker to hold the request")
        call.cancel()  # the HTTP client goes away: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await call
        assert await cancels.next_id(timeout=60)

    async def cancelled() -> bool:
        return await worker_figure(nc, "requests_cancelled") > cancelled_before

    await wait_until(cancelled, 120, "the worker to cancel the generation")


async def worker_figure(nc: NATS, name: str) -> int:
    """One figure from the STATS data of the session worker (the one on `llm.chat`)."""
    stats = [s for s in await BusClient(nc).stats(2.0) if s["endpoints"][0]["subject"] == "llm.chat"]
    return stats[0]["endpoints"][0]["data"][name]
