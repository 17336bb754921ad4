"""`BusClient` against a real nats-server: no-responders, timeouts, retries, payload limits, and (with the real
SmolLM2 worker) chat, batches, streams, cancel and discovery."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest

from bus_gateway.client import BusClient, BusError
from helpers.bridge import silent_responder, watching_cancels
from helpers.workers import start_worker
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import ChatChunk, ChatRequest, Message, Subjects
from schemas.subjects import ERROR, ERROR_CODE, ERROR_NAME

pytestmark = pytest.mark.timeout(120)

FRANCE = ChatRequest(chat_id="france", user_prompt="What is the capital of France?", max_tokens=16)


@pytest.fixture
async def lonely_client(lonely_nats: NatsServer) -> AsyncIterator[BusClient]:
    async with await BusClient.connect(lonely_nats.url) as client:
        yield client


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[BusClient]:
    async with await BusClient.connect(nats_server.url) as bus:
        yield bus


# --- no worker needed ---------------------------------------------------------------------------------------


async def test_no_responders_is_a_fast_503(lonely_client: BusClient) -> None:
    with pytest.raises(BusError) as caught:
        await lonely_client.chat(FRANCE, timeout=10)
    assert caught.value.code == 503
    assert caught.value.name == "no_responders"
    assert caught.value.message == "no inference worker is listening on llm.chat"


async def test_no_responders_for_batches_and_streams(lonely_client: BusClient) -> None:
    with pytest.raises(BusError) as batch_error:
        await lonely_client.chat_batched([FRANCE], timeout=5)
    assert (batch_error.value.code, batch_error.value.message) == (
        503,
        "no inference worker is listening on llm.chat.batched",
    )
    with pytest.raises(BusError) as stream_error:
        async with contextlib.aclosing(lonely_client.stream(FRANCE, timeout=5)) as chunks:
            async for _ in chunks:
                pytest.fail("no chunk can arrive without a worker")
    assert stream_error.value.code == 503
    assert stream_error.value.name == "no_responders"


async def test_retries_back_off_then_give_up(lonely_nats: NatsServer) -> None:
    async with await BusClient.connect(lonely_nats.url, retries=3, backoff=0.05) as bus:
        started = time.monotonic()
        with pytest.raises(BusError) as caught:
            await bus.chat(FRANCE, timeout=10)
        elapsed = time.monotonic() - started
    assert caught.value.code == 503
    # three pauses of about 0.05, 0.1 and 0.2 s (each +-20%) between the four attempts: at least 0.28 s in all
    assert elapsed > 0.28, elapsed


async def test_a_stream_is_never_retried_once_it_has_started(lonely_nats: NatsServer) -> None:
    """A worker that stops mid-stream answers 503 `shutting_down`, an error worth a retry before the stream starts;
    after its first message a retry would repeat the answer from the beginning. A scripted worker here sends one
    chunk, then that error."""
    requests: list[bytes] = []
    async with await BusClient.connect(lonely_nats.url, retries=2, backoff=0.01) as bus:

        async def worker(msg: nats.aio.msg.Msg) -> None:
            requests.append(msg.data)
            await bus.nc.publish(msg.reply, msgspec.json.encode(ChatChunk(chat_id="s", delta="Hel", index=0)))
            error = {ERROR_CODE: "503", ERROR: "worker is shutting down", ERROR_NAME: "shutting_down"}
            await bus.nc.publish(msg.reply, b"", headers=error)

        await bus.nc.subscribe(bus.subjects.chat, cb=worker)
        chunks = []
        with pytest.raises(BusError) as stopped:
            async for chunk in bus.stream(FRANCE, timeout=10):
                chunks.append(chunk.delta)
    assert stopped.value.code == 503 and chunks == ["Hel"] and len(requests) == 1


async def test_timeout_is_504_and_cancels_on_the_worker(lonely_nats: NatsServer) -> None:
    async with (
        silent_responder(lonely_nats.url, "hung.chat"),
        await BusClient.connect(lonely_nats.url, subjects=Subjects("hung")) as bus,
        watching_cancels(bus.nc, "hung") as cancels,
    ):
        with pytest.raises(BusError) as caught:
            await bus.chat(FRANCE, timeout=0.3)
        assert caught.value.code == 504
        assert caught.value.name == "timeout"
        assert caught.value.message == "no reply from a worker within 0.3s"
        cancelled = await cancels.next_id()
        assert len(cancelled) == 32, "the cancel subject ends with the request id"


async def test_stream_timeout_is_504(lonely_nats: NatsServer) -> None:
    async with (
        silent_responder(lonely_nats.url, "hung2.chat"),
        await BusClient.connect(lonely_nats.url, subjects=Subjects("hung2")) as bus,
        watching_cancels(bus.nc, "hung2") as cancels,
    ):
        with pytest.raises(BusError) as caught:
            async with contextlib.aclosing(bus.stream(FRANCE, timeout=0.3)) as chunks:
                async for _ in chunks:
                    pass
        assert caught.value.code == 504
        assert await cancels.next_id()


async def test_request_over_max_payload_is_413(lonely_client: BusClient) -> None:
    huge = ChatRequest(chat_id="huge", user_prompt="x" * (lonely_client.nc.max_payload + 10))
    with pytest.raises(BusError) as caught:
        await lonely_client.chat(huge, timeout=5)
    assert caught.value.code == 413
    assert "max payload" in caught.value.message


async def test_closed_connection_is_a_503_not_a_hang(lonely_nats: NatsServer) -> None:
    bus = await BusClient.connect(lonely_nats.url)
    await bus.close()
    with pytest.raises(BusError) as caught:
        await bus.chat(FRANCE, timeout=5)
    assert caught.value.code == 503
    assert caught.value.name == "not_connected"
    assert "not connected to NATS" in caught.value.message


async def test_discovery_without_workers_is_empty_and_quick(lonely_client: BusClient) -> None:
    assert await lonely_client.ping() == []
    assert await lonely_client.models() == []


async def test_cancel_publishes_on_the_cancel_subject(lonely_client: BusClient) -> None:
    async with watching_cancels(lonely_client.nc) as cancels:
        await lonely_client.cancel("abc123")
        assert await cancels.next_id() == "abc123"


async def test_wraps_a_connection_it_does_not_own(lonely_nats: NatsServer) -> None:
    nc = await nats.connect(lonely_nats.url)
    try:
        async with BusClient(nc) as bus:
            assert bus.connected
        assert nc.is_connected, "closing the client leaves a borrowed connection open"
    finally:
        await nc.close()


# --- with the real worker -------------------------------------------------------------------------------------


@pytest.mark.model
async def test_chat_answers_paris(worker: object, client: BusClient) -> None:
    reply = await client.chat(FRANCE, timeout=60)
    assert reply.chat_id == "france"
    assert "Paris" in reply.response
    assert reply.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model


@pytest.mark.model
async def test_chat_with_messages(worker: object, client: BusClient) -> None:
    request = ChatRequest(
        chat_id="turns",
        messages=[
            Message("system", "You answer in one short sentence."),
            Message("user", "What is the capital of France?"),
            Message("assistant", "Paris."),
            Message("user", "And of Italy?"),
        ],
        max_tokens=12,
    )
    reply = await client.chat(request, timeout=60)
    assert reply.response


@pytest.mark.model
async def test_worker_error_carries_its_code_and_message(worker: object, client: BusClient) -> None:
    with pytest.raises(BusError) as caught:
        await client.chat(ChatRequest(chat_id="too-many", user_prompt="hi", max_tokens=100_000), timeout=30)
    assert caught.value.code == 400
    assert caught.value.name == "bad_request"
    assert "max_tokens 100000 exceeds" in caught.value.message


@pytest.mark.model
async def test_batch_partial_success_in_order(worker: object, client: BusClient) -> None:
    queries: list[ChatRequest | msgspec.Raw] = [
        ChatRequest(chat_id="q1", user_prompt="Say hello.", max_tokens=4),
        msgspec.Raw(b'{"chat_id": "q2"}'),
        ChatRequest(chat_id="q3", user_prompt="Say bye.", max_tokens=4),
    ]
    answer = await client.chat_batched(queries, timeout=60)
    assert [r.chat_id for r in answer.responses] == ["q1", "q2", "q3"]
    assert answer.responses[0].response and answer.responses[2].response
    assert answer.responses[1].code == 400 and "user_prompt" in (answer.responses[1].error or "")
    assert answer.partial_success is True
    assert answer.message


@pytest.mark.model
async def test_batch_all_invalid_is_a_400_with_the_batch_body(worker: object, client: BusClient) -> None:
    with pytest.raises(BusError) as caught:
        await client.chat_batched([msgspec.Raw(b'{"chat_id": "bad"}')], timeout=30)
    assert caught.value.code == 400
    assert caught.value.body is not None and b"responses" in caught.value.body


@pytest.mark.model
async def test_stream_chunks_end_with_done(worker: object, client: BusClient) -> None:
    request = ChatRequest(chat_id="s1", user_prompt="Count from one to ten.", max_tokens=12)
    chunks: list[ChatChunk] = []
    async with contextlib.aclosing(client.stream(request, timeout=60)) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    assert len(chunks) >= 2
    assert chunks[-1].done and chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert not any(chunk.done for chunk in chunks[:-1])
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    assert "".join(chunk.delta for chunk in chunks).strip()


@pytest.mark.model
async def test_closing_a_stream_early_cancels_it_on_the_worker(worker: object, client: BusClient) -> None:
    request = ChatRequest(chat_id="long", user_prompt="Write a long story about a dragon.", max_tokens=200)
    async with watching_cancels(client.nc) as cancels:
        async with contextlib.aclosing(client.stream(request, timeout=60)) as stream:
            first = await anext(stream)
            assert not first.done
        cancelled = await cancels.next_id()
    assert cancelled
    await _wait_until_idle(client)


@pytest.mark.model
async def test_ping_and_models_see_the_worker(worker: object, client: BusClient) -> None:
    replies = await client.ping()
    assert len(replies) == 1
    assert replies[0]["name"] == "llm-inference"
    model = replies[0]["metadata"]["model"]
    assert await client.models() == [model]


@pytest.mark.model
async def test_retry_reaches_a_worker_that_starts_late(lonely_nats: NatsServer, smollm: object) -> None:
    async with await BusClient.connect(lonely_nats.url, subjects=Subjects("late"), retries=8, backoff=0.1) as bus:
        asking = asyncio.create_task(bus.chat(FRANCE, timeout=60))
        late = await start_worker(Config(nats_url=lonely_nats.url, subject_prefix="late"), smollm)  # type: ignore[arg-type]
        try:
            reply = await asyncio.wait_for(asking, 60)
        finally:
            await late.shutdown()
    assert "Paris" in reply.response


async def _wait_until_idle(client: BusClient, timeout: float = 10.0) -> None:
    """The worker's STATS say it holds nothing (the cancelled stream left its slot)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = None
    while loop.time() < deadline:
        reply = await client.nc.request("$SRV.STATS.llm-inference", b"", timeout=2)
        stats = msgspec.json.decode(reply.data)
        pending = stats["endpoints"][0]["data"]["pending"]
        if pending == 0:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the worker still holds {pending} requests {timeout}s after the cancel")


