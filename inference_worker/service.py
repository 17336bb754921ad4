"""The worker on the bus: a NATS micro service (`llm-inference`) whose handlers validate, enqueue and return.

Handlers never wait for generation (nats.py runs one handler at a time per subscription); they hand a
`Sequence` to the engine thread and go on. The engine's events come back through one asyncio queue and
one dispatcher task publishes them, in order, to each request's reply inbox.

With `durable`, the worker also pulls jobs from the JetStream work queue (inference_worker.durable). A job goes
through the same handlers as a micro request: both are a `Replier`, something with a body that can be answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import nats
import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro import Request, ServiceConfig, add_service
from nats.micro.service import EndpointStats, Service

from inference_worker.durable import Job, JobConsumer, JobLimits
from inference_worker.engine import EngineConfig, EngineThread, Event, Failed, Finished, LLMEngine, TokenDelta
from inference_worker.hardware import pick_threads
from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence
from llmbus import __version__
from llmbus.config import Config
from schemas import (
    SERVICE_NAME,
    BatchItemError,
    BatchResponse,
    BatchResult,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ErrorBody,
    Subjects,
    Usage,
    WireError,
    content_type,
    conversation,
    decode_batch,
    decode_chat_request,
    encode,
    stop_strings,
)
from schemas.subjects import CONTENT_TYPE, JSON, MSGPACK, REQUEST_ID, STREAM, STREAM_CHUNK, STREAM_END, valid_request_id

log = logging.getLogger("llmbus.worker")

T = TypeVar("T")


class Replier(Protocol):
    """A request and where its answers go: a micro `Request` (core request-reply) or a durable `Job`."""

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> dict[str, str] | None: ...

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None) -> None: ...

    async def respond_error(
        self, code: str, description: str, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> None: ...


@dataclass(eq=False)
class BatchCollector:
    replier: Replier
    batch_id: str
    kind: str
    results: list[BatchResult | None]
    remaining: int = 0


@dataclass(eq=False)
class Pending:
    """A request the engine holds, and where its answer goes."""

    replier: Replier
    kind: str
    chat_id: str
    stream: bool = False
    chunks_sent: int = 0
    batch: BatchCollector | None = None
    batch_index: int = 0
    received: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, config: Config, nc: NATS, loaded: LoadedModel) -> None:
        self.config = config
        self.nc = nc
        self.loaded = loaded
        self.subjects = Subjects(config.subject_prefix)
        self.engine_config = EngineConfig(
            max_batch_size=config.max_batch_size,
            prefill_budget=config.prefill_chunk_tokens,
            max_seq_len=config.max_seq_len,
            max_wait_ms=config.max_wait_ms,
            prefix_cache=config.prefix_cache_tokens > 0,
            prefix_cache_tokens=config.prefix_cache_tokens,
            kv_cache_tokens=config.kv_cache_tokens,
            compile=config.compile,
            quantize=config.quantize,
        )
        self.engine: LLMEngine | None = None
        self.pending: dict[str, Pending] = {}
        self.batch_ids: set[str] = set()
        self.draining = False
        self.accepting = True
        self.jobs: JobConsumer | None = None
        self.errors_by_code: dict[str, int] = {}
        self._events: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slot_freed = asyncio.Event()
        self._thread: EngineThread | None = None
        self._dispatcher: asyncio.Task | None = None
        self._service: Service | None = None
        self._cancel_sub = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = EngineThread(
            lambda: LLMEngine(self.loaded, self.engine_config),
            lambda events: loop.call_soon_threadsafe(self._events.put_nowait, events),
        )
        self.engine = await asyncio.to_thread(self._thread.start)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="llmbus-dispatch")
        self._service = await add_service(
            self.nc,
            ServiceConfig(
                name=SERVICE_NAME,
                version=__version__,
                description="LLM chat inference (continuous batching)",
                metadata=self.metadata(),
                queue_group=self.config.queue_group,
                stats_handler=self._stats,
            ),
        )
        group = self._service.add_group(name=self.config.subject_prefix, queue_group=self.config.queue_group)
        await group.add_endpoint(name="chat", subject="chat", handler=self._handle_chat)
        await group.add_endpoint(name="chat_batched", subject="chat.batched", handler=self._handle_batch)
        self._cancel_sub = await self.nc.subscribe(self.subjects.cancel_all, cb=self._handle_cancel)
        if self.config.durable:
            self.jobs = JobConsumer(self.nc, self, JobLimits.from_config(self.config))
            await self.jobs.start()

    def metadata(self) -> dict[str, str]:
        return {
            "model": self.loaded.name,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "max_batch_size": str(self.config.max_batch_size),
            "max_tokens_cap": str(self.config.max_tokens_cap),
            "context_window": str(self.engine.max_seq_len),
            "durable": str(self.config.durable).lower(),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
        }

    def _stats(self, endpoint: EndpointStats) -> dict:
        stats = {**self.engine.snapshot(), "pending": len(self.pending), "errors_by_code": dict(self.errors_by_code)}
        if self.jobs is not None:
            stats["jobs"] = self.jobs.snapshot()
        return stats

    async def drain(self, timeout: float) -> None:
        """Stop taking requests (the queue group sends new ones elsewhere), finish those held, then stop.

        Requests already delivered to this worker before it unsubscribed are served, not refused.
        """
        self.draining = True
        if self.jobs is not None:
            await self.jobs.stop_pulling()
        if self._service is not None:
            for endpoint in self._service._endpoints:  # nats.py's Endpoint._stop unsubscribes and drops
                if endpoint._subscription is not None:  # buffered requests; draining answers them instead
                    await endpoint._subscription.drain()
                    endpoint._subscription = None
            self._service._endpoints = []
        self.accepting = False
        log.info("draining: unsubscribed; finishing %d held requests", len(self.pending))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("drain timed out with %d requests in flight; failing them", len(self.pending))
        await self.close()
        log.info("drained")

    async def close(self) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._thread.stop, 10)
            self._thread = None
        self.accepting = False
        leftovers = [Failed(rid, 503, "worker stopped before finishing this request") for rid in self.pending]
        if leftovers:  # a durable job among them goes back to the queue for another worker
            await self._on_events(leftovers)
        if self.jobs is not None:
            await self.jobs.close()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        if self._service is not None:
            await self._service.stop()
        if self._cancel_sub is not None:
            await self._cancel_sub.unsubscribe()

    # --- requests in -------------------------------------------------------------------------------------

    async def _handle_chat(self, req: Replier) -> None:
        if _unanswerable(req):
            return
        kind = content_type(req.headers)
        request = decode_chat_request(req.data, kind)
        if isinstance(request, WireError):
            return await self._reply_error(req, kind, request)
        if request.stream and isinstance(req, Job):
            error = WireError(400, "`stream` is not available for durable jobs; use core request-reply to stream")
            return await self._reply_error(req, kind, error)
        request_id = self._request_id(req)
        if isinstance(request_id, WireError):
            return await self._reply_error(req, kind, request_id, stream=request.stream)
        if refusal := self._refusal(1):
            return await self._reply_error(req, kind, refusal, stream=request.stream, request_id=request_id)
        seq = self._sequence(request_id, request, _age(req))
        if isinstance(seq, WireError):
            return await self._reply_error(req, kind, seq, stream=request.stream, request_id=request_id)
        self._hold(request_id, Pending(req, kind, request.chat_id, stream=request.stream), seq)

    async def _handle_batch(self, req: Replier) -> None:
        if _unanswerable(req):
            return
        kind = content_type(req.headers)
        items = decode_batch(req.data, kind)
        if isinstance(items, WireError):
            return await self._reply_error(req, kind, items)
        if len(items) > self.config.max_batch_queries:
            error = WireError(
                413, f"batch has {len(items)} queries; the limit is {self.config.max_batch_queries} (max_batch_queries)"
            )
            return await self._reply_error(req, kind, error)
        batch_id = self._request_id(req)
        if isinstance(batch_id, WireError):
            return await self._reply_error(req, kind, batch_id)
        results: list[BatchResult | None] = [None] * len(items)
        accepted: list[tuple[int, ChatRequest, Sequence]] = []
        for index, item in enumerate(items):
            if isinstance(item, ChatRequest) and item.stream:
                item = BatchItemError(chat_id=item.chat_id, error="`stream` is not supported in a batch", code=400)
            seq = self._sequence(f"{batch_id}.{index}", item, _age(req)) if isinstance(item, ChatRequest) else item
            if isinstance(seq, WireError):
                item = BatchItemError(chat_id=item.chat_id, error=seq.message, code=seq.code)
            if isinstance(item, BatchItemError):
                results[index] = BatchResult.failed(item)
            else:
                accepted.append((index, item, seq))
        if accepted and (refusal := self._refusal(len(accepted))):
            return await self._reply_error(req, kind, refusal)
        collector = BatchCollector(req, batch_id, kind, results, remaining=len(accepted))
        if not accepted:
            return await self._finish_batch(collector)
        self.batch_ids.add(batch_id)
        for index, item, seq in accepted:
            self._hold(seq.request_id, Pending(req, kind, item.chat_id, batch=collector, batch_index=index), seq)

    async def _handle_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        targets = [rid for rid in self.pending if rid == request_id or rid.startswith(request_id + ".")]
        for rid in targets:
            self._thread.cancel(rid)

    async def run_job(self, job: Job) -> None:
        """A durable job enters through the same handlers as a micro request on the matching core subject."""
        jobs_chat = self.subjects.jobs_chat
        handler = {jobs_chat: self._handle_chat, f"{jobs_chat}.batched": self._handle_batch}.get(job.subject)
        try:
            if handler is None:
                return await self._reply_error(job, JSON, WireError(404, f"no durable job handler for {job.subject}"))
            await handler(job)
        except Exception as exc:  # as nats.py's micro does for a handler: a 500 answer (here: a redelivery)
            log.exception("durable job %s failed", job.request_id)
            await self._reply_error(job, JSON, WireError(500, f"internal error: {exc!r}"))

    def free_slots(self) -> int:
        """How many more durable jobs to pull: what the engine can run now, within max_pending."""
        held = len(self.pending)
        if not self.accepting:
            return 0
        return max(0, min(self.config.max_batch_size - held, self.config.max_pending - held))

    async def wait_for_free_slot(self) -> None:
        while self.free_slots() <= 0:  # check and clear together, so a slot freed meanwhile is not missed
            self._slot_freed.clear()
            await self._slot_freed.wait()

    def _request_id(self, req: Replier) -> str | WireError:
        given = req.request_id if isinstance(req, Job) else (req.headers or {}).get(REQUEST_ID)
        if given is None:
            return uuid.uuid4().hex
        if not valid_request_id(given):
            return WireError(400, f"invalid {REQUEST_ID} header: use 1-128 characters from A-Z a-z 0-9 _ -")
        if given in self.pending or given in self.batch_ids:
            return WireError(400, f"request id {given!r} is already in flight on this worker")
        return given

    def _refusal(self, count: int) -> WireError | None:
        if not self.accepting:
            return WireError(503, "worker is shutting down; retry and another worker will answer")
        if len(self.pending) + count > self.config.max_pending:
            return WireError(
                503,
                f"worker overloaded: {len(self.pending)} requests held, limit {self.config.max_pending}"
                " (max_pending); retry later",
            )
        return None

    def _sequence(self, request_id: str, request: ChatRequest, age: float = 0.0) -> Sequence | WireError:
        max_tokens = request.max_tokens or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_cap:
            return WireError(
                400,
                f"max_tokens {max_tokens} exceeds this worker's limit of {self.config.max_tokens_cap} (max_tokens_cap)",
            )
        params = SamplingParams(
            max_tokens, request.temperature, request.top_p, request.top_k, request.seed, stop_strings(request)
        )
        prompt_ids, prefix_len = self.loaded.encode_chat_with_prefix(conversation(request))
        deadline = time.monotonic() + request.timeout - age if request.timeout else None
        return Sequence(request_id, prompt_ids, params, stream=request.stream, deadline=deadline, prefix_len=prefix_len)

    def _hold(self, request_id: str, pending: Pending, seq: Sequence) -> None:
        self.pending[request_id] = pending
        self._idle.clear()
        self._thread.submit(seq)

    # --- answers out ---------------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            events = await self._events.get()
            try:
                await self._on_events(events)
            except Exception:
                log.exception("failed to publish engine events")

    async def _on_events(self, events: list[Event]) -> None:
        for event in events:
            try:
                await self._on_event(event)
            except Exception:  # one answer that cannot be published must not strand the others
                log.exception("failed to publish the answer to %s", event.request_id)
        if not self.pending:
            self._idle.set()

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, TokenDelta):
            return await self._send_delta(event)
        pending = self.pending.pop(event.request_id, None)
        if pending is None:
            return
        self._slot_freed.set()
        if pending.batch is not None:
            await self._batch_item_done(pending, event)
        elif isinstance(event, Failed):
            await self._reply_error(
                pending.replier,
                pending.kind,
                WireError(event.code, event.message),
                stream=pending.stream,
                request_id=event.request_id,
            )
        elif pending.stream:
            await self._send_last_chunk(pending, event)
        else:
            response = self._response(pending.chat_id, event)
            await pending.replier.respond(encode(response, pending.kind), headers=_headers(pending.kind))

    def _response(self, chat_id: str, event: Finished) -> ChatResponse:
        return ChatResponse(
            chat_id=chat_id,
            response=event.text,
            finish_reason=event.finish_reason,
            usage=_usage(event),
            model=self.loaded.name,
        )

    async def _send_delta(self, event: TokenDelta) -> None:
        pending = self.pending.get(event.request_id)
        if pending is None or not pending.stream:
            return
        chunk = ChatChunk(chat_id=pending.chat_id, delta=event.text, index=pending.chunks_sent)
        pending.chunks_sent += 1
        await pending.replier.respond(
            encode(chunk, pending.kind),
            headers=_headers(pending.kind, {STREAM: STREAM_CHUNK, REQUEST_ID: event.request_id}),
        )

    async def _send_last_chunk(self, pending: Pending, event: Finished) -> None:
        chunk = ChatChunk(
            chat_id=pending.chat_id,
            delta="",
            index=pending.chunks_sent,
            done=True,
            finish_reason=event.finish_reason,
            usage=_usage(event),
            model=self.loaded.name,
        )
        await pending.replier.respond(
            encode(chunk, pending.kind),
            headers=_headers(pending.kind, {STREAM: STREAM_END, REQUEST_ID: event.request_id}),
        )

    async def _batch_item_done(self, pending: Pending, event: Finished | Failed) -> None:
        batch = pending.batch
        if isinstance(event, Failed):
            result = BatchResult.failed(BatchItemError(chat_id=pending.chat_id, error=event.message, code=event.code))
        else:
            result = BatchResult.ok(self._response(pending.chat_id, event))
        batch.results[pending.batch_index] = result
        batch.remaining -= 1
        if batch.remaining == 0:
            await self._finish_batch(batch)

    async def _finish_batch(self, batch: BatchCollector) -> None:
        self.batch_ids.discard(batch.batch_id)
        results = [r for r in batch.results if r is not None]
        failed = sum(r.error is not None for r in results)
        if failed == len(results):
            body = BatchResponse(responses=results, message=f"all {failed} queries failed")
            await batch.replier.respond_error(
                str(_batch_code(results)), body.message, encode(body, batch.kind), headers=_headers(batch.kind)
            )
            self._count_error(_batch_code(results))
            return
        body = BatchResponse(responses=results)
        if failed:
            body.partial_success = True
            body.message = f"{failed} of {len(results)} queries failed; the others were answered"
        await batch.replier.respond(encode(body, batch.kind), headers=_headers(batch.kind))

    async def _reply_error(
        self, req: Replier, kind: str, error: WireError, stream: bool = False, request_id: str | None = None
    ) -> None:
        """An error answer; on a stream it is also the last message (`Llmbus-Stream: end`, with the request id)."""
        self._count_error(error.code)
        extra = {STREAM: STREAM_END} if stream else {}
        if stream and request_id is not None:
            extra[REQUEST_ID] = request_id
        await req.respond_error(
            str(error.code),
            error.message,
            encode(ErrorBody(error.message, error.code), kind),
            headers=_headers(kind, extra),
        )

    def _count_error(self, code: int) -> None:
        self.errors_by_code[str(code)] = self.errors_by_code.get(str(code), 0) + 1


def _unanswerable(req: Replier) -> bool:
    """A core request published without a reply subject: nobody would read the answer, so do no work for it."""
    return isinstance(req, Request) and not req._msg.reply


def _age(req: Replier) -> float:
    """Seconds the request waited before this worker saw it: a durable job's `timeout` runs from its publication."""
    return req.age if isinstance(req, Job) else 0.0


