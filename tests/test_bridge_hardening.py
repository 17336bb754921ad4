"""The HTTP bridge, hardened, on a real nats-server with real workers of the tiny model: a model whose worker
answers `$SRV.INFO` late is served (never a 404 from a quick look); an answer cut off is never passed off as
complete on the OpenAI API; the OpenAI JS SDK's CORS preflight passes; a client that leaves before a stream's first
chunk cancels it at once; `stream_options` needs `stream`; `/readyz` with keys hides the models and shares pings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import nats
import openai
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import bus_gateway.readiness as readiness_module
import bus_gateway.serve as serve_module
from bus_gateway.client import BusClient
from bus_gateway.discovery import DISCOVERY_SETTLE, DISCOVERY_WINDOW
from bus_gateway.model_catalog import ModelCatalog
from helpers.bridge import API_KEY, running_bridge, sse_data, sse_json, start_bridge, watching_cancels
from helpers.fake_srv import FakeWorker, FakeWorkers
from helpers.late_info import Asked, LateInfo
from helpers.workers import tiny_worker
from inference_worker.held import Held
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import SERVICE_NAME, Subjects
from schemas.subjects import REPLY_TO, REQUEST_ID

pytestmark = pytest.mark.timeout(180)

HELLO = [{"role": "user", "content": "Hi"}]
LATE = DISCOVERY_SETTLE + (DISCOVERY_WINDOW - DISCOVERY_SETTLE) / 3  # after a quick look stops, within the window
APP_ORIGIN = "https://app.example.test"


@pytest.fixture(scope="module")
def server() -> Iterator[NatsServer]:
    """A nats-server (JetStream on, for the durable bridge) of this module's own."""
    with NatsServer() as running:
        yield running


@pytest.fixture(scope="module")
async def late_bus(server: NatsServer) -> AsyncIterator[NatsServer]:
    """`alpha`'s worker answers `$SRV.INFO` at once, `beta`'s `LATE` s later (both durable: they take jobs too)."""
    async with (
        tiny_worker(server.url, served_model_name="alpha", durable=True),
        tiny_worker(server.url, served_model_name="beta", durable=True) as beta,
    ):
        await LateInfo(beta, LATE).start()
        yield server


