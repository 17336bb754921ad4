"""The worker on the bus: a micro service (`llm-inference`) whose handlers validate, hold and enqueue, then return.

The asyncio side and the engine thread meet at one queue each way: handlers hand the engine a closure that
templates and tokenizes the request in the engine thread (`requests.prepare`), and the engine's events come back
through one asyncio queue that one dispatcher task turns into messages (`replies`) and publishes, in order.
Batches are scattered over the queue group and gathered (`batches`). Durable jobs (`durable`) enter through the same
handlers as micro requests: both are a `Replier`. When the engine thread dies, the watchdog (`_engine_died`) fails
what it held, leaves the queue group, and makes `run_worker` raise, so the process exits non-zero and a supervisor
restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable

import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus_gateway.client import BusClient
from inference_worker import replies
from inference_worker.batches import BatchCoordinator, Headers
from inference_worker.durable import Job, JobLimits
from inference_worker.engine import (
    EngineConfig,
    EngineThread,
    Failed,
    LLMEngine,
)
from inference_worker.hardware import pick_threads
from inference_worker.held import Held, HeldRequests, Key, Replier
from inference_worker.job_consumer import JobConsumer, ServerClock, jobs_to_fetch
from inference_worker.micro import MicroService
from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.outbox import Outbox
from inference_worker.requests import (
    Limits,
    check_max_tokens,
    deadline_of,
    parse_batch,
    parse_chat,
    prepare,
    request_id_of,
)
from inference_worker.sequence import Sequence
from inference_worker.thread_share import share_threads
from llmbus import __version__
from llmbus.config import Config
from llmbus.connection import connect, connected_to
from schemas import SERVICE_NAME, Batch, ChatRequest, Subjects, WireError, content_type
from schemas.subjects import JSON, PROPAGATED_HEADERS, REPLY_TO

log = logging.getLogger("llmbus.worker")


class EngineDied(RuntimeError):
    """The engine thread stopped on an error it could not recover from; the worker left the bus."""


class Worker:
    def __init__(
        self, config: Config, nc: NATS, loaded: LoadedModel, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.wall_clock = wall_clock  # this host's clock; durable deadlines correct it to the server's
        self.nc = nc
        self.loaded = loaded
        self.subjects = Subjects(config.subject_prefix)
        self.engine_config = EngineConfig(
            max_batch_size=config.max_batch_size,
            prefill_budget=config.prefill_chunk_tokens,
            max_seq_len=config.max_seq_len,
            max_wait_ms=config.max_wait_ms,
        )
        self.limits = Limits(config.max_tokens_cap, config.max_batch_queries, config.max_seq_len)
        self.held = HeldRequests()
        self.batches: dict[Key, asyncio.Task[None]] = {}
        self.coordinator = BatchCoordinator(BusClient(nc, self.subjects), config.request_timeout)
        self.accepting = True
        self.draining = False
        self.threads = pick_threads(config.threads)
        self.dead: BaseException | None = None
        self.died = asyncio.Event()
        self.jobs: JobConsumer | None = None
        self.service: MicroService | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._capacity = asyncio.Event()
        self._thread: EngineThread | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cancel_sub = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.outbox = Outbox(self.held, self.loaded.name, self._released)
        self._thread = EngineThread(
            self._build_engine,
            self.outbox.put,
            on_death=lambda exc: loop.call_soon_threadsafe(self._engine_died, exc),
        )
        engine = await asyncio.to_thread(self._thread.start)
        self.engine = engine
        self.limits = Limits(self.config.max_tokens_cap, self.config.max_batch_queries, engine.max_seq_len)
        self._tasks.append(asyncio.create_task(self.outbox.run(), name="llmbus-outbox"))
        self.service = MicroService(
            self.nc, SERVICE_NAME, __version__, "LLM chat inference (continuous batching)", self.metadata(), self.stats
        )
        await self.service.start()
        group = self.config.queue_group
        await self.service.add_endpoint("chat", self.subjects.chat, group, self._handle_chat)
        await self.service.add_endpoint("chat_batched", self.subjects.chat_batched, group, self._handle_batch)
        self._cancel_sub = await self.nc.subscribe(self.subjects.cancel_all, cb=self._handle_cancel)
        if self.config.durable:
            reply_prefixes = tuple(self.config.durable_reply_prefixes)
            clock = ServerClock(self.wall_clock)
            self.jobs = JobConsumer(self.nc, self, JobLimits.from_config(self.config), reply_prefixes, clock)
            await self.jobs.start()
        if self.config.threads == 0:
            ping = self.coordinator.client.ping
            self._tasks.append(asyncio.create_task(share_threads(ping, self._set_threads)))

    def _build_engine(self) -> LLMEngine:
        """Runs in the engine thread, so that every torch op of the engine (its caches too) runs in one thread."""
        return LLMEngine(self.loaded, self.engine_config)

    def _set_threads(self, threads: int) -> None:
        self.threads = threads
        self._thread.set_threads(threads)

    def metadata(self) -> dict[str, str]:
        return {
            "model": self.loaded.name,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "max_batch_size": str(self.config.max_batch_size),
            "max_tokens_cap": str(self.config.max_tokens_cap),
            "context_window": str(self.limits.context_window),
            "durable": str(self.config.durable).lower(),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
        }

    def stats(self) -> dict:
        figures = {
            **self.engine.snapshot(),
            "pending": len(self.held),
            "batches": len(self.batches),
            "draining": self.draining,
            "threads": self.threads,
            "errors_by_code": dict(self.outbox.errors_by_code),
        }
        if self.jobs is not None:
            figures["jobs"] = self.jobs.snapshot()
        return figures

    # --- requests in -------------------------------------------------------------------------------------

    async def _handle_chat(self, req: Replier) -> None:
        if not req.reply:
            return  # published without a reply subject: nobody would read the answer
        kind = content_type(req.headers)
        durable = isinstance(req, Job)
        request = parse_chat(req.data, kind, durable=durable)
        if isinstance(request, WireError):
            return await self.outbox.send(req, replies.error(kind, request))
        request_id = req.request_id if durable else request_id_of(req.headers)
        if isinstance(request_id, WireError):
            return await self.outbox.send(req, replies.error(kind, request_id, stream=request.stream))
        held = Held(req, (req.reply, request_id), self.held.new_engine_id(), kind, request.chat_id, request.stream)
        if self.held.was_cancelled(held.key):
            return await self.outbox.send(req, replies.cancelled_before_start(held, self.loaded.name))
        refusal = self._refusal(held.key, 1, check_load=not durable) or check_max_tokens(request, self.limits)
        if refusal is not None:
            return await self.outbox.send(
                req, replies.error(kind, refusal, stream=request.stream, request_id=request_id)
            )
        deadline = deadline_of(request, req.age if durable else 0.0)
        self.held.hold(held)
        self._idle.clear()
        self._thread.submit(functools.partial(self._prepare, held.engine_id, request, deadline), held.engine_id)

    def _prepare(self, engine_id: str, request: ChatRequest, deadline: float | None) -> Sequence | Failed:
        """Runs in the engine thread: template and tokenize (a failure here fails this request only)."""
        try:
            return prepare(engine_id, request, self.loaded.encode_chat_with_prefix, self.limits, deadline)
        except Exception as exc:
            log.exception("preparing request %s failed", engine_id)
            return Failed(engine_id, 500, f"internal error while preparing the request: {exc!r}", name="internal")

    async def _handle_batch(self, req: Replier) -> None:
        if not req.reply:
            return
        kind = content_type(req.headers)
        batch = parse_batch(req.data, kind, self.limits)
        if isinstance(batch, WireError):
            return await self.outbox.send(req, replies.error(kind, batch))
        batch_id = req.request_id if isinstance(req, Job) else request_id_of(req.headers)
        if isinstance(batch_id, WireError):
            return await self.outbox.send(req, replies.error(kind, batch_id))
        key = (req.reply, batch_id)
        if self.held.was_cancelled(key):
            return await self.outbox.send(
                req, replies.error(kind, WireError.of("cancelled", "batch cancelled before it ran"))
            )
        if (refusal := self._refusal(key, 0, check_load=False)) is not None:
            return await self.outbox.send(req, replies.error(kind, refusal, stream=batch.stream, request_id=batch_id))
        headers = {k: v for k, v in (req.headers or {}).items() if k in PROPAGATED_HEADERS}
        self._idle.clear()
        task = asyncio.create_task(self._run_batch(req, kind, batch, batch_id, headers))
        self.batches[key] = task
        task.add_done_callback(lambda _: self._batch_done(key))

    async def _run_batch(self, req: Replier, kind: str, batch: Batch, batch_id: str, headers: Headers) -> None:
        try:
            if (code := await self.coordinator.answer(req, kind, batch, batch_id, headers)) is not None:
                self.outbox.count(code)
        except asyncio.CancelledError:
            reason = "shutting_down" if not self.accepting else "cancelled"
            failure = WireError.of(reason, "the batch was cancelled before it finished")
            with contextlib.suppress(Exception):
                await self.outbox.send(req, replies.error(kind, failure, stream=batch.stream, request_id=batch_id))
        except Exception as exc:  # one batch that cannot be answered must not take the worker down
            log.exception("batch %s failed", batch_id)
            with contextlib.suppress(Exception):
                await self.outbox.send(req, replies.error(kind, WireError.of("internal", f"internal error: {exc!r}")))

    def _batch_done(self, key: Key) -> None:
        self.batches.pop(key, None)
        self._released()

    def _released(self) -> None:
        self._capacity.set()
        if not len(self.held) and not self.batches:
            self._idle.set()

    async def _handle_cancel(self, msg: Msg) -> None:
        reply = (msg.headers or {}).get(REPLY_TO)
        if not reply:
            return  # a cancel names its request by reply subject and id; an id alone never cancels anything
        key = (reply, msg.subject.rsplit(".", 1)[-1])
        if (held := self.held.find(key)) is not None:
            self._thread.cancel(held.engine_id)
        elif (task := self.batches.get(key)) is not None:
            task.cancel()
        else:
            self.held.bury(key)

    def _refusal(self, key: Key, count: int, check_load: bool) -> WireError | None:
        """Why a new request cannot be held (None: it can). A batch holds nothing itself (its queries come back as
        requests), and a durable job was fetched only when it fits (`jobs_wanted`), so neither checks the load."""
        if self.held.holds(key) or key in self.batches:
            return WireError.of("duplicate_request", f"request id {key[1]!r} is already in flight from this client")
        if not self.accepting:
            return WireError.of("shutting_down", "worker is shutting down; retry and another worker will answer")
        if check_load and len(self.held) + count > self.config.max_pending:
            return WireError.of(
                "overloaded",
                f"worker overloaded: {len(self.held)} requests held, limit {self.config.max_pending} (max_pending);"
                " retry later",
            )
        return None

    # --- durable jobs ----------------------------------------------------------------------------------------

    def jobs_wanted(self) -> int:
        if not self.accepting:
            return 0
        idle = not len(self.held) and not self.batches
        return jobs_to_fetch(len(self.held), idle, self.config)

    async def wait_for_capacity(self) -> None:
        while self.jobs_wanted() <= 0:  # check and clear together, so capacity freed meanwhile is not missed
            self._capacity.clear()
            await self._capacity.wait()

    async def run_job(self, job: Job) -> None:
        handlers = {self.subjects.jobs_chat: self._handle_chat, self.subjects.jobs_chat_batched: self._handle_batch}
        handler = handlers.get(job.subject)
        try:
            if handler is None:
                return await self.outbox.send(
                    job, replies.error(JSON, WireError.of("not_found", f"no job type {job.subject}"))
                )
            await handler(job)
        except Exception as exc:  # as micro does for a handler: a 500 answer (here: a redelivery)
            log.exception("durable job %s failed", job.request_id)
            await self.outbox.send(job, replies.error(JSON, WireError.of("internal", f"internal error: {exc!r}")))

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop taking requests (the queue group sends new ones elsewhere), finish those held, then stop.

        Requests already delivered to this worker before it left the queue group are served, not refused."""
        self.draining = True
        if self.jobs is not None:
            await self.jobs.stop_pulling()
        await self.service.leave_discovery()
        await self.service.drain_endpoints()
        self.accepting = False
        log.info("draining: left the queue group; finishing %d held requests", len(self.held))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("drain timed out with %d requests in flight; failing them", len(self.held))
        await self.close()
        log.info("drained")

    async def close(self, failure: WireError | None = None) -> None:
        """Stop the engine, publish every event it already produced, then fail what is still held (by default with
        a 503: another worker may answer a retry)."""
        self.accepting = False
        if self.service is not None:
            await self.service.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.stop, 10)
            self._thread = None
        self.outbox.close()  # after every event the engine thread queued
        if self._tasks:
            await asyncio.gather(self._tasks[0], return_exceptions=True)
        failure = failure or WireError.of("shutting_down", "worker stopped before finishing this request")
        await self.outbox.publish(
            [Failed(h.engine_id, failure.code, failure.message, name=failure.name) for h in self.held]
        )
        for task in [*self.batches.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(*self.batches.values(), *self._tasks, return_exceptions=True)
        if self.jobs is not None:
            await self.jobs.close()
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()
        await self.coordinator.client.close()

    def _engine_died(self, exc: BaseException) -> None:
        log.critical("the engine thread died (%r): leaving the bus so that a supervisor restarts this worker", exc)
        self.dead = exc
        self.accepting = False
        self.died.set()


async def run_worker(
    config: Config, stop: asyncio.Event, ready: asyncio.Event | None = None, loaded: LoadedModel | None = None
) -> None:
    """Serve until `stop` is set, then drain: finish what this worker holds, answer it, and return.
    Raises `EngineDied` (after failing what it held with a 500) when the engine thread died."""
    torch.set_num_threads(pick_threads(config.threads))
    if loaded is None:
        loaded = await asyncio.to_thread(load_model, config.model, config.device, config.dtype)
    nc = await connect(config, "llmbus-worker")
    worker = Worker(config, nc, loaded)
    try:
        await worker.start()
        await nc.flush()  # the server knows our subscriptions before anyone is told we are ready
        log.info("worker serving %s on %s (%s, %s)", loaded.name, connected_to(nc), loaded.device, loaded.dtype)
        if ready is not None:
            ready.set()
        stopping, dying = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(worker.died.wait())
        await asyncio.wait({stopping, dying}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel(), dying.cancel()
        if worker.dead is None:
            await worker.drain(config.drain_timeout)
    finally:
        if not worker.draining:
            failure = None if worker.dead is None else WireError.of("internal", f"the engine died: {worker.dead!r}")
            await worker.close(failure)
        await nc.drain()
    if worker.dead is not None:
        raise EngineDied(f"the engine thread died: {worker.dead!r}") from worker.dead
