"""`BusClient`: chat with the inference workers over NATS (request-reply, batches, streams, cancel, discovery).

Every failure is one exception type, `BusError(code, message, body)`, whose `code` follows HTTP:
503 no worker listens / a worker is overloaded / the NATS connection is down, 504 no answer in time,
413 too large, 400 bad input, and whatever code a worker put in its `Nats-Service-Error-Code` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from llmbus.config import Config
from llmbus.connection import connect
from schemas import SERVICE_NAME, BatchResponse, ChatChunk, ChatRequest, ChatResponse, ErrorBody, Subjects
from schemas.subjects import ERROR, ERROR_CODE, REQUEST_ID, STREAM, STREAM_END

T = TypeVar("T")

STATUS_HEADER = "Status"
NO_RESPONDERS_STATUS = "503"
DEFAULT_TIMEOUT = 120.0
REPLY_GRACE = 0.5  # extra wait past a request's own deadline, so the worker's 504 arrives rather than our guess
DISCOVERY_WINDOW = 0.5
DISCOVERY_SETTLE = 0.15
MAX_BACKOFF = 2.0


class BusError(Exception):
    """A chat that failed. `reason` says where: no_responders, timeout, worker, connection, too_large, bad_reply."""

    def __init__(self, code: int, message: str, body: bytes | None = None, *, reason: str = "worker") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.body = body
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """Overload, shutdown, no worker or a dropped connection: worth trying again later."""
        return self.code == 503

    def __repr__(self) -> str:
        return f"BusError(code={self.code}, message={self.message!r}, reason={self.reason!r})"


def new_request_id() -> str:
    """A unique id that is also a valid NATS subject token (for `llm.cancel.<id>`)."""
    return uuid.uuid4().hex


def error_from_reply(msg: Msg, subject: str) -> BusError | None:
    """The error a reply carries: a no-responders status from the server, or a worker's micro error headers."""
    headers = msg.headers or {}
    if headers.get(STATUS_HEADER) == NO_RESPONDERS_STATUS and not msg.data:
        return no_responders(subject)
    code_text = headers.get(ERROR_CODE)
    if code_text is None:
        return None
    try:
        code = int(code_text)
    except ValueError:
        code = 500
    message = headers.get(ERROR)
    if not message:
        body = _try_decode(msg.data, ErrorBody)
        message = body.error if body is not None else "worker error with no description"
    return BusError(code, message, msg.data or None, reason="worker")


def no_responders(subject: str) -> BusError:
    return BusError(503, f"no inference worker is listening on {subject}", reason="no_responders")


def no_reply(timeout: float) -> BusError:
    return BusError(504, f"no reply from a worker within {timeout:g}s", reason="timeout")