@pytest.fixture
async def nc(server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(server.url)
    yield conn
    await conn.close()


def completion(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, "max_tokens": 2} | fields


# --- a model whose worker answers $SRV.INFO late -----------------------------------------------------------------


@pytest.mark.parametrize("durable", [False, True])
async def test_a_model_whose_worker_answers_info_late_is_served(late_bus: NatsServer, durable: bool) -> None:
    """A new bridge's first look at the bus would miss `beta` if it stopped soon after `alpha`'s reply; it is never
    refused on such a look (durable: the check that some worker reads the model's job queue, too)."""
    config = Config(nats_url=late_bus.url, request_timeout=60, durable=durable)
    async with running_bridge(config) as bridge, bridge.client() as http:
        reply = await http.post("/v1/chat/completions", json=completion("beta"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "beta"
        native = await http.post("/chat", json={"chat_id": "n", "user_prompt": "Hi", "max_tokens": 2, "model": "beta"})
        assert native.status_code == 200, native.text
        assert native.json()["model"] == "beta"


async def test_a_model_whose_worker_answers_info_late_is_listed_and_found(late_bus: NatsServer) -> None:
    async with running_bridge(Config(nats_url=late_bus.url)) as bridge, bridge.client() as http:
        card = await http.get("/v1/models/beta")
        assert card.status_code == 200, card.text
        assert (card.json()["id"], card.json()["workers"]) == ("beta", 1)
    async with running_bridge(Config(nats_url=late_bus.url)) as bridge, bridge.client() as http:
        listed = await http.get("/v1/models")  # a new bridge: its first look
        assert listed.status_code == 200, listed.text
        assert [card["id"] for card in listed.json()["data"]] == ["alpha", "beta"]


async def test_requests_waiting_at_once_share_one_thorough_look(late_bus: NatsServer, nc: NATS) -> None:
    """Requests that wait at once for the catalog share one look at the bus, whatever they name: the late model is
    found and the unknown ones are refused, on a single `$SRV.INFO`; so are those waiting together later."""
    asked = await Asked(nc, f"$SRV.INFO.{SERVICE_NAME}").start()
    async with await BusClient.connect(late_bus.url) as bus:
        catalog = ModelCatalog(bus)
        names = ["beta", "nope-1", "beta", "nope-2", "alpha"]
        first = await asyncio.gather(*(catalog.resolve(name) for name in names))
        assert first[0] == first[2] == "beta" and first[4] == "alpha"
        assert [getattr(failure, "status", None) for failure in (first[1], first[3])] == [404, 404]
        assert await asked.settled() == 1
        again = await asyncio.gather(*(catalog.resolve(f"unknown-{i}") for i in range(4)))
        assert {getattr(failure, "code", None) for failure in again} == {"model_not_found"}
        assert await asked.settled() == 2  # one more look for the four of them
        assert await catalog.resolve("beta") == "beta" and await asked.settled() == 2  # in the view: no look


# --- an answer cut off ---------------------------------------------------------------------------------------------


def holds(worker: Worker) -> asyncio.Queue[Held]:
    """Each request the worker holds (after it handed it to its engine), as it holds it."""
    held: asyncio.Queue[Held] = asyncio.Queue()
    hold = worker.held.hold

    def holding(request: Held) -> None:
        hold(request)
        held.put_nowait(request)

    worker.held.hold = holding  # type: ignore[method-assign]
    return held


async def next_data(lines: AsyncIterator[str]) -> str:
    async for line in lines:
        if line.startswith("data:"):
            return line.removeprefix("data:").strip()
    raise AssertionError("the stream ended without a data line")


async def test_streams_cut_off_as_the_bridge_stops_end_with_an_error_on_the_openai_api(
    server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three streams held by the engine (it waits for a fourth to start): as the bridge stops, it cancels them. The
    OpenAI ones end with a `shutting_down` error and no `[DONE]` (the SDK raises); the native one ends `cancelled`."""
    monkeypatch.setattr(serve_module, "STREAM_GRACE", 0.0)
    options = {"subject_prefix": "stopping", "max_batch_size": 4, "max_wait_ms": 600_000}
    async with tiny_worker(server.url, served_model_name="held", **options) as worker:
        held = holds(worker)
        bridge = await start_bridge(Config(nats_url=server.url, subject_prefix="stopping", request_timeout=60))
        try:
            sdk = openai.AsyncOpenAI(base_url=f"{bridge.url}/v1", api_key="x", max_retries=0)
            async with bridge.client() as http, contextlib.AsyncExitStack() as open_streams:
                raw = await open_streams.enter_async_context(
                    http.stream("POST", "/v1/chat/completions", json=completion("held", stream=True))
                )
                native = await open_streams.enter_async_context(
                    http.stream("POST", "/chat", json={"chat_id": "n", "user_prompt": "Hi", "stream": True})
                )
                sdk_stream = await sdk.chat.completions.create(
                    model="held",
                    messages=HELLO,  # type: ignore[arg-type]
                    stream=True,
                )
                raw_lines, native_lines = raw.aiter_lines(), native.aiter_lines()
                assert '"role":"assistant"' in await next_data(raw_lines)
                await next_data(native_lines)  # the accepted chunk
                assert (await anext(sdk_stream)).choices[0].delta.role == "assistant"
                for _ in range(3):
                    await held.get()
                bridge.stop.set()
                raw_rest = [line async for line in raw_lines]
                native_rest = [line async for line in native_lines]
                with pytest.raises(openai.APIError) as raised:
                    async for _ in sdk_stream:
                        pass
        finally:
            await bridge.shutdown()
    assert "[DONE]" not in sse_data(raw_rest)
    error = sse_json(raw_rest)[-1]["error"]
    assert (error["type"], error["code"]) == ("server_error", "shutting_down")
    assert "the bridge stopped before the answer finished" in error["message"]
    assert not [chunk for chunk in sse_json(raw_rest) if chunk.get("choices") and chunk["choices"][0]["finish_reason"]]
    assert raised.value.body["code"] == "shutting_down"  # type: ignore[index]
    assert sse_json(native_rest)[-1]["finish_reason"] == "cancelled"


async def test_a_completion_cancelled_on_the_bus_by_someone_else_is_a_503(server: NatsServer, nc: NATS) -> None:
    """The engine holds the request (it waits for a second one); a cancel that is not the client's ends it. The
    OpenAI answer is a 503 `shutting_down` the SDK raises (and retries), never a complete-looking `stop`."""
    subjects = Subjects("cutoff")
    async with tiny_worker(
        server.url, served_model_name="held", subject_prefix="cutoff", max_batch_size=2, max_wait_ms=600_000
    ) as worker:
        held = holds(worker)
        async with running_bridge(Config(nats_url=server.url, subject_prefix="cutoff")) as bridge:
            sdk = openai.AsyncOpenAI(base_url=f"{bridge.url}/v1", api_key="x", max_retries=0)
            asking = asyncio.create_task(sdk.chat.completions.create(model="held", messages=HELLO))  # type: ignore[arg-type]
            reply_subject, request_id = (await held.get()).key
            await nc.publish(subjects.cancel(request_id), b"", headers={REPLY_TO: reply_subject})
            with pytest.raises(openai.InternalServerError) as raised:
                await asking
    assert raised.value.status_code == 503
    assert raised.value.response.headers["Retry-After"] == "1"
    body = raised.value.body
    assert isinstance(body, dict) and (body["type"], body["code"]) == ("server_error", "shutting_down")
    assert "cancelled on the bus (not by this client)" in body["message"]


# --- CORS for browser apps using an SDK ----------------------------------------------------------------------------

SDK_HEADERS = (
    "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-retry-count,"
    "x-stainless-helper-method,x-stainless-package-version,x-stainless-runtime,x-stainless-timeout"
)


async def test_the_openai_js_sdk_preflight_passes_for_allowed_origins_only(lonely_nats: NatsServer) -> None:
    config = Config(nats_url=lonely_nats.url, cors_origins=[APP_ORIGIN], request_timeout=5)
    asking = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": SDK_HEADERS}
    async with running_bridge(config) as bridge, bridge.client(trust_env=False) as http:
        allowed = await http.options("/v1/chat/completions", headers={"Origin": APP_ORIGIN} | asking)
        other = await http.options("/v1/chat/completions", headers={"Origin": "https://evil.example.test"} | asking)
        refused = await http.post("/v1/chat/completions", json=completion("m"), headers={"Origin": APP_ORIGIN})
    assert allowed.status_code == 204, allowed.text
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    granted = {header.strip().lower() for header in allowed.headers["access-control-allow-headers"].split(",")}
    assert set(SDK_HEADERS.split(",")) <= granted
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert refused.status_code == 503 and refused.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "retry-after" in refused.headers["access-control-expose-headers"].lower()


# --- a client that leaves before the first chunk ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
async def test_a_client_that_leaves_before_the_first_chunk_cancels_the_stream_at_once(
    server: NatsServer, nc: NATS, path: str
) -> None:
    """A worker stand-in takes the stream and never answers. The client leaves; the cancel is sent then, not after
    the request timeout (600 s here)."""
    subjects = Subjects("hung")
    requests: asyncio.Queue[Msg] = asyncio.Queue()
    side = await nats.connect(server.url)
    try:
        for subject in (subjects.chat, subjects.model_chat("stuck")):
            await side.subscribe(subject, cb=requests.put)
        stuck = FakeWorker("STUCK", {"model": "stuck", "subject_prefix": "hung"})
        await FakeWorkers(side, [stuck]).start()
        body = {"chat_id": "c", "user_prompt": "Hi", "stream": True} if path == "/chat" else completion("stuck")
        body["stream"] = True
        config = Config(nats_url=server.url, subject_prefix="hung", request_timeout=600)
        async with running_bridge(config) as bridge, watching_cancels(nc, "hung") as cancels:
            async with bridge.client() as http:
                leaving = asyncio.create_task(http.post(path, json=body))
                request_id = (await requests.get()).headers[REQUEST_ID]
                leaving.cancel()  # the client hangs up before any chunk
                with contextlib.suppress(asyncio.CancelledError):
                    await leaving
            assert await cancels.next_id(timeout=60) == request_id
    finally:
        await side.close()


# --- stream_options ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [{}, {"stream": False}, {"stream": None}])
async def test_stream_options_without_stream_is_a_400(lonely_http: httpx.AsyncClient, stream: dict) -> None:
    fields = {"stream_options": {"include_usage": True}} | stream
    response = await lonely_http.post("/v1/chat/completions", json=completion("m", **fields))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "stream_options")
    assert "only allowed when `stream` is true" in error["message"]
    unset = await lonely_http.post("/v1/chat/completions", json=completion("m", stream_options=None))
    assert unset.status_code == 503, unset.text  # a null stream_options passes; no worker on this server


# --- /readyz ---------------------------------------------------------------------------------------------------------


async def test_readyz_with_keys_hides_the_models_and_a_burst_of_probes_pings_once(
    late_bus: NatsServer, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unauthenticated for probes, but with API keys no model names; concurrent probes share one `$SRV.PING`, and
    a ready answer stands for `READY_FOR_S` (made long here, so that how fast this machine is does not matter)."""
    monkeypatch.setattr(readiness_module, "READY_FOR_S", 600.0)
    pings = await Asked(nc, f"$SRV.PING.{SERVICE_NAME}").start()
    config = Config(nats_url=late_bus.url, api_keys=[API_KEY])
    async with running_bridge(config) as bridge, bridge.client() as http:
        burst = await asyncio.gather(*(http.get("/readyz") for _ in range(8)))
        later = await http.get("/readyz")
    for ready in (*burst, later):
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "workers": 2}
    assert await pings.settled() == 1
