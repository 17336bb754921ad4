"""Streamed answers on a `BusClient` (its `Streaming` side): a chat's chunks, or a batch's results as they finish.

A stream is several messages on one reply subject, through an end message (`Llmbus-Stream: end`); its timeout is an
idle timeout between messages, never a total deadline, so a long answer that keeps producing is never cut. Leaving
early (break, `aclose()`, the reading task cancelled) cancels the work on the worker.

Core NATS may drop messages (a client's connection that drops and reconnects mid-stream loses what was published
meanwhile), so a stream is checked for completeness: a chat's chunks must be numbered 0, 1, 2... (the worker numbers
every message of the stream: the accepted chunk 0, each delta, then the end chunk), and a batch's `BatchDone` counts
must match the results received. A stream that lost messages raises `BusError` 502 `bad_reply`, never a `done`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

import msgspec
from nats.aio.msg import Msg

from bus_gateway.bus_errors import BusError, decode_reply, error_from_reply
from bus_gateway.idle_watch import IdleWatch
from schemas import BatchDone, BatchItemDone, ChatChunk, ChatRequest
from schemas.subjects import STREAM, STREAM_END

Headers = Mapping[str, str] | None  # a request's NATS headers (`BusClient` takes them from here)


class Streaming:
    """Mixed into `BusClient`, whose request helpers (`_claim`, `_publish`, `_chat_subject`...) it uses."""

    def stream(
        self,
        request: ChatRequest,
        timeout: float | None = None,
        *,
        retries: int | None = None,
        request_id: str | None = None,
        headers: Headers = None,
    ) -> AsyncGenerator[ChatChunk, None]:
        """Chunks of one streamed chat: first an empty one (index 0) as soon as a worker has accepted the request,
        then the text deltas, the last with `done: true`; each chunk's `index` is the previous one's + 1. A gap (a
        message lost on the bus) raises `BusError` 502 `bad_reply` naming the expected and the received index, and
        cancels the generation when the worker still holds it; a gap seen on the end chunk sends no cancel (the work
        is over, and workers remember a cancel for a request they do not hold, refusing a reuse of its id a while).

        `timeout` bounds the wait for each next message (an idle timeout), not the whole stream, so a long answer
        that keeps producing tokens is never cut. Stopping early (break, `aclose()`, the consuming task cancelled)
        cancels the generation on the worker; wrap it in `contextlib.aclosing(...)` to make that immediate.

        Nothing is sent until the first iteration, and that is when `request_id` is claimed on this client, until
        the stream ends (answered, failed, closed): an id this client already has in flight raises `BusError` 409
        `duplicate_request` there (or at once, from this call, when it is in flight already), and the stream that
        holds it is left untouched. A stream never iterated claims nothing. An invalid id raises 400 from this call.
        """
        data = msgspec.json.encode(msgspec.structs.replace(request, stream=True))
        subject = self._chat_subject(request.model)
        messages = self._messages(subject, data, timeout, retries, self._claim(request_id), headers, ChunkOrder())
        return self._explained(messages, request.model)

    def stream_batch(
        self,
        queries: Sequence[ChatRequest],
        timeout: float | None = None,
        *,
        retries: int | None = None,
        request_id: str | None = None,
        headers: Headers = None,
    ) -> AsyncGenerator[BatchItemDone | BatchDone, None]:
        """Each query's result as soon as it is ready (`BatchItemDone`, with its index, in completion order), then a
        `BatchDone` summary. `timeout` is the idle timeout between messages; each query keeps its own `timeout`.
        A `BatchDone` whose counts disagree with the results received (a message lost on the bus) raises `BusError`
        502 `bad_reply` naming both counts instead of being yielded. `request_id` is claimed as in `stream`."""
        envelope = {"queries": list(queries), "stream": True}
        return self._messages(
            self.subjects.chat_batched,
            msgspec.json.encode(envelope),
            timeout,
            retries,
            self._claim(request_id),
            headers,
            BatchCount(),
        )

    async def _messages(
        self,
        subject: str,
        data: bytes,
        timeout: float | None,
        retries: int | None,
        request_id: str,
        headers: Headers,
        read: Callable[[Msg, bool], Any],
    ) -> AsyncGenerator[Any, None]:
        """The messages of one streamed answer through its end message, each through `read(msg, is the end)`;
        errors raised as `BusError`. The first attempt claims `request_id` in the inbox (409 if in flight), and the
        claim is held across retries and released when the stream ends, whichever way."""
        idle = self.timeout if timeout is None else timeout
        attempts = (self.retries if retries is None else retries) + 1
        started = False  # a retry once the caller has a message would repeat the answer from its start
        answers: IdleWatch | None = None  # set once this stream holds the claim of `request_id`
        try:
            for attempt in range(attempts):
                live = False  # a worker may hold the work: cancel it if we leave early
                try:
                    self._check_connected()
                    if answers is None:
                        answers = IdleWatch(await self.inbox.open(request_id), idle)
                    answers.drop_queued()  # what an earlier attempt left (its sentinel)
                    await self._publish(subject, data, request_id, headers)
                    live = True
                    self._live_streams.add(request_id)
                    while True:
                        msg = await answers.next()
                        if not msg.data and not msg.headers:
                            continue  # the sentinel of an earlier attempt's error
                        error = error_from_reply(msg, subject)
                        if error is not None:
                            live = False
                            raise error
                        end = (msg.headers or {}).get(STREAM) == STREAM_END
                        live = not end
                        item = read(msg, end)  # a lost message raises here, and a live stream is cancelled
                        started = True
                        yield item
                        if end:
                            return
                except BusError as exc:
                    delay = self.backoff_delay(attempt)
                    if started or not (exc.come_back_later and attempt + 1 < attempts):
                        raise
                finally:
                    if answers is not None:  # never another stream's: a 409 from `open` leaves this None
                        self._live_streams.discard(request_id)
                    if live:
                        self._spawn(self._send_cancel(request_id))
                await asyncio.sleep(delay)
        finally:
            if answers is not None:
                answers.stop()
                self.inbox.close(request_id)

    async def _explained(self, chunks: AsyncGenerator[Any, None], model: str | None) -> AsyncGenerator[Any, None]:
        try:
            async for chunk in chunks:
                yield chunk
        except BusError as exc:
            raise await self._unknown_model(exc, model) from None
        finally:
            await chunks.aclose()


def lost_messages(message: str) -> BusError:
    """A stream that lost messages on the bus: a bad (incomplete) reply."""
    return BusError(502, f"the stream lost messages: {message}", name="bad_reply")


class ChunkOrder:
    """Reads a chat stream: each `ChatChunk`'s `index` must be the previous one's + 1, from 0 (the worker numbers
    messages, not tokens: the accepted chunk is 0, each delta the next, the end chunk the last)."""

    def __init__(self) -> None:
        self.expected = 0

    def __call__(self, msg: Msg, end: bool) -> ChatChunk:
        chunk = decode_reply(msg.data, ChatChunk)
        if chunk.index != self.expected:
            raise lost_messages(f"expected chunk index {self.expected}, received {chunk.index}")
        self.expected += 1
        return chunk


class BatchCount:
    """Reads a batch stream: the end message's `BatchDone` counts must match the `BatchItemDone` messages read."""

    def __init__(self) -> None:
        self.answered = 0
        self.failed = 0

    def __call__(self, msg: Msg, end: bool) -> BatchItemDone | BatchDone:
        if not end:
            item = decode_reply(msg.data, BatchItemDone)
            self.answered += item.result.error is None
            self.failed += item.result.error is not None
            return item
        done = decode_reply(msg.data, BatchDone)
        if (done.answered, done.failed) != (self.answered, self.failed):
            raise lost_messages(
                f"BatchDone counts {done.answered} answered and {done.failed} failed, but "
                f"{self.answered} answered and {self.failed} failed results were received"
            )
        return done
