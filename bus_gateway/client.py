"""`BusClient`: chat with the inference workers over NATS (request-reply, batches, streams, cancel, discovery).

Every failure is one exception type, `BusError(code, message, body)`, named after its row in the error table
(`schemas.errors`): `no_responders`/`overloaded`/`shutting_down`/`not_connected` (503), `timeout` (504),
`too_large` (413), `bad_request` and `context_length_exceeded` (400), and whatever a worker put in its error headers.

Every request gets the reply subject `<client inbox>.<request id>` (see `inbox.py`), so the client can name it in a
cancel: a worker cancels only when both the request id and the reply subject match.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_gateway.bus_errors import (
    BusError,
    decode_reply,
    error_from_reply,
    model_not_found,
    no_reply,
    not_connected,
    too_large,
)
from bus_gateway.discovery import Discovery
from bus_gateway.inbox import ReplyInbox, in_flight
from bus_gateway.streaming import Headers, Streaming
from llmbus import tracing
from llmbus.config import Config
from llmbus.connection import connect, flushed, open_connection, refused_plaintext, servers_want_tls
from llmbus.urls import servers_of
from schemas import (
    SERVICE_NAME,
    BatchResponse,
    ChatRequest,
    ChatResponse,
    Subjects,
)
from schemas.subjects import REPLY_TO, REQUEST_ID, message_size, valid_request_id

__all__ = ["BusClient", "BusError", "new_request_id", "with_deadline"]

DEFAULT_TIMEOUT = 120.0
REPLY_GRACE = 0.5  # extra wait past a request's own deadline, so the worker's 504 arrives rather than our guess
MAX_BACKOFF = 2.0


def new_request_id() -> str:
    """A unique id that is also a valid NATS subject token (for `llm.cancel.<id>`)."""
    return uuid.uuid4().hex


def with_deadline(request: ChatRequest, timeout: float) -> ChatRequest:
    """The request as sent: its `timeout` no later than ours, so the worker knows when we give up."""
    limit = timeout if request.timeout is None else min(request.timeout, timeout)
    return msgspec.structs.replace(request, timeout=limit)


class BusClient(Streaming, Discovery):
    """Chat with the `llm-inference` workers on a connected NATS client.

    `retries` retries the errors that mean "come back shortly" (no worker, overloaded, shutting down, not
    connected) with exponential backoff from `backoff` seconds (at most 2 s, with jitter), within the call's timeout.
    Use `BusClient.connect(url)` or `BusClient.from_config(config)` to own the connection, and `close()` it.
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
        self.inbox = ReplyInbox(nc)
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
        """Connect to NATS (`url` may list several servers, comma-separated) and own that connection. With a `tls`
        context or a `tls://` URL, a server that offers no TLS is refused before any credential is sent."""
        servers, on_error = servers_of(url), nats_options.pop("error_cb", None)
        secure = servers_want_tls(servers, nats_options.get("tls"))  # like llmbus.connection: never in plaintext
        nc = await open_connection(
            servers, name, secure=secure, fatal=refused_plaintext, on_error=on_error, **nats_options
        )
        return cls(nc, subjects, timeout=timeout, retries=retries, backoff=backoff, owns_connection=True)

    @classmethod
    async def from_config(cls, config: Config, *, name: str = "llmbus-client", retries: int = 0) -> BusClient:
        """Connect with every connection setting of `config` (credentials, TLS, inbox prefix) and own the connection."""
        nc = await connect(config, name, reconnect_forever=False)
        subjects = Subjects(config.subject_prefix)
        return cls(nc, subjects, timeout=config.request_timeout, retries=retries, owns_connection=True)

    async def close(self, *, drain: bool = True) -> None:
        """Finish pending cancel messages, then close the connection if this client opened it: drained (what is in
        flight is delivered first), or at once with `drain=False` (a reader such as `llmbus status` on Ctrl-C)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.inbox.stop()
        if self._owns_connection and not self.nc.is_closed and not drain:
            await self.nc.close()
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
        self,
        request: ChatRequest,
        timeout: float | None = None,
        *,
        retries: int | None = None,
        request_id: str | None = None,
        headers: Headers = None,
    ) -> ChatResponse:
        """One chat completion on `<prefix>.chat`."""
        timeout = self.timeout if timeout is None else timeout
        data = msgspec.json.encode(msgspec.structs.replace(with_deadline(request, timeout), stream=False))
        subject = self._chat_subject(request.model)
        try:
            reply = await self._request(subject, data, timeout, retries, request_id, headers)
        except BusError as exc:
            raise await self._unknown_model(exc, request.model) from None
        return decode_reply(reply.data, ChatResponse)

    async def chat_batched(
        self,
        queries: Sequence[ChatRequest | msgspec.Raw],
        timeout: float | None = None,
        *,
        retries: int | None = None,
        request_id: str | None = None,
        headers: Headers = None,
    ) -> BatchResponse:
        """Many chats in one message on `<prefix>.chat.batched`; `responses` come back in input order.

        A `msgspec.Raw` query is sent as it is (the worker answers its error in place if it is invalid).
        A batch whose every query is invalid raises `BusError(400, ...)` whose `body` is the BatchResponse JSON.
        """
        timeout = self.timeout if timeout is None else timeout
        envelope = {"queries": [q if isinstance(q, msgspec.Raw) else with_deadline(q, timeout) for q in queries]}
        data = msgspec.json.encode(envelope)
        reply = await self._request(self.subjects.chat_batched, data, timeout, retries, request_id, headers)
        return decode_reply(reply.data, BatchResponse)

    async def _request(
        self, subject: str, data: bytes, timeout: float, retries: int | None, request_id: str | None, headers: Headers
    ) -> Msg:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + REPLY_GRACE
        given = self._claim(request_id) if request_id is not None else None
        attempts = (self.retries if retries is None else retries) + 1
        for attempt in range(attempts):
            this_try = given or new_request_id()  # each attempt its own reply subject, unless the caller named one
            try:
                return await self._request_once(subject, data, deadline - loop.time(), timeout, this_try, headers)
            except BusError as exc:
                delay = self.backoff_delay(attempt)
                if not exc.come_back_later or attempt + 1 == attempts or loop.time() + delay >= deadline - REPLY_GRACE:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _request_once(
        self, subject: str, data: bytes, wait: float, timeout: float, request_id: str, headers: Headers
    ) -> Msg:
        self._check_connected()
        answers = await self.inbox.open(request_id)
        try:
            await self._publish(subject, data, request_id, headers)
            msg = await asyncio.wait_for(answers.get(), max(wait, 0.001))
        except TimeoutError:
            self._spawn(self._send_cancel(request_id))
            raise no_reply(timeout) from None
        except asyncio.CancelledError:
            self._spawn(self._send_cancel(request_id))
            raise
        finally:
            self.inbox.close(request_id)
        error = error_from_reply(msg, subject)
        if error is not None:
            raise error
        return msg

    async def _publish(self, subject: str, data: bytes, request_id: str, headers: Headers) -> None:
        reply = self.inbox.reply_subject(request_id)
        try:
            headers = {**tracing.outgoing(), **(headers or {}), REQUEST_ID: request_id}  # the caller's trace context
            if (size := message_size(data, headers)) > self.nc.max_payload:
                raise too_large(size, self.nc.max_payload)
            await self.nc.publish(subject, data, reply=reply, headers=headers)
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise not_connected(type(exc).__name__) from None

    async def _unknown_model(self, exc: BusError, model: str | None) -> BusError:
        """No worker on a model's subject: a 404 that lists the models on the bus, when that model is not among them
        (with none listed at all, it stays a 503: no worker is there yet)."""
        if exc.name != "no_responders" or not model:
            return exc
        served = await self.models()
        if not served or model in served:
            return exc
        return model_not_found(model, served)

    def _chat_subject(self, model: str | None) -> str:
        """A request that names its model goes straight to that model's workers (no forwarding hop)."""
        return self.subjects.model_chat(model) if model else self.subjects.chat

    def _claim(self, request_id: str | None) -> str:
        if request_id is None:
            return new_request_id()
        if not valid_request_id(request_id):
            raise BusError(400, f"invalid request id {request_id!r}: use 1-128 of A-Z a-z 0-9 _-", name="bad_request")
        if self.inbox.is_open(request_id):
            raise in_flight(request_id)
        return request_id

    def backoff_delay(self, attempt: int) -> float:
        return min(self.backoff * (2**attempt), MAX_BACKOFF) * random.uniform(0.8, 1.2)

    def _check_connected(self) -> None:
        if not self.nc.is_connected:
            raise not_connected("closed" if self.nc.is_closed else "reconnecting")

    # cancel

    async def cancel(self, request_id: str) -> None:
        """Ask the worker holding this client's request `request_id` to stop it (within one decode step)."""
        self._check_connected()
        headers = {REPLY_TO: self.inbox.reply_subject(request_id)}
        await self.nc.publish(self.subjects.cancel(request_id), b"", headers=headers)
        await flushed(self.nc)

    async def cancel_streams(self) -> int:
        """Cancel every stream this client has open (a stopping bridge ends them this way); returns how many."""
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