async def test_a_stream_has_an_idle_timeout_not_a_total_deadline(lonely_nats: NatsServer) -> None:
    """A worker that keeps producing for 3 s is read to its end with an idle timeout of 1 s; nothing in the request
    tells the worker to give up after a total time."""
    responder = await nats.connect(lonely_nats.url)
    seen: list[dict] = []

    async def slow_worker(msg: nats.aio.msg.Msg) -> None:
        seen.append(msgspec.json.decode(msg.data))
        for index in range(15):
            chunk = {"chat_id": "slow", "delta": f"t{index} ", "index": index}
            await responder.publish(msg.reply, msgspec.json.encode(chunk), headers={"Llmbus-Stream": "chunk"})
            await asyncio.sleep(0.2)
        end = {"chat_id": "slow", "delta": "", "index": 15, "done": True, "finish_reason": "stop"}
        await responder.publish(msg.reply, msgspec.json.encode(end), headers={"Llmbus-Stream": "end"})

    await responder.subscribe("slow.chat", cb=slow_worker)
    await flushed(responder)
    try:
        async with await BusClient.connect(lonely_nats.url, subjects=Subjects("slow")) as bus:
            chunks = [chunk async for chunk in bus.stream(FRANCE, timeout=1.0)]
    finally:
        await responder.close()
    assert len(chunks) == 16 and chunks[-1].done
    assert seen[0].get("timeout") is None and seen[0]["stream"] is True
