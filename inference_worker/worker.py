"""The worker on the bus: a micro service (`llm-inference`) for one model, and its lifecycle.

Its endpoints: `llm.chat` and `llm.chat.batched` (any model: requests for another model are forwarded to that
model's subject) and `llm.model.<token>.chat[.batched]` (its own model), all in the queue group `llm-workers`;
handlers live in `intake.py`. The asyncio side and the engine thread meet at one queue each way: handlers hand the
engine a closure that templates and tokenizes in the engine thread, and the engine's events come back through the
`Outbox`, which publishes them in order. Durable jobs (`job_consumer`) enter through the same handlers as micro
requests: both are a `Replier`, answered only on a reply subject under `--reply-prefixes`. When the engine thread
dies, the watchdog (`_engine_died`) fails what it held, leaves the queue group, and makes `run_worker` raise, so the
process exits non-zero and a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

import torch
from nats.aio.client import DEFAULT_INBOX_PREFIX
from nats.aio.client import Client as NATS

from bus_gateway.client import BusClient
from bus_gateway.discovery import BusModels
from inference_worker.batches import BatchCoordinator
from inference_worker.departures import Departures
from inference_worker.engine import (
    EngineConfig,
    Failed,
    LLMEngine,
)
from inference_worker.engine_thread import EngineThread
from inference_worker.forward_probe import ForwardProbe
from inference_worker.hardware import pick_threads
from inference_worker.held import HeldRequests, Key
from inference_worker.intake import Intake
from inference_worker.job_consumer import JobConsumer, ServerClock
from inference_worker.job_stream import JobLimits, job_consumers
from inference_worker.metrics import WorkerMetrics
from inference_worker.micro import MicroService
from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.outbox import Outbox
from inference_worker.own_thread import in_a_thread_of_its_own
from inference_worker.reply_gate import reply_allowed
from inference_worker.requests import Limits
from inference_worker.routing import ModelDirectory
from inference_worker.thread_share import share_threads
from inference_worker.worker_facts import WorkerFacts
from llmbus import __version__, logs, process_gc
from llmbus.config import Config
from llmbus.connection import connect, connected_to, flushed
from schemas import SERVICE_NAME, Subjects, WireError

log = logging.getLogger("llmbus.worker")


class EngineDied(RuntimeError):
    """The engine thread stopped on an error it could not recover from; the worker left the bus."""


def check_own_inbox(config: Config) -> None:
    """A worker sends a batch's queries to its peers with its own inbox as the reply subject: one outside
    --reply-prefixes would go unanswered by every worker, itself included."""
    own = config.nats_inbox_prefix or DEFAULT_INBOX_PREFIX.decode()
    if not reply_allowed(f"{own}.inbox.request", tuple(config.reply_prefixes)):
        allowed = ", ".join(config.reply_prefixes)
        raise ValueError(f"this worker's inbox prefix {own} is not under --reply-prefixes ({allowed}): add it there")


class Worker(Intake, WorkerFacts):
    def __init__(
        self, config: Config, nc: NATS, loaded: LoadedModel, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.wall_clock = wall_clock  # this host's clock; durable deadlines correct it to the server's
        self.nc = nc
        self.loaded = loaded
        self.model_name = config.served_model_name or loaded.name
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
            prefill_matmuls=config.prefill_matmuls,
        )
        self.limits = Limits(config.max_tokens_cap, config.max_batch_queries, config.max_seq_len)
        self.held = HeldRequests()
        self.batches: dict[Key, asyncio.Task[None]] = {}
        self.routing: set[asyncio.Task[None]] = set()  # requests waiting for a look at the bus (`_route_in_a_task`)
        self.peers = BusClient(nc, self.subjects)  # this worker as a client of the bus: batches, discovery
        self.directory = ModelDirectory(self._bus_models, self.model_name, config.default_model)
        self.coordinator = BatchCoordinator(
            self.peers, config.request_timeout, self.directory.knows, self.directory.listing
        )
        self.probe = ForwardProbe(nc)  # is a model still served, before a request is forwarded to it
        self.accepting = True
        self.draining = False
        self.threads = pick_threads(config.threads)
        self.dead: BaseException | None = None
        self.died = asyncio.Event()
        self.jobs: JobConsumer | None = None
        self.service: MicroService | None = None
        worker_label = f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = WorkerMetrics(self.model_name, worker_label, log_prompts=config.log_prompts)
        self.metrics_url: str | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._capacity = asyncio.Event()
        self._thread: EngineThread | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cancel_sub = None
        self.departures: Departures | None = None

    async def start(self) -> None:
        prefixes = tuple(self.config.reply_prefixes)
        loop = asyncio.get_running_loop()
        self.outbox = Outbox(self.held, self.model_name, self._released, self.metrics)
        self._thread = EngineThread(
            self._build_engine,
            self.outbox.put,
            on_death=lambda exc: loop.call_soon_threadsafe(self._engine_died, exc),
        )
        engine = await asyncio.to_thread(self._thread.start)
        self.engine = engine
        process_gc.settle()  # in a serving process, the start's one full collection, before any request can wait on it
        self.metrics.watch(engine)
        if self.config.metrics_port:
            self.metrics_url = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        if self.config.log_prompts:
            logs.allow_prompts(True)
        self.limits = Limits(self.config.max_tokens_cap, self.config.max_batch_queries, engine.max_seq_len)
        self._tasks.append(asyncio.create_task(self.outbox.run(), name="llmbus-outbox"))
        about = "LLM chat inference (continuous batching)"
        self.service = MicroService(self.nc, SERVICE_NAME, __version__, about, self.metadata(), self.stats, prefixes)
        await self.service.start()
        group, subjects, own = self.config.queue_group, self.subjects, self.model_name
        await self.service.add_endpoint("chat", subjects.chat, group, self.route_chat)
        await self.service.add_endpoint("chat_batched", subjects.chat_batched, group, self.route_batch)
        await self.service.add_endpoint("model_chat", subjects.model_chat(own), group, self.serve_chat)
        await self.service.add_endpoint("model_chat_batched", subjects.model_chat_batched(own), group, self.serve_batch)
        self._cancel_sub = await self.nc.subscribe(subjects.cancel_all, cb=self.handle_cancel)
        self.departures = Departures(self.nc, subjects, own, self.service.id, self.directory.forget)
        await self.departures.watch()
        if self.config.durable:
            limits, consumers = JobLimits.from_config(self.config), job_consumers(subjects, own)
            clock = ServerClock(self.wall_clock)
            self.jobs = JobConsumer(self.nc, self, limits, consumers, prefixes, clock)
            await self.jobs.start()
        if self.config.threads == 0:
            ping = self.peers.ping
            self._tasks.append(asyncio.create_task(share_threads(ping, self._set_threads, self.service.id)))
        await flushed(self.nc)  # the server knows every subscription before anyone is told this worker serves

    async def _bus_models(self, thorough: bool) -> BusModels:
        return await self.peers.bus_models(thorough=thorough)

    def _released(self) -> None:
        """A held request or a batch is done: there may be room for a durable job, or nothing left to drain."""
        self._capacity.set()
        if self.nothing_in_flight():
            self._idle.set()

    def nothing_in_flight(self) -> bool:
        """No request held, no batch running, none waiting to be routed."""
        return not len(self.held) and not self.batches and not self.routing

    def _build_engine(self) -> LLMEngine:
        """Runs in the engine thread, so that every torch op of the engine (its caches too) runs in one thread."""
        return LLMEngine(self.loaded, self.engine_config, observer=self.metrics)

    def _set_threads(self, threads: int) -> None:
        self.threads = threads
        self._thread.set_threads(threads)

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
        await self.departures.announce()
        log.info("draining: left the queue group; finishing %d held requests", len(self.held))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("drain timed out with %d requests in flight; failing them", len(self.held))
        await self.close()
        log.info("drained")

    async def close(self, failure: WireError | None = None) -> None:
        """Stop the engine, publish every event it already produced, then fail what is still held: by default with a
        503 (another worker may answer a retry; a durable job is stored again, not charged), or, when the engine
        died (during a drain too), with a retryable 500 that charges a durable job a delivery (`Intake._cut_short`
        for the batches and requests being routed)."""
        self.accepting = False
        if self.service is not None:
            await self.service.stop()
        if self.departures is not None:
            await self.departures.announce()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.stop, 10)
            self._thread = None
        self.outbox.close()  # after every event the engine thread queued
        if self._tasks:
            await asyncio.gather(self._tasks[0], return_exceptions=True)
        if failure is None and self.dead is not None:
            failure = WireError.of("internal", "the engine died before finishing this request")
        failure = failure or WireError.of("shutting_down", "worker stopped before finishing this request")
        leftovers = [Failed(h.engine_id, failure.code, failure.message, name=failure.name) for h in self.held]
        await self.outbox.publish(leftovers)
        unfinished = [*self.routing, *self.batches.values(), *self._tasks]
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if self.jobs is not None:
            await self.jobs.close()
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()
        if self.departures is not None:
            await self.departures.close()
        await self.peers.close()
        self.metrics.stop_serving()  # its port is free again, and no scrape reads the stopped engine

    def _engine_died(self, exc: BaseException) -> None:
        log.critical("the engine thread died (%r): leaving the bus so that a supervisor restarts this worker", exc)
        self.dead = exc
        self.accepting = False
        self.died.set()


async def run_worker(
    config: Config, stop: asyncio.Event, ready: asyncio.Event | None = None, loaded: LoadedModel | None = None
) -> None:
    """Serve until `stop` is set, then drain: finish what this worker holds, answer it, and return.
    Raises `EngineDied` (after failing what it held with a 500) when the engine thread died. The caller's torch
    threads are set for the worker and restored after it (in-process workers: tests, `llmbus up`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(pick_threads(config.threads))
    try:
        await _serve(config, stop, ready, loaded)
    finally:
        torch.set_num_threads(threads)


async def _serve(config: Config, stop: asyncio.Event, ready: asyncio.Event | None, loaded: LoadedModel | None) -> None:
    check_own_inbox(config)
    if loaded is None:
        loaded = await in_a_thread_of_its_own(load_model, config.model, config.device, config.dtype)
    nc = await connect(config, "llmbus-worker")
    worker = Worker(config, nc, loaded)
    try:
        await worker.start()
        where = connected_to(nc)
        log.info("worker serving %s on %s (%s, %s)", worker.model_name, where, loaded.device, loaded.dtype)
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
