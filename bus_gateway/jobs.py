"""Durable chat: requests through the JetStream work queue (`LLM_JOBS`), one final answer per request id.

Core request-reply (`BusClient.chat`) has the lowest latency, but a request dies with the worker that holds it.
A durable job is stored by JetStream until a worker acks it, and a worker acks only after it has published the
answer, so a job whose worker is killed mid-generation is redelivered to another worker. Its price: one more hop
through JetStream (a stored publish and an ack) per request, and no streaming.

`JobClient` publishes each job with its reply inbox (`Llmbus-Reply-To`) and request id (`Llmbus-Request-Id`,
also `Nats-Msg-Id`, so a re-published job is stored once) in headers. It listens on one wildcard inbox and
keeps the first answer per request id: a second answer (a worker that died after answering but before acking,
so the job ran twice), or an answer that comes after its caller gave up, is counted in `duplicates` and dropped.

    jobs = JobClient(nc)
    answer = await jobs.chat(ChatRequest(chat_id="c1", user_prompt="Hi", max_tokens=16), timeout=60)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus_gateway.client import (
    DEFAULT_TIMEOUT,
    REPLY_GRACE,
    BusError,
    decode_reply,
    error_from_reply,
    new_request_id,
    no_reply,
    with_deadline,
)
from schemas import BatchResponse, ChatRequest, ChatResponse, Subjects
from schemas.subjects import REPLY_TO, REQUEST_ID, valid_request_id

MSG_ID = "Nats-Msg-Id"
PUBLISH_TIMEOUT = 5.0
PUBLISH_RETRY_DELAY = 0.2
REMEMBERED_ANSWERS = 10_000


class JobClient:
    """Durable chat on a connected NATS client (the connection stays the caller's)."""

    def __init__(self, nc: Client, subjects: Subjects | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self.answers = 0
        self.duplicates = 0
        self._inbox_prefix = nc.new_inbox()
        self._sub: Subscription | None = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()

    async def chat(
        self, request: ChatRequest, timeout: float | None = None, *, request_id: str | None = None
    ) -> ChatResponse:
        """One chat completion as a durable job on `<prefix>.jobs.chat`."""
        timeout = self.timeout if timeout is None else timeout
        data = msgspec.json.encode(with_deadline(request, timeout, stream=False))
        reply = await self.submit(self.subjects.jobs_chat, data, timeout, request_id)
        return decode_reply(reply.data, ChatResponse)

    async def chat_batched(
        self, queries: Sequence[ChatRequest], timeout: float | None = None, *, request_id: str | None = None
    ) -> BatchResponse:
        """Many chats as one durable job on `<prefix>.jobs.chat.batched`; answers come back in input order."""
        timeout = self.timeout if timeout is None else timeout
        envelope = {"queries": [with_deadline(q, timeout) for q in queries]}
        subject = f"{self.subjects.jobs_chat}.batched"
        reply = await self.submit(subject, msgspec.json.encode(envelope), timeout, request_id)
        return decode_reply(reply.data, BatchResponse)

    async def submit(self, subject: str, data: bytes, timeout: float, request_id: str | None = None) -> Msg:
        """Publish one job and wait for its first answer; raises `BusError` for an error answer or no answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + REPLY_GRACE
        request_id = request_id or new_request_id()
        if not valid_request_id(request_id):
            raise BusError(400, f"invalid request id {request_id!r}: use 1-128 of A-Z a-z 0-9 _-", reason="bad_request")
        if request_id in self._waiting:
            raise BusError(400, f"request id {request_id!r} is already waiting for an answer", reason="bad_request")
        await self._listen()
        answer: asyncio.Future[Msg] = loop.create_future()
        self._waiting[request_id] = answer
        try:
            await self._publish(subject, data, request_id, deadline)
            try:
                reply = await asyncio.wait_for(answer, max(deadline - loop.time(), 0.001))
            except TimeoutError:
                self._spawn(self._send_cancel(request_id))
                raise no_reply(timeout) from None
        except asyncio.CancelledError:
            self._spawn(self._send_cancel(request_id))
            raise
        finally:
            del self._waiting[request_id]
            self._remember(request_id)
        error = error_from_reply(reply, subject)
        if error is not None:
            raise error
        return reply

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def __aenter__(self) -> JobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _listen(self) -> None:
        if self._sub is None:
            self._sub = await self.nc.subscribe(f"{self._inbox_prefix}.*", cb=self._on_answer)

    async def _on_answer(self, msg: Msg) -> None:
        request_id = msg.subject[len(self._inbox_prefix) + 1 :]
        waiting = self._waiting.get(request_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(msg)
            self.answers += 1
        elif waiting is not None or request_id in self._answered:
            self.duplicates += 1

    def _remember(self, request_id: str) -> None:
        self._answered[request_id] = None
        while len(self._answered) > REMEMBERED_ANSWERS:
            self._answered.popitem(last=False)

    async def _publish(self, subject: str, data: bytes, request_id: str, deadline: float) -> None:
        """Store the job in JetStream. A publish whose ack timed out is retried: the same Nats-Msg-Id stores it once."""
        loop = asyncio.get_running_loop()
        headers = {REQUEST_ID: request_id, REPLY_TO: f"{self._inbox_prefix}.{request_id}", MSG_ID: request_id}
        while True:
            if not self.nc.is_connected:
                state = "closed" if self.nc.is_closed else "reconnecting"
                raise BusError(503, f"not connected to NATS ({state}); try again shortly", reason="connection")
            wait = min(PUBLISH_TIMEOUT, deadline - REPLY_GRACE - loop.time())
            if wait <= 0:
                raise BusError(504, "JetStream did not confirm the durable job in time", reason="timeout")
            try:
                await self.js.publish(subject, data, timeout=wait, headers=headers)
                return
            except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
                raise BusError(
                    503,
                    f"no JetStream stream takes {subject}: start a worker with --durable (it creates the job stream)",
                    reason="no_responders",
                ) from None
            except nats.errors.MaxPayloadError:
                limit = self.nc.max_payload
                raise BusError(
                    413, f"job of {len(data)} bytes exceeds the NATS max payload of {limit} bytes", reason="too_large"
                ) from None
            except nats.js.errors.APIError as exc:
                code = exc.code if isinstance(exc.code, int) and 400 <= exc.code < 600 else 503
                raise BusError(code, f"JetStream refused the durable job: {exc.description}", reason="worker") from None
            except nats.errors.TimeoutError:
                await asyncio.sleep(PUBLISH_RETRY_DELAY)
            except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
                raise BusError(503, f"NATS connection is down: {type(exc).__name__}", reason="connection") from None

    async def _send_cancel(self, request_id: str) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(self.subjects.cancel(request_id), b"")

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def durable_chat(
    nc: Client, request: ChatRequest, *, subjects: Subjects | None = None, timeout: float = DEFAULT_TIMEOUT
) -> ChatResponse:
    """One durable chat with a short-lived `JobClient` (prefer one long-lived `JobClient` for many requests)."""
    async with JobClient(nc, subjects, timeout=timeout) as jobs:
        return await jobs.chat(request)
