"""`BusClient` streams against a real nats-server: a stream that lost messages on the bus is an error, never a
`done` (chunk indexes must follow each other; a batch's `BatchDone` counts must match the results received), and a
request id is claimed once per client (a second stream with an id in flight is a 409, and the first keeps its
answers).

A real worker never skips an index, so the lost-message tests use a stand-in responder on the real server that
publishes crafted messages, as a worker's would look after a client's connection dropped and came back mid-stream.
The request-id tests use a real worker (the tiny random model).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from bus_gateway.client import BusClient, BusError
from bus_gateway.inbox import ReplyInbox
from helpers.bridge import watching_cancels
from helpers.tiny_model import tiny_model
from helpers.workers import start_worker
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import BatchDone, BatchItemDone, BatchResult, ChatChunk, ChatRequest, Subjects, Usage
from schemas.subjects import REQUEST_ID, STREAM, STREAM_CHUNK, STREAM_END

pytestmark = pytest.mark.timeout(120)

HELLO = ChatRequest(chat_id="hello", user_prompt="Say hello.", max_tokens=8)
IDLE = 30.0  # the streams' idle timeout: a bound for a broken run, never reached by a passing one


def chunk(index: int, delta: str = "", **fields: object) -> bytes:
    return msgspec.json.encode(ChatChunk(chat_id="hello", delta=delta, index=index, **fields))


def end_chunk(index: int) -> bytes:
    return chunk(index, done=True, finish_reason="length", usage=Usage(3, index - 1, index + 2), model="stand-in")


@contextlib.asynccontextmanager
async def stand_in(url: str, subject: str, script: Sequence[tuple[bytes, str]]) -> AsyncIterator[None]:
    """A responder on `subject` that answers each request with `script`'s messages (body, `Llmbus-Stream` marker),
    then the empty sentinel, as a worker does."""
    nc = await nats.connect(url)

    async def answer(msg: Msg) -> None:
        request_id = (msg.headers or {}).get(REQUEST_ID, "")
        for body, marker in script:
            await nc.publish(msg.reply, body, headers={STREAM: marker, REQUEST_ID: request_id})
        await nc.publish(msg.reply, b"")

    await nc.subscribe(subject, cb=answer)
    await flushed(nc)
    try:
        yield
    finally:
        await nc.close()


@pytest.fixture
async def gaps_bus(lonely_nats: NatsServer) -> AsyncIterator[BusClient]:
    async with await BusClient.connect(lonely_nats.url, subjects=Subjects("gaps")) as bus:
        yield bus


# --- a stream that lost messages --------------------------------------------------------------------------------


async def test_a_gap_in_chunk_indexes_is_a_502_and_cancels_the_stream(
    lonely_nats: NatsServer, gaps_bus: BusClient
) -> None:
    """Chunks 0 and 1 arrive, 2 was lost, 3 and the end follow: the client yields 0 and 1, then raises a 502 that
    names both indexes (not the `done` chunk), cancels the generation the worker still holds, and frees the id."""
    script = [(chunk(0), STREAM_CHUNK), (chunk(1, "Hel"), STREAM_CHUNK), (chunk(3, "lo"), STREAM_CHUNK)]
    script.append((end_chunk(4), STREAM_END))
    received: list[ChatChunk] = []
    async with stand_in(lonely_nats.url, "gaps.chat", script), watching_cancels(gaps_bus.nc, "gaps") as cancels:
        with pytest.raises(BusError) as caught:
            async with contextlib.aclosing(gaps_bus.stream(HELLO, IDLE, request_id="gap-1")) as chunks:
                async for one in chunks:
                    received.append(one)
        assert await cancels.next_id() == "gap-1"
    assert [c.index for c in received] == [0, 1]
    assert (caught.value.code, caught.value.name) == (502, "bad_reply")
    assert caught.value.message == "the stream lost messages: expected chunk index 2, received 3"
    assert not gaps_bus.inbox.is_open("gap-1")


async def test_a_gap_before_the_end_chunk_is_a_502_not_a_done(lonely_nats: NatsServer, gaps_bus: BusClient) -> None:
    """The reproduced loss: chunks after a dropped connection came back, then a `done` with usage. The end chunk
    with an index past the next one is an error, never yielded; so is a stream whose first chunk is not 0."""
    script = [(chunk(0), STREAM_CHUNK), (chunk(1, "a"), STREAM_CHUNK), (end_chunk(34), STREAM_END)]
    async with stand_in(lonely_nats.url, "gaps.chat", script):
        received = []
        with pytest.raises(BusError) as caught:
            async for one in gaps_bus.stream(HELLO, IDLE):
                received.append(one)
    assert [c.index for c in received] == [0, 1] and not any(c.done for c in received)
    assert (caught.value.code, caught.value.name) == (502, "bad_reply")
    assert "expected chunk index 2, received 34" in caught.value.message

    late = [(chunk(5, "x"), STREAM_CHUNK), (end_chunk(6), STREAM_END)]
    async with stand_in(lonely_nats.url, "gaps.chat", late):
        with pytest.raises(BusError) as first_lost:
            await anext(gaps_bus.stream(HELLO, IDLE))
    assert first_lost.value.code == 502
    assert "expected chunk index 0, received 5" in first_lost.value.message


async def test_a_stream_without_gaps_is_read_to_its_end(lonely_nats: NatsServer, gaps_bus: BusClient) -> None:
    """The check passes a whole stream as the worker numbers it: the accepted chunk 0, each delta, the end chunk."""
    script = [(chunk(0), STREAM_CHUNK), (chunk(1, "Hel"), STREAM_CHUNK), (chunk(2, "lo"), STREAM_CHUNK)]
    script.append((end_chunk(3), STREAM_END))
    async with stand_in(lonely_nats.url, "gaps.chat", script):
        received = [one async for one in gaps_bus.stream(HELLO, IDLE)]
    assert [c.index for c in received] == [0, 1, 2, 3] and received[-1].done


async def test_batch_done_counts_that_disagree_with_the_results_are_a_502(
    lonely_nats: NatsServer, gaps_bus: BusClient
) -> None:
    """Two queries, one `BatchItemDone` received (the other lost), then `BatchDone` counting two answers: a 502 that
    names both counts, instead of the `BatchDone`."""
    item = BatchItemDone(index=1, result=BatchResult(chat_id="q2", response="hi", finish_reason="stop"))
    script = [(msgspec.json.encode(item), STREAM_CHUNK), (msgspec.json.encode(BatchDone.of(2, 0)), STREAM_END)]
    received: list[BatchItemDone | BatchDone] = []
    async with stand_in(lonely_nats.url, "gaps.chat.batched", script):
        with pytest.raises(BusError) as caught:
            async for message in gaps_bus.stream_batch([HELLO, HELLO], IDLE, request_id="batch-1"):
                received.append(message)
    assert received == [item]
    assert (caught.value.code, caught.value.name) == (502, "bad_reply")
    assert caught.value.message == (
        "the stream lost messages: BatchDone counts 2 answered and 0 failed, "
        "but 1 answered and 0 failed results were received"
    )
    assert not gaps_bus.inbox.is_open("batch-1")


# --- one request id, claimed once -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tiny_bus(lonely_nats: NatsServer) -> AsyncIterator[str]:
    """A tiny-model worker on subjects of its own (`claims`); yields the server's URL."""
    config = Config(nats_url=lonely_nats.url, subject_prefix="claims", max_tokens_cap=16)
    worker = await start_worker(config, tiny_model())
    yield lonely_nats.url
    await worker.shutdown()


