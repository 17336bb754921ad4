"""The OpenAI-compatible API: raw HTTP for the error cases, and the official `openai` client against the running
bridge with the real SmolLM2 worker (streaming and not)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from nats.aio.client import Client as NATS

from bus_gateway.bus_errors import BusError
from bus_gateway.client import BusClient
from bus_gateway.openai_answers import ChunkRenderer, is_cut_off, openai_finish_reason, to_completion
from bus_gateway.openai_api import ModelCatalog
from bus_gateway.openai_translate import ApiFailure, from_bus_error, to_chat_request
from bus_gateway.openai_types import ChatCompletionRequest, OpenAIMessage
from helpers.bridge import API_KEY, Bridge, running_bridge, sse_data, sse_json, watching_cancels
from helpers.workers import start_worker
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import SERVICE_NAME, ChatChunk, ChatRequest, ChatResponse, Usage

pytestmark = pytest.mark.timeout(120)

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def assert_openai_error(response: httpx.Response, status: int, *fragments: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "any-model", "messages": HELLO} | fields


# --- no worker needed ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"n": 2}, "n", "`n` > 1 is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"functions": [{"name": "f"}]}, "functions", "function calling"),
        ({"logprobs": True}, "logprobs", "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format", "response_format"),
        ({"frobnicate": 1}, "frobnicate", "unrecognized request argument supplied: frobnicate"),
        ({"temperature": "hot"}, "temperature", "Expected `float | null`"),
    ],
)
async def test_unsupported_parameters_are_400(
    lonely_http: httpx.AsyncClient, fields: dict[str, Any], param: str, fragment: str
) -> None:
    error = assert_openai_error(
        await lonely_http.post("/v1/chat/completions", json=completion(**fields)), 400, fragment, param=param
    )
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 1, "presence_penalty": 0, "logprobs": False, "response_format": {"type": "text"}, "store": False},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "none"},
        {"functions": [{"name": "f"}], "function_call": "none", "parallel_tool_calls": False},
        {"prompt_cache_retention": "24h", "prompt_cache_options": {}, "verbosity": "medium", "moderation": None},
        {"seed": -1, "messages": [{"role": "developer", "content": "Write a haiku about NATS"}]},
    ],
)
async def test_neutral_values_of_unsupported_parameters_are_accepted(
    lonely_http: httpx.AsyncClient, fields: dict[str, Any]
) -> None:
    """What the SDK and frameworks send that changes nothing here: a tool list the model may not call
    (tool_choice "none"), cache hints, a negative seed, a conversation of a system or developer message alone."""
    response = await lonely_http.post("/v1/chat/completions", json=completion(**fields))
    assert_openai_error(response, 503, "no inference worker")  # past validation; no worker on this server


def test_a_system_only_conversation_a_negative_seed_and_the_param_the_client_named() -> None:
    system_only = ChatCompletionRequest(model="m", messages=[OpenAIMessage(role="system", content="Say hi")], seed=-1)
    bus = to_chat_request(system_only, "c1")
    assert isinstance(bus, ChatRequest)
    assert [(m.role, m.content) for m in bus.messages] == [("user", "Say hi")] and bus.seed == 2**63 - 1
    zero = ChatCompletionRequest(model="m", messages=[OpenAIMessage(role="user", content="x")], max_completion_tokens=0)
    failure = to_chat_request(zero, "c2")
    assert isinstance(failure, ApiFailure) and failure.param == "max_completion_tokens"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{oops", "malformed JSON"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}', "malformed JSON"),  # bad UTF-8
        (b"[" * 5000, "nested too deeply"),
        (b"", "empty request body"),
        (b'{"messages": []}', "model"),
        (b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}', "tool messages are not supported"),
        (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "only text content"),
    ],
)
async def test_malformed_requests_are_400(lonely_http: httpx.AsyncClient, body: bytes, fragment: str) -> None:
    assert_openai_error(await lonely_http.post("/v1/chat/completions", content=body), 400, fragment)


async def test_no_worker_is_503_with_retry_after(lonely_http: httpx.AsyncClient) -> None:
    response = await lonely_http.post("/v1/chat/completions", json=completion())
    error = assert_openai_error(response, 503, "no inference worker")
    assert error["type"] == "server_error"
    assert response.headers["Retry-After"] == "1"


async def test_models_without_workers_is_an_empty_list(lonely_http: httpx.AsyncClient) -> None:
    response = await lonely_http.get("/v1/models")
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": []}


async def test_api_key_required_on_v1_routes(keyed_bridge: Bridge) -> None:
    async with keyed_bridge.client() as http:
        missing = await http.post("/v1/chat/completions", json=completion())
        error = assert_openai_error(missing, 401, "missing API key")
        assert error["code"] == "invalid_api_key"
        assert_openai_error(await http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid")
        allowed = await http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert allowed.status_code == 200


async def test_openai_sdk_sees_401_and_503(keyed_bridge: Bridge, lonely_bridge: Bridge) -> None:
    wrong = openai.AsyncOpenAI(base_url=f"{keyed_bridge.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    nobody = openai.AsyncOpenAI(base_url=f"{lonely_bridge.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        await nobody.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.status_code == 503


# --- with the real worker ----------------------------------------------------------------------------------------


@pytest.fixture
def sdk(bridge: Bridge) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{bridge.url}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture
async def model_name(worker: object, sdk: openai.AsyncOpenAI) -> str:
    models = await sdk.models.list()
    assert len(models.data) == 1
    return models.data[0].id


@pytest.mark.model
async def test_sdk_lists_and_retrieves_the_model(sdk: openai.AsyncOpenAI, model_name: str) -> None:
    card = await sdk.models.retrieve(model_name)
    assert card.id == model_name and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("no-such-model")


@pytest.mark.model
async def test_sdk_completion_answers_paris(sdk: openai.AsyncOpenAI, model_name: str) -> None:
    reply = await sdk.chat.completions.create(
        model=model_name,
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        user="tester",
    )
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == model_name
    assert reply.choices[0].message.role == "assistant"
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0


@pytest.mark.model
async def test_sdk_max_completion_tokens_and_multi_turn(sdk: openai.AsyncOpenAI, model_name: str) -> None:
    reply = await sdk.chat.completions.create(
        model=model_name,
        messages=[  # type: ignore[list-item]
            {"role": "developer", "content": "You are a helpful assistant."},
            *HELLO,
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": [{"type": "text", "text": "Write a long poem about it."}]},
        ],
        max_completion_tokens=3,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


@pytest.mark.model
async def test_sdk_seed_makes_sampling_repeatable(sdk: openai.AsyncOpenAI, model_name: str) -> None:
    async def sample() -> str | None:
        reply = await sdk.chat.completions.create(
            model=model_name,
            messages=HELLO,
            max_tokens=10,
            seed=7,
            temperature=1.0,
            top_p=0.9,  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content

    assert await sample() == await sample()


@pytest.mark.model
async def test_sdk_streaming_with_usage(sdk: openai.AsyncOpenAI, model_name: str) -> None:
    stream = await sdk.chat.completions.create(
        model=model_name,
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.model
async def test_raw_stream_ends_with_done_and_no_usage_unless_asked(http: httpx.AsyncClient, model_name: str) -> None:
    request = {"model": model_name, "messages": HELLO, "max_tokens": 4, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines()]
    assert sse_data(lines)[-1] == "[DONE]"
    assert all(chunk["usage"] is None for chunk in sse_json(lines))


@pytest.mark.model
async def test_unknown_model_is_404(sdk: openai.AsyncOpenAI, model_name: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(model=model_name + "-nope", messages=HELLO)  # type: ignore[arg-type]
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"
    assert model_name in body["message"], "the error lists the served models"


@pytest.mark.model
async def test_stream_disconnect_cancels_the_generation(bridge: Bridge, model_name: str, nc: NATS) -> None:
    request = {"model": model_name, "messages": [{"role": "user", "content": "Tell a long story."}]}
    request |= {"max_tokens": 200, "stream": True}
    async with watching_cancels(nc) as cancels:
        async with bridge.client() as http, http.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # one real token arrived; now hang up
        assert await cancels.next_id(timeout=10)


# --- OpenAI behaviour that clients rely on ------------------------------------------------------------------------


def test_finish_reason_takes_only_openai_values_and_an_answer_cut_off_has_none() -> None:
    """A `cancelled` answer was cut off: it gets no finish reason (the API layer ends it with an error instead,
    tests/test_bridge_hardening.py), so it never passes for a complete one."""
    renderer = ChunkRenderer("chatcmpl-x", 0, "m", include_usage=True)
    cancelled = ChatChunk(chat_id="x", delta="ab", index=3, done=True, finish_reason="cancelled", usage=Usage(1, 2, 3))
    [role, text] = renderer.render(cancelled)  # the role chunk and the text: no finish chunk, no usage chunk
    assert role.choices[0].delta.role == "assistant" and text.choices[0].delta.content == "ab"
    assert [chunk.choices[0].finish_reason for chunk in (role, text)] == [None, None]
    assert is_cut_off("cancelled") and not any(is_cut_off(r) for r in ("stop", "length", None))
    reply = ChatResponse(chat_id="x", response="", finish_reason="length", usage=Usage(1, 0, 1), model="m")
    assert to_completion(reply, "chatcmpl-x", 0).choices[0].finish_reason == "length"
    assert {openai_finish_reason(r) for r in ("stop", "length", None)} == {"stop", "length"}


def test_shutting_down_stays_a_503_and_overload_is_a_429() -> None:
    shutting = from_bus_error(BusError(503, "worker is shutting down", name="shutting_down"))
    overloaded = from_bus_error(BusError(503, "worker overloaded", name="overloaded"))
    too_long = from_bus_error(BusError(400, "context window", name="context_length_exceeded"))
    assert (shutting.status, shutting.type) == (503, "server_error")
    assert (overloaded.status, overloaded.type) == (429, "rate_limit_error")
    assert (too_long.status, too_long.code) == (400, "context_length_exceeded")


@pytest.mark.model
async def test_a_prompt_that_does_not_fit_is_a_400_context_length_exceeded(
    sdk: openai.AsyncOpenAI, model_name: str
) -> None:
    long_prompt = [{"role": "user", "content": "word " * 2500}]
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model=model_name, messages=long_prompt, max_tokens=4)  # type: ignore[arg-type]
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "context_length_exceeded"
    fits_alone = [{"role": "user", "content": "word " * 1850}]  # about 1,880 of the 2,048 tokens
    with pytest.raises(openai.BadRequestError) as no_room:  # the prompt fits, but not with max_tokens on top
        await sdk.chat.completions.create(model=model_name, messages=fits_alone, max_tokens=256)  # type: ignore[arg-type]
    assert isinstance(no_room.value.body, dict) and no_room.value.body["code"] == "context_length_exceeded"


@pytest.mark.model
async def test_sse_headers_and_the_role_chunk_come_before_any_token(
    nats_server: NatsServer, smollm: object, nc: NATS
) -> None:
    """The engine holds its first prefill until a second request arrives (max_wait_ms): the stream is accepted and
    its HTTP response has started while not a single token exists, so a proxy's header timeout cannot drop it."""
    config = Config(nats_url=nats_server.url, subject_prefix="held", max_batch_size=2, max_wait_ms=600_000)
    held = await start_worker(config, smollm)  # type: ignore[arg-type]
    try:
        async with running_bridge(config) as bridge, bridge.client() as http:
            body = {"model": "SmolLM2-135M-Instruct", "messages": HELLO, "max_tokens": 4, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = (line[5:].strip() async for line in response.aiter_lines() if line.startswith("data:"))
                first = json.loads(await anext(events))
                assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                stats = [s for s in await BusClient(nc).stats(2.0) if s["endpoints"][0]["subject"] == "held.chat"]
                assert stats[0]["endpoints"][0]["data"]["tokens_generated"] == 0
                ask = {"chat_id": "2", "user_prompt": "Hi", "max_tokens": 4}
                second = asyncio.ensure_future(http.post("/chat", json=ask))
                rest = [event async for event in events]  # the engine starts once it has two requests
                assert rest[-1] == "[DONE]"
                assert (await second).status_code == 200
    finally:
        await held.shutdown()


async def test_a_catalog_gathering_in_flight_delays_no_completion_and_is_shared(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """A fresh look and unknown model names gather `$SRV.INFO` afresh (a thorough look: the whole discovery window).
    A served model resolves from the catalog while such a gathering runs, and callers that need one share the one in
    flight.
    Here a scripted `$SRV.INFO` responder holds its second reply until the test has checked both."""
    asked: list[int] = []
    first_asked, release = asyncio.Event(), asyncio.Event()

    async def answer(msg: Any) -> None:
        asked.append(1)
        if len(asked) > 1:
            first_asked.set()
            await release.wait()
        info = {"id": "w1", "metadata": {"model": "served-model", "subject_prefix": "llm"}}
        await fresh_nc.publish(msg.reply, json.dumps(info).encode())

    await fresh_nc.subscribe(f"$SRV.INFO.{SERVICE_NAME}", cb=answer)
    await flushed(fresh_nc)
    bus = await BusClient.from_config(Config(nats_url=fresh_nats_server.url))
    try:
        catalog = ModelCatalog(bus)
        assert await catalog.names() == ["served-model"] and len(asked) == 1
        listing = asyncio.create_task(catalog.names(fresh=True))  # as GET /v1/models does
        await first_asked.wait()
        assert await catalog.resolve("served-model") == "served-model"
        assert not listing.done()  # resolved while the gathering was still waiting for its reply
        unknown = asyncio.create_task(catalog.resolve("no-such-model"))
        await asyncio.sleep(0)
        release.set()
        assert await listing == ["served-model"]
        failure = await unknown
        assert not isinstance(failure, str) and failure.status == 404
        assert len(asked) == 2  # the unknown name shared the listing's gathering
    finally:
        await bus.close()