def decode_reply(data: bytes, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.DecodeError as exc:
        raise BusError(502, f"invalid reply from a worker: {exc}", data, reason="bad_reply") from None


def _try_decode(data: bytes, type_: type[T]) -> T | None:
    try:
        return msgspec.json.decode(data, type=type_) if data else None
    except msgspec.DecodeError:
        return None


def with_deadline(request: ChatRequest, timeout: float, stream: bool | None = None) -> ChatRequest:
    """The request as sent: its `timeout` no later than ours, so the worker knows when we give up."""
    limit = timeout if request.timeout is None else min(request.timeout, timeout)
    changes: dict[str, Any] = {"timeout": limit}
    if stream is not None:
        changes["stream"] = stream
    return msgspec.structs.replace(request, **changes)


class BusClient:
    """Chat with the `llm-inference` workers on a connected NATS client.

    `retries` retries a 503 (no worker, overload, shutting down) with exponential backoff from `backoff` seconds
    (at most 2 s, with jitter), always within the call's own timeout.
    Use `BusClient.connect(url)` to own the connection, and `close()` it.
    """

    def __init__(
        self,
        nc: Client,
        subjects: Subjects | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 0,
        backoff: float = 0.1,
        service_name: str = SERVICE_NAME,
        owns_connection: bool = False,
    ) -> None:
        self.nc = nc
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.service_name = service_name
        self._owns_connection = owns_connection
        self._background: set[asyncio.Task[None]] = set()
        self._live_streams: set[str] = set()

    @classmethod
    async def connect(
        cls,
        url: str = "nats://127.0.0.1:4222",
        *,
        subjects: Subjects | None = None,
        name: str = "llmbus-client",
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 0,
        backoff: float = 0.1,
        **nats_options: Any,
    ) -> BusClient:
        """Connect to NATS (`url` may list several servers, comma-separated) and own that connection."""
        servers = [part.strip() for part in url.split(",") if part.strip()]
        nc = await nats.connect(servers=servers, name=name, **nats_options)
        return cls(nc, subjects, timeout=timeout, retries=retries, backoff=backoff, owns_connection=True)

    @classmethod
    async def from_config(cls, config: Config, *, name: str = "llmbus-client", retries: int = 0) -> BusClient:
        """Connect with every connection setting of `config` (credentials, TLS, inbox prefix) and own the connection."""
        nc = await connect(config, name, reconnect_forever=False)
        subjects = Subjects(config.subject_prefix)
        return cls(nc, subjects, timeout=config.request_timeout, retries=retries, owns_connection=True)

    async def close(self) -> None:
        """Finish pending cancel messages, then close the connection if this client opened it."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_connection and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except nats.errors.Error:
                await self.nc.close()

    async def __aenter__(self) -> BusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    # request-reply

    async def chat(
        self, request: ChatRequest, timeout: float | None = None, *, retries: int | None = None
    ) -> ChatResponse:
        """One chat completion on `<prefix>.chat`."""
        timeout = self.timeout if timeout is None else timeout
        data = msgspec.json.encode(with_deadline(request, timeout, stream=False))
        reply = await self._request(self.subjects.chat, data, timeout, retries)
        return decode_reply(reply.data, ChatResponse)

    async def chat_batched(
        self, queries: Sequence[ChatRequest | msgspec.Raw], timeout: float | None = None, *, retries: int | None = None
    ) -> BatchResponse:
        """Many chats in one message on `<prefix>.chat.batched`; `responses` come back in input order.

        A `msgspec.Raw` query is sent as it is (the worker answers its error in place if it is invalid).
        A batch whose every query is invalid raises `BusError(400, ...)` whose `body` is the BatchResponse JSON.
        """
        timeout = self.timeout if timeout is None else timeout
        envelope = {"queries": [q if isinstance(q, msgspec.Raw) else with_deadline(q, timeout) for q in queries]}
        reply = await self._request(self.subjects.chat_batched, msgspec.json.encode(envelope), timeout, retries)
        return decode_reply(reply.data, BatchResponse)

    async def _request(self, subject: str, data: bytes, timeout: float, retries: int | None) -> Msg:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + REPLY_GRACE
        attempts = (self.retries if retries is None else retries) + 1
        for attempt in range(attempts):
            try:
                return await self._request_once(subject, data, timeout, deadline - loop.time())
            except BusError as exc:
                delay = self._backoff_delay(attempt)
                if not exc.retryable or attempt + 1 == attempts or loop.time() + delay >= deadline - REPLY_GRACE:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _request_once(self, subject: str, data: bytes, timeout: float, wait: float) -> Msg:
        self._check_connected()
        request_id = new_request_id()
        try:
            reply = await self.nc.request(subject, data, timeout=max(wait, 0.001), headers={REQUEST_ID: request_id})
        except nats.errors.NoRespondersError:
            raise no_responders(subject) from None
        except nats.errors.TimeoutError:
            self._spawn(self._send_cancel(request_id))
            raise no_reply(timeout) from None
        except asyncio.CancelledError:
            self._spawn(self._send_cancel(request_id))
            raise
        except nats.errors.MaxPayloadError:
            raise self._too_large(len(data)) from None
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise BusError(503, f"NATS connection is down: {type(exc).__name__}", reason="connection") from None
        error = error_from_reply(reply, subject)
        if error is not None:
            raise error
        return reply

    def _backoff_delay(self, attempt: int) -> float:
        return min(self.backoff * (2**attempt), MAX_BACKOFF) * random.uniform(0.8, 1.2)

    def _check_connected(self) -> None:
        if not self.nc.is_connected:
            state = "closed" if self.nc.is_closed else "reconnecting"
            raise BusError(503, f"not connected to NATS ({state}); try again shortly", reason="connection")

    def _too_large(self, size: int) -> BusError:
        limit = self.nc.max_payload
        return BusError(
            413, f"request of {size} bytes exceeds the NATS max payload of {limit} bytes", reason="too_large"
        )

    # streaming

    def stream(
        self, request: ChatRequest, timeout: float | None = None, *, retries: int | None = None
    ) -> AsyncGenerator[ChatChunk, None]:
        """Chunks of one streamed chat, the last with `done: true`.

        Stopping early (break, `aclose()`, the consuming task cancelled) cancels the generation on the worker.
        Wrap it in `contextlib.aclosing(...)` to make that immediate rather than left to garbage collection.
        """
        timeout = self.timeout if timeout is None else timeout
        return self._stream(with_deadline(request, timeout, stream=True), timeout, retries)

    async def _stream(
        self, request: ChatRequest, timeout: float, retries: int | None
    ) -> AsyncGenerator[ChatChunk, None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + REPLY_GRACE
        data = msgspec.json.encode(request)
        subject = self.subjects.chat
        attempts = (self.retries if retries is None else retries) + 1
        for attempt in range(attempts):
            request_id = new_request_id()
            sub: Subscription | None = None
            live = False  # a worker may hold the generation: cancel it if we leave early
            started = False
            try:
                self._check_connected()
                sub = await self.nc.subscribe(self.nc.new_inbox())
                try:
                    await self.nc.publish(subject, data, reply=sub.subject, headers={REQUEST_ID: request_id})
                except nats.errors.MaxPayloadError:
                    raise self._too_large(len(data)) from None
                live = True
                self._live_streams.add(request_id)
                while True:
                    msg = await self._next(sub, deadline - loop.time(), timeout)
                    error = error_from_reply(msg, subject)
                    if error is not None:
                        live = False
                        raise error
                    chunk = decode_reply(msg.data, ChatChunk)
                    end = chunk.done or (msg.headers or {}).get(STREAM) == STREAM_END
                    if end:
                        live = False
                    started = True
                    yield chunk
                    if end:
                        return
            except BusError as exc:
                delay = self._backoff_delay(attempt)
                retry = exc.retryable and not started and attempt + 1 < attempts
                if not retry or loop.time() + delay >= deadline - REPLY_GRACE:
                    raise
            finally:
                self._live_streams.discard(request_id)
                if sub is not None:
                    self._spawn(self._finish_stream(sub, request_id if live else None))
            await asyncio.sleep(delay)

    @staticmethod
    async def _next(sub: Subscription, wait: float, timeout: float) -> Msg:
        if wait <= 0:
            raise no_reply(timeout)
        try:
            return await sub.next_msg(timeout=wait)
        except nats.errors.TimeoutError:
            raise no_reply(timeout) from None
        except nats.errors.ConnectionClosedError:
            raise BusError(503, "NATS connection closed during the stream", reason="connection") from None

    async def _finish_stream(self, sub: Subscription, cancel_id: str | None) -> None:
        if cancel_id is not None:
            await self._send_cancel(cancel_id)
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()

    # cancel

    async def cancel(self, request_id: str) -> None:
        """Ask the worker holding `request_id` to stop it (within one decode step)."""
        self._check_connected()
        await self.nc.publish(self.subjects.cancel(request_id), b"")
        await self.nc.flush()

    async def cancel_streams(self) -> int:
        """Cancel every stream this client has open (a stopping bridge ends them this way); returns how many.

        Each ends promptly with its last chunk (`finish_reason: "cancelled"`)."""
        live = list(self._live_streams)
        for request_id in live:
            await self._send_cancel(request_id)
        return len(live)

    async def _send_cancel(self, request_id: str) -> None:
        with contextlib.suppress(nats.errors.Error, BusError):
            await self.cancel(request_id)

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run cleanup as its own task so that it completes even while the caller is being cancelled."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # discovery

    async def ping(self, timeout: float = DISCOVERY_WINDOW) -> list[dict[str, Any]]:
        """Every worker's `$SRV.PING` reply (name, id, version, metadata), gathered for at most `timeout` seconds."""
        return await self._gather(f"$SRV.PING.{self.service_name}", timeout)

    async def info(self, timeout: float = DISCOVERY_WINDOW) -> list[dict[str, Any]]:
        """Every worker's `$SRV.INFO` reply (adds description and endpoints)."""
        return await self._gather(f"$SRV.INFO.{self.service_name}", timeout)

    async def stats(self, timeout: float = DISCOVERY_WINDOW) -> list[dict[str, Any]]:
        """Every worker's `$SRV.STATS` reply; each endpoint's `data` holds the worker's engine counters."""
        return await self._gather(f"$SRV.STATS.{self.service_name}", timeout)

    async def models(self, timeout: float = DISCOVERY_WINDOW) -> list[str]:
        """The model names the workers serve, from their INFO `metadata.model`, sorted."""
        names = {reply.get("metadata", {}).get("model") for reply in await self.info(timeout)}
        return sorted(name for name in names if isinstance(name, str) and name)

    async def _gather(self, subject: str, timeout: float, settle: float = DISCOVERY_SETTLE) -> list[dict[str, Any]]:
        """Replies to one message, until `timeout` or `settle` seconds pass with no new reply."""
        self._check_connected()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        replies: dict[str, dict[str, Any]] = {}
        try:
            await self.nc.publish(subject, b"", reply=inbox)
            while (wait := deadline - loop.time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=min(wait, settle) if replies else wait)
                except nats.errors.TimeoutError:
                    break
                if (msg.headers or {}).get(STATUS_HEADER) == NO_RESPONDERS_STATUS:
                    break
                reply = _try_json_object(msg.data)
                if reply is not None:
                    replies[str(reply.get("id", len(replies)))] = reply
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return list(replies.values())


def _try_json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None
