"""A NATS micro service (ADR-32) whose statistics describe whole requests: our adapter over plain nats-py.

nats.py's `nats.micro` counts a request as done when its handler returns, and counts only exceptions as errors. An
llmbus handler only validates and enqueues (a generation takes seconds and runs in the engine thread), so there
`processing_time` would be microseconds and an error answer would not count. Here a `Request` is done when its
final answer is sent: `processing_time` runs to that answer, and every error answer counts in `num_errors`. The
service can also drain its endpoints (deliver what was already sent to it, then leave the queue group) and stop
answering `$SRV.PING` and `$SRV.INFO` while draining, so readiness checks and `/v1/models` leave it out; `$SRV.STATS`
keeps answering (its `data` says `draining`).

The discovery replies use nats.py's own wire types (`ServicePing`, `ServiceInfo`, `ServiceStats`), so `nats micro
ls/info/stats` read them as they read any NATS service.

A request is answered only on a reply subject under one of the service's reply prefixes (`ReplyGate`, default
`_INBOX.`); any other (`$JS.API.STREAM.DELETE.<stream>`, `llm.chat`...) is dropped unanswered. The server cannot
enforce this: a worker's `allow_responses` lets it publish to whatever reply subject a request names. A probe
(`schemas.subjects.PROBE`, sent by a peer's `forward_probe`) is no request: it is dropped, unanswered and uncounted.

An answer must fit the server's max payload, its headers counted: one that would not fit goes out as a 413 in its
place and ends the answer (on a stream, as its end message), a `$SRV` answer's too (`answer_size`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import EndpointInfo, EndpointStats, ServiceInfo, ServicePing, ServiceStats
from nats.nuid import NUID

from inference_worker.answer_size import DiscoveryAnswers, answer_too_large, publish_in_its_place
from inference_worker.reply_gate import ReplyGate
from schemas import WireError
from schemas.errors import clean_text, error_headers
from schemas.subjects import is_probe

log = logging.getLogger("llmbus.micro")

Handler = Callable[["Request"], Awaitable[None]]
StatsData = Callable[[], dict[str, Any]]

DISCOVERY = "$SRV"
VERBS = ("PING", "INFO", "STATS")


@dataclass(eq=False)
class Endpoint:
    name: str
    subject: str
    queue_group: str
    handler: Handler
    metadata: dict[str, str] = field(default_factory=dict)
    num_requests: int = 0
    num_errors: int = 0
    processing_ns: int = 0
    last_error: str = ""
    subscription: Subscription | None = None

    def record(self, elapsed_ns: int, error: WireError | None) -> None:
        self.processing_ns += elapsed_ns
        if error is not None:
            self.num_errors += 1
            self.last_error = clean_text(f"{error.code}:{error.message}", 256)  # STATS readers see it

    def stats(self, data: dict[str, Any] | None) -> EndpointStats:
        done = max(1, self.num_requests)
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group,
            num_requests=self.num_requests,
            num_errors=self.num_errors,
            processing_time=self.processing_ns,
            average_processing_time=self.processing_ns // done,
            last_error=self.last_error,
            data=data,
        )


class Request:
    """One request to an endpoint. Answer it with `respond` (several times for a stream: `final=False` until the
    last) or `respond_error`; the endpoint's statistics count it once its final answer is out."""

    def __init__(self, nc: NATS, msg: Msg, endpoint: Endpoint) -> None:
        self.nc = nc
        self.msg = msg
        self.endpoint = endpoint
        self.received_ns = time.monotonic_ns()
        self.done = False
        self.too_large: WireError | None = None  # the 413 published in place of a message over the max payload

    @property
    def subject(self) -> str:
        return self.msg.subject

    @property
    def data(self) -> bytes:
        return self.msg.data

    @property
    def headers(self) -> dict[str, str] | None:
        return self.msg.headers

    @property
    def reply(self) -> str:
        return self.msg.reply or ""

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None, *, final: bool = True) -> None:
        if not await self._fits(data, headers):
            return
        if final:
            self._finish(None)
        if self.reply:
            await self.nc.publish(self.reply, data, headers=headers)

    async def respond_error(self, error: WireError, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """An ADR-32 error answer: the sanitized error headers, plus `headers`. Always final."""
        headers = {**(headers or {}), **error_headers_of(error)}
        if not await self._fits(data, headers):
            return
        self._finish(error)
        if self.reply:
            await self.nc.publish(self.reply, data, headers=headers)

    async def _fits(self, data: bytes, headers: dict[str, str] | None) -> bool:
        """Whether this message may go out as it is: not after the 413 that ended the answer (`too_large`), nor when
        it would not fit the max payload; then that 413 goes in its place as the final answer (`answer_size`)."""
        if self.too_large is None and self.reply and (error := answer_too_large(self.nc, data, headers)) is not None:
            log.warning("the answer to a request on %s: %s; answering 413", self.subject, error.message)
            self._finish(error)
            await publish_in_its_place(self.nc, self.reply, error, headers)
            self.too_large = error
        return self.too_large is None

    async def forward(self, subject: str) -> None:
        """Hand this request to the service on `subject`, which answers the original reply subject directly."""
        self._finish(None)
        await self.nc.publish(subject, self.data, reply=self.reply, headers=self.headers)

    def _finish(self, error: WireError | None) -> None:
        if not self.done:
            self.done = True
            self.endpoint.record(time.monotonic_ns() - self.received_ns, error)


def error_headers_of(error: WireError) -> dict[str, str]:
    return error_headers(error.code, error.message, error.name or None)


class MicroService:
    """Identity, endpoints and the `$SRV` discovery subjects of one service instance."""

    def __init__(
        self,
        nc: NATS,
        name: str,
        version: str,
        description: str,
        metadata: dict[str, str],
        stats_data: StatsData,
        reply_prefixes: tuple[str, ...],
    ) -> None:
        self.nc = nc
        self.name = name
        self.version = version
        self.description = description
        self.metadata = metadata
        self.stats_data = stats_data
        self.id = NUID().next().decode()
        self.started = datetime.now(UTC).replace(tzinfo=None)
        self.endpoints: list[Endpoint] = []
        self.replies = ReplyGate(reply_prefixes)
        self._discovery: dict[str, list[Subscription]] = {verb: [] for verb in VERBS}
        self.answers = DiscoveryAnswers(nc)  # within the max payload, else a 413

    async def start(self) -> None:
        replies = {"PING": self._ping, "INFO": self._info, "STATS": self._stats}
        for verb, build in replies.items():
            for subject in (
                f"{DISCOVERY}.{verb}",
                f"{DISCOVERY}.{verb}.{self.name}",
                f"{DISCOVERY}.{verb}.{self.name}.{self.id}",
            ):
                self._discovery[verb].append(await self.nc.subscribe(subject, cb=self._answer_with(verb, build)))

    async def add_endpoint(
        self, name: str, subject: str, queue_group: str, handler: Handler, metadata: dict[str, str] | None = None
    ) -> Endpoint:
        endpoint = Endpoint(name, subject, queue_group, handler, metadata or {})

        async def on_msg(msg: Msg) -> None:
            if is_probe(msg.headers):
                log.debug("dropped a probe on %s", msg.subject)  # not a request: unanswered, uncounted
                return
            endpoint.num_requests += 1
            request = Request(self.nc, msg, endpoint)
            if msg.reply and not self.replies.allows(msg.reply, f"a request on {msg.subject}"):
                request._finish(WireError.of("forbidden", "reply subject not under a reply prefix: dropped"))
                return
            try:
                await handler(request)
            except Exception as exc:  # as nats.py's micro does: a bug in a handler is a 500 answer, not a hang
                log.exception("handler of %s failed", endpoint.name)
                if not request.done:
                    with contextlib.suppress(Exception):
                        await request.respond_error(WireError.of("internal", f"internal error: {exc!r}"))

        endpoint.subscription = await self.nc.subscribe(subject, queue=queue_group, cb=on_msg)
        self.endpoints.append(endpoint)
        return endpoint

    async def leave_discovery(self, verbs: tuple[str, ...] = ("PING", "INFO")) -> None:
        """Stop answering these discovery verbs (a draining instance is no longer offered to new clients)."""
        for verb in verbs:
            for sub in self._discovery[verb]:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            self._discovery[verb] = []

    async def drain_endpoints(self) -> None:
        """Leave every endpoint's queue group; requests already delivered to this instance still reach handlers."""
        for endpoint in self.endpoints:
            if endpoint.subscription is not None:
                with contextlib.suppress(nats.errors.Error):
                    await endpoint.subscription.drain()
                endpoint.subscription = None

    async def stop(self) -> None:
        for endpoint in self.endpoints:
            if endpoint.subscription is not None:
                with contextlib.suppress(nats.errors.Error):
                    await endpoint.subscription.unsubscribe()
                endpoint.subscription = None
        await self.leave_discovery(VERBS)

    def _ping(self) -> dict[str, Any]:
        return ServicePing(id=self.id, name=self.name, version=self.version, metadata=self.metadata).to_dict()

    def _info(self) -> dict[str, Any]:
        endpoints = [EndpointInfo(e.name, e.subject, e.queue_group, e.metadata) for e in self.endpoints]
        return ServiceInfo(
            name=self.name,
            id=self.id,
            version=self.version,
            description=self.description,
            endpoints=endpoints,
            metadata=self.metadata,
        ).to_dict()

    def _stats(self) -> dict[str, Any]:
        data = self.stats_data()
        return ServiceStats(
            id=self.id,
            name=self.name,
            version=self.version,
            started=self.started,
            endpoints=[e.stats(data) for e in self.endpoints],
            metadata=self.metadata,
        ).to_dict()

    def _answer_with(self, verb: str, build: Callable[[], dict[str, Any]]) -> Callable[[Msg], Awaitable[None]]:
        async def answer(msg: Msg) -> None:
            if msg.reply and self.replies.allows(msg.reply, f"a request on {msg.subject}"):
                with contextlib.suppress(nats.errors.Error):
                    await self.answers.publish(verb, msg.reply, json.dumps(build()).encode())

        return answer