@pytest.fixture
async def claims_bus(tiny_bus: str) -> AsyncIterator[BusClient]:
    async with await BusClient.connect(tiny_bus, subjects=Subjects("claims")) as bus:
        yield bus


async def test_inbox_open_refuses_an_id_already_open(lonely_nats: NatsServer) -> None:
    """A second `open` of one id is a 409 and leaves the first claim receiving its answers."""
    nc = await nats.connect(lonely_nats.url)
    inbox = ReplyInbox(nc)
    try:
        first = await inbox.open("taken")
        with pytest.raises(BusError) as caught:
            await inbox.open("taken")
        assert (caught.value.code, caught.value.name) == (409, "duplicate_request")
        await nc.publish(inbox.reply_subject("taken"), b"answer")
        assert (await first.get()).data == b"answer"
    finally:
        await inbox.stop()
        await nc.close()


async def test_a_second_stream_with_an_id_in_flight_is_a_409_and_the_first_keeps_its_answer(
    claims_bus: BusClient,
) -> None:
    """Two streams made with one id before either is read: the first to be read claims the id, the other gets a
    409 on its first read, and the first is read whole (its own chunks, 0 to the end) without a timeout."""
    first = claims_bus.stream(HELLO, IDLE, request_id="same-id")
    second = claims_bus.stream(HELLO, IDLE, request_id="same-id")
    async with contextlib.aclosing(first), contextlib.aclosing(second):
        received = [await anext(first)]
        with pytest.raises(BusError) as caught:
            await anext(second)
        assert (caught.value.code, caught.value.name) == (409, "duplicate_request")
        received += [one async for one in first]
    assert [c.index for c in received] == list(range(len(received)))
    assert received[-1].done and not any(c.done for c in received[:-1])
    assert not claims_bus.inbox.is_open("same-id")
    again = [one async for one in claims_bus.stream(HELLO, IDLE, request_id="same-id")]
    assert again[-1].done, "the id is free again once its stream has ended"


async def test_concurrent_first_reads_claim_an_id_once(claims_bus: BusClient) -> None:
    """Two streams made with one id and read at once (both made before either claims it): exactly one starts and
    is read whole, the other is a 409 (before the fix the second replaced the first's queue: one stream got the
    other's chunks, the other waited in vain)."""
    streams = [claims_bus.stream(HELLO, IDLE, request_id="race") for _ in range(2)]
    firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    try:
        errors = [f for f in firsts if isinstance(f, BusError)]
        assert [e.code for e in errors] == [409], firsts
        (winner,) = [s for s, f in zip(streams, firsts, strict=True) if isinstance(f, ChatChunk)]
        assert [one async for one in winner][-1].done
    finally:
        for s in streams:
            await s.aclose()


async def test_a_stream_never_read_claims_nothing(claims_bus: BusClient) -> None:
    """Nothing is claimed (nor sent) until a stream's first read: a stream made and closed unread leaves its id free,
    and a stream left early (closed after its first chunk) frees it too."""
    unread = claims_bus.stream(HELLO, IDLE, request_id="lazy")
    assert not claims_bus.inbox.is_open("lazy")
    assert (await claims_bus.chat(HELLO, IDLE, request_id="lazy")).chat_id == "hello"
    await unread.aclose()
    async with contextlib.aclosing(claims_bus.stream(HELLO, IDLE, request_id="lazy")) as left:
        assert (await anext(left)).index == 0
        assert claims_bus.inbox.is_open("lazy")
    assert not claims_bus.inbox.is_open("lazy")
