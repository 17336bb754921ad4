"""A stream's idle timeout (`bus_gateway.idle_watch`): one timer per stream, never a timeout that a message already
queued should have prevented. Over a real nats-server: a stream whose worker goes silent fails with 504 and sends
the cancel; one that keeps producing past the idle timeout is read to its end (tests/test_client.py)."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from bus_gateway.client import BusClient, BusError
from bus_gateway.idle_watch import IdleWatch
from helpers.bridge import watching_cancels
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import ChatRequest, Subjects

FRANCE = ChatRequest(chat_id="france", user_prompt="What is the capital of France?", max_tokens=16)
LONG = 3600.0  # an idle timeout these tests never reach by waiting: they run the watch's check themselves


def message(data: bytes) -> Msg:
    return Msg(_client=None, subject="_INBOX.test.1", data=data)  # type: ignore[arg-type]


async def waiting_reader(watch: IdleWatch) -> asyncio.Task[Msg]:
    reader = asyncio.create_task(watch.next())
    await asyncio.sleep(0)  # the reader runs to its wait on the empty queue
    assert not reader.done()
    return reader


def as_if_waited_past_the_timeout(watch: IdleWatch) -> None:
    assert watch._waiting_since is not None
    watch._waiting_since -= 2 * watch.idle
    watch._check()


async def test_a_reader_that_waited_past_the_idle_timeout_gets_504() -> None:
    watch = IdleWatch(asyncio.Queue(), LONG)
    reader = await waiting_reader(watch)
    as_if_waited_past_the_timeout(watch)
    with pytest.raises(BusError) as caught:
        await reader
    assert (caught.value.code, caught.value.name) == (504, "timeout")
    assert caught.value.message == f"no message from a worker within {LONG:g}s"
    watch.stop()


async def test_a_message_queued_before_the_check_is_read_and_is_no_timeout() -> None:
    answers: asyncio.Queue[Msg] = asyncio.Queue()
    watch = IdleWatch(answers, LONG)
    reader = await waiting_reader(watch)
    answers.put_nowait(message(b"late but there"))  # the reader has not run since: it still counts as waiting
    as_if_waited_past_the_timeout(watch)
    assert (await reader).data == b"late but there"
    assert answers.empty(), "no timeout marker was left behind the message"
    assert watch._timer is not None, "the watch keeps watching the next wait"
    watch.stop()


async def test_a_check_during_a_short_wait_only_sets_the_next_check_at_the_end_of_that_wait() -> None:
    answers: asyncio.Queue[Msg] = asyncio.Queue()
    watch = IdleWatch(answers, LONG)
    reader = await waiting_reader(watch)
    watch._check()  # the reader has waited far less than LONG
    assert not reader.done()
    assert watch._timer is not None and watch._waiting_since is not None
    assert watch._timer.when() == pytest.approx(watch._waiting_since + LONG)
    answers.put_nowait(message(b"on time"))
    assert (await reader).data == b"on time"
    watch.stop()


async def test_a_steady_stream_keeps_one_timer_instead_of_one_per_message() -> None:
    answers: asyncio.Queue[Msg] = asyncio.Queue()
    watch = IdleWatch(answers, LONG)
    reader = await waiting_reader(watch)
    first_timer = watch._timer
    for index in range(100):
        answers.put_nowait(message(b"%d" % index))
        assert (await reader).data == b"%d" % index
        reader = await waiting_reader(watch)
        assert watch._timer is first_timer
    reader.cancel()
    watch.stop()
    assert first_timer is not None and first_timer.cancelled()


async def test_a_stream_whose_worker_goes_silent_fails_with_504_and_cancels(lonely_nats: NatsServer) -> None:
    responder = await nats.connect(lonely_nats.url)

    async def accepts_then_goes_silent(msg: Msg) -> None:
        accepted = {"chat_id": "france", "delta": "", "index": 0}
        await responder.publish(msg.reply, msgspec.json.encode(accepted), headers={"Llmbus-Stream": "chunk"})

    await responder.subscribe("quiet.chat", cb=accepts_then_goes_silent)
    await flushed(responder)
    try:
        async with (
            await BusClient.connect(lonely_nats.url, subjects=Subjects("quiet")) as bus,
            watching_cancels(bus.nc, "quiet") as cancels,
        ):
            chunks = []
            with pytest.raises(BusError) as caught:
                async for chunk in bus.stream(FRANCE, timeout=0.3):
                    chunks.append(chunk)
            assert [chunk.index for chunk in chunks] == [0]
            assert (caught.value.code, caught.value.message) == (504, "no message from a worker within 0.3s")
            assert len(await cancels.next_id()) == 32
    finally:
        await responder.close()