def _usage(event: Finished) -> Usage:
    return Usage(event.prompt_tokens, event.completion_tokens, event.prompt_tokens + event.completion_tokens)


def _batch_code(results: list[BatchResult]) -> int:
    codes = {r.code for r in results}
    return codes.pop() if len(codes) == 1 else 400


def _headers(kind: str, extra: dict[str, str] | None = None) -> dict[str, str] | None:
    headers = dict(extra or {})
    if kind == MSGPACK:
        headers[CONTENT_TYPE] = MSGPACK
    return headers or None


async def connect(config: Config, name: str) -> NATS:
    """A NATS connection that reconnects forever, so a restarted server or a dropped link heals by itself.

    Subscriptions (the service endpoints, the job consumer's inbox) are restored by nats.py on reconnect;
    answers published while disconnected wait in its reconnect buffer. Connection trouble is logged in one line.
    """

    async def on_error(exc: Exception) -> None:
        log.warning("NATS connection: %r", exc)

    async def on_disconnected() -> None:
        if not nc.is_closed:  # closing on purpose calls this too
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnected() -> None:
        log.warning("reconnected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")

    nc = await nats.connect(
        servers=[u.strip() for u in config.nats_url.split(",") if u.strip()],
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        ping_interval=10,
        max_outstanding_pings=3,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    return nc


async def run_worker(
    config: Config, stop: asyncio.Event, ready: asyncio.Event | None = None, loaded: LoadedModel | None = None
) -> None:
    """Serve until `stop` is set, then drain: finish what this worker holds, answer it, and return."""
    torch.set_num_threads(pick_threads(config.threads))
    if loaded is None:
        loaded = await asyncio.to_thread(load_model, config.model, config.device, config.dtype)
    nc = await connect(config, name="llmbus-worker")
    worker = Worker(config, nc, loaded)
    try:
        await worker.start()
        await nc.flush()  # the server knows our subscriptions before anyone is told we are ready
        log.info("worker serving %s on %s (%s, %s)", loaded.name, nc.connected_url.netloc, loaded.device, loaded.dtype)
        if ready is not None:
            ready.set()
        await stop.wait()
        await worker.drain(config.drain_timeout)
    finally:
        if not worker.draining:
            await worker.close()
        await nc.drain()
