"""Durable chat: requests through the JetStream work queue (`LLM_JOBS`), one final answer per request id.

Core request-reply (`BusClient.chat`) has the lowest latency, but a request dies with the worker that holds it.
A durable job is stored by JetStream until a worker acks it, and a worker acks only after it has published the
answer, so a job whose worker is killed mid-generation is redelivered to another worker. Its price: one more hop
through JetStream (a stored publish and an ack) per request, and no streaming.

`JobClient` publishes each job with its reply subject (`Llmbus-Reply-To`: this client's inbox plus the request id,
also its `Nats-Msg-Id`, so a re-published job is stored once) and its request id (`Llmbus-Request-Id`) in headers.
It listens on one wildcard inbox and keeps the first answer per request id: a second answer (a worker that died
after answering but before acking, so the job ran twice), or an answer that comes after its caller gave up, is
counted in `duplicates` and dropped.

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

from bus_gateway.bus_errors import BusError, decode_reply, error_from_reply, no_reply, not_connected, too_large
from bus_gateway.client import DEFAULT_TIMEOUT, REPLY_GRACE, new_request_id, with_deadline
from bus_gateway.inbox import ReplyInbox
from llmbus import tracing
from llmbus.config import Config
from llmbus.connection import connect
from schemas import BatchResponse, ChatRequest, ChatResponse, Subjects
from schemas.subjects import MSG_ID, REPLY_TO, REQUEST_ID, message_size, valid_request_id

PUBLISH_TIMEOUT = 5.0
PUBLISH_RETRY_DELAY = 0.2
REMEMBERED_ANSWERS = 10_000


class JobClient:
    """Durable chat on a connected NATS client (the connection stays the caller's)."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        owns_connection: bool = False,
    ) -> None:
        self.nc = nc
        self._owns_connection = owns_connection
        self.js = nc.jetstream()
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self.answers = 0
        self.inbox = ReplyInbox(nc)
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def duplicates(self) -> int:
        """Answers that came for a request already answered or given up (a job that ran twice)."""
        return self.inbox.unclaimed

    async def chat(
        self,
        request: ChatRequest,
        timeout: float | None = None,
        *,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> ChatResponse:
        """One chat completion as a durable job on `<prefix>.jobs.chat`, or on its model's job queue when it names one.
        Only a `--durable` worker of that model reads that queue: the bridge answers 404 first when none is on the bus
        (`chat_api.not_served`, from `$SRV.INFO`); a caller of its own should check the same."""
        timeout = self.timeout if timeout is None else timeout
        data = msgspec.json.encode(msgspec.structs.replace(with_deadline(request, timeout), stream=False))
        subject = self.subjects.model_jobs_chat(request.model) if request.model else self.subjects.jobs_chat
        reply = await self.submit(subject, data, timeout, request_id, headers)
        return decode_reply(reply.data, ChatResponse)

    async def chat_batched(
        self,
        queries: Sequence[ChatRequest],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> BatchResponse:
        """Many chats as one durable job on `<prefix>.jobs.chat.batched`; answers come back in input order."""
        timeout = self.timeout if timeout is None else timeout
        envelope = {"queries": [with_deadline(q, timeout) for q in queries]}
        subject = self.subjects.jobs_chat_batched
        reply = await self.submit(subject, msgspec.json.encode(envelope), timeout, request_id, headers)
        return decode_reply(reply.data, BatchResponse)

    async def submit(
        self,
        subject: str,
        data: bytes,
        timeout: float,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """Publish one job and wait for its first answer; raises `BusError` for an error answer or no answer.

        The job's `Nats-Msg-Id` is its reply subject (this client's inbox plus the request id), so JetStream's
        de-duplication stores a re-publish of *this* job once, while another client's job with the same request id
        is a different message. A publish that JetStream reports as a duplicate on its first try is a request id
        this client already used: a 409, never a silent wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + REPLY_GRACE
        request_id = request_id or new_request_id()
        if not valid_request_id(request_id):
            raise BusError(400, f"invalid request id {request_id!r}: use 1-128 of A-Z a-z 0-9 _-", name="bad_request")
        if self.inbox.is_open(request_id) or request_id in self._answered:
            raise BusError(409, f"request id {request_id!r} was already used by this client", name="duplicate_request")
        answers = await self.inbox.open(request_id)
        try:
            await self._publish(subject, data, request_id, deadline, headers or {})
            try:
                reply = await asyncio.wait_for(answers.get(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                self._spawn(self._send_cancel(request_id))
                raise no_reply(timeout) from None
        except asyncio.CancelledError:
            self._spawn(self._send_cancel(request_id))
            raise
        finally:
            self.inbox.close(request_id)
            self._remember(request_id)
        self.answers += 1
        error = error_from_reply(reply, subject)
        if error is not None:
            raise error
        return reply

    @classmethod
    async def from_config(cls, config: Config, *, name: str = "llmbus-jobs") -> JobClient:
        """Connect with every connection setting of `config` (credentials, TLS, inbox prefix) and own the connection."""
        nc = await connect(config, name, reconnect_forever=False)
        return cls(nc, Subjects(config.subject_prefix), timeout=config.request_timeout, owns_connection=True)

    async def close(self) -> None:
        """Finish background work, then close the connection if this client opened it."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.inbox.stop()
        if self._owns_connection and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.drain()

    async def __aenter__(self) -> JobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _remember(self, request_id: str) -> None:
        self._answered[request_id] = None
        while len(self._answered) > REMEMBERED_ANSWERS:
            self._answered.popitem(last=False)

    async def _publish(
        self, subject: str, data: bytes, request_id: str, deadline: float, extra: dict[str, str]
    ) -> None:
        """Store the job in JetStream. A publish whose ack timed out is retried: the same Nats-Msg-Id stores it once."""
        loop = asyncio.get_running_loop()
        reply_to = self.inbox.reply_subject(request_id)
        headers = {**tracing.outgoing(), **extra, REQUEST_ID: request_id, REPLY_TO: reply_to, MSG_ID: reply_to}
        if (size := message_size(data, headers)) > self.nc.max_payload:
            raise too_large(size, self.nc.max_payload, "job")
        first_try = True
        while True:
            if not self.nc.is_connected:
                raise not_connected("closed" if self.nc.is_closed else "reconnecting")
            wait = min(PUBLISH_TIMEOUT, deadline - REPLY_GRACE - loop.time())
            if wait <= 0:
                raise BusError(504, "JetStream did not confirm the durable job in time", name="timeout")
            try:
                ack = await self.js.publish(subject, data, timeout=wait, headers=headers)
            except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
                raise BusError(
                    503,
                    f"no JetStream stream takes {subject}: start a worker with --durable (it creates the job stream)",
                    name="no_responders",
                ) from None
            except nats.errors.MaxPayloadError:  # a server reconnected to since the check takes less
                raise too_large(size, self.nc.max_payload, "job") from None
            except nats.js.errors.APIError as exc:
                code = exc.code if isinstance(exc.code, int) and 400 <= exc.code < 600 else 503
                raise BusError(code, f"JetStream refused the durable job: {exc.description}") from None
            except nats.errors.TimeoutError:
                first_try = False
                await asyncio.sleep(PUBLISH_RETRY_DELAY)
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
                raise not_connected(type(exc).__name__) from None
            if ack.duplicate and first_try:
                raise BusError(
                    409,
                    f"JetStream already holds a job with request id {request_id!r} from this client",
                    name="duplicate_request",
                )
            return

    async def _send_cancel(self, request_id: str) -> None:
        with contextlib.suppress(nats.errors.Error):
            headers = {REPLY_TO: self.inbox.reply_subject(request_id)}
            await self.nc.publish(self.subjects.cancel(request_id), b"", headers=headers)

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
