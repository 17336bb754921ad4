"""Requests in: the handlers of a worker's endpoints, its cancel subscription and its durable jobs.

Handlers only validate, route, hold and enqueue, then return (nats.py runs one handler at a time per subscription):
- a chat for this worker's model is held and handed to the engine thread as a closure that templates and tokenizes
  it there (`requests.prepare`), off the event loop;
- a chat on a model-less subject for another model is forwarded to that model's subject (`routing`), in a task,
  unless a probe hears that nobody serves it (`forward_probe`); a durable job, into that model's job queue;
- a batch is scattered over the queue group and gathered by a task (`batches`);
- a cancel names its request by reply subject and id (`held`).

Each handler notes when its message arrived (`received`): a request's times (queue, first token, end to end, its
span) count from then, a look at the bus included. A request refused here is answered through `Outbox.refuse`, which
counts its code and writes its log line and span, as for a request the engine answered.

`Intake` is the request side of `Worker` (worker.py), which owns the state these methods use (`WorkerParts`,
worker_parts.py, lists it); `JobIntake` (job_intake.py) is its durable-job part, `Forwarding` (forwarding.py) its
forward to another model's workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from nats.aio.msg import Msg

from inference_worker.batches import Headers
from inference_worker.durable import Job
from inference_worker.engine import Failed
from inference_worker.forwarding import Forwarding
from inference_worker.held import Held, Key, Replier
from inference_worker.job_intake import JobIntake
from inference_worker.requests import (
    check_batch,
    check_max_tokens,
    deadline_of,
    parse_batch,
    parse_chat,
    prepare,
    propagated,
    request_id_of,
    tenant_of,
)
from inference_worker.routing import Forward, Route
from inference_worker.sequence import Sequence
from llmbus import logs
from schemas import Batch, ChatRequest, WireError, content_type, conversation
from schemas.subjects import REPLY_TO

log = logging.getLogger("llmbus.worker")


class Intake(JobIntake, Forwarding):
    async def route_chat(self, req: Replier) -> None:
        """`llm.chat` (and `llm.jobs.chat`): any model, or the default one."""
        received = time.monotonic()
        if not req.reply:
            return  # published without a reply subject: nobody would read the answer
        kind = content_type(req.headers)
        request = parse_chat(req.data, kind, durable=isinstance(req, Job))
        if isinstance(request, WireError):
            return await self.outbox.refuse(req, kind, request, received)
        where = self.directory.known_route(request.model)
        probed = isinstance(where, Forward) and not isinstance(req, Job)  # a round trip first: not in this callback
        if where is not None and not probed and not self._waits_for_its_default(req, request.model):
            return await self._dispatch_chat(req, kind, request, where, received, False)
        self._route_in_a_task(req, kind, request, received)

    def _route_in_a_task(self, req: Replier, kind: str, request: ChatRequest, received: float) -> None:
        """A request that needs a look at the bus before it can be routed (or a probe before it is forwarded) takes
        it in a task of its own: the look can last the whole discovery window, and every request behind this one
        would wait for it (on `llm.chat`, in the subscription's callback; a durable job, in the pull loop that every
        job queue shares). Until it is routed it counts as held (`jobs_wanted`). A request delivered while this
        worker still accepted requests is served even when a drain began during its look (`drain` serves what was
        already delivered)."""
        task = asyncio.create_task(self._route_then_dispatch(req, kind, request, received, self.accepting))
        self.routing.add(task)
        self._idle.clear()
        task.add_done_callback(self._routed)

    async def _route_then_dispatch(
        self, req: Replier, kind: str, request: ChatRequest, received: float, delivered: bool
    ) -> None:
        try:
            where = await self._job_route(req, request.model, await self.directory.route(request.model))
            await self._dispatch_chat(req, kind, request, where, received, delivered)
        except asyncio.CancelledError:
            failure = self._cut_short("routing this request")
            with contextlib.suppress(Exception):
                await self.outbox.refuse(req, kind, failure, received, stream=request.stream)
        except Exception as exc:  # as micro does for a handler: a 500 answer, not a lost request
            log.exception("routing a request failed")
            with contextlib.suppress(Exception):
                failure = WireError.of("internal", f"internal error: {exc!r}")
                await self.outbox.refuse(req, kind, failure, received, stream=request.stream)

    def _routed(self, task: asyncio.Task[None]) -> None:
        self.routing.discard(task)
        self._released()

    async def _dispatch_chat(
        self, req: Replier, kind: str, request: ChatRequest, where: Route, received: float, delivered: bool
    ) -> None:
        if isinstance(where, WireError):
            return await self.outbox.refuse(req, kind, where, received, stream=request.stream)
        if isinstance(where, Forward):
            return await self._forward(req, kind, where.model, received, request.stream)
        await self._serve_chat(req, kind, request, received, delivered)

    async def serve_chat(self, req: Replier) -> None:
        """`llm.model.<token>.chat` (and its durable subject): this worker's model only."""
        received = time.monotonic()
        if not req.reply:
            return
        kind = content_type(req.headers)
        request = parse_chat(req.data, kind, durable=isinstance(req, Job))
        if isinstance(request, WireError):
            return await self.outbox.refuse(req, kind, request, received)
        if request.model not in (None, self.model_name):
            wrong = WireError.of(
                "bad_request",
                f"this subject serves `{self.model_name}`, not `{request.model}`: use llm.chat or that model's subject",
            )
            return await self.outbox.refuse(req, kind, wrong, received, stream=request.stream)
        await self._serve_chat(req, kind, request, received)

    async def _serve_chat(
        self, req: Replier, kind: str, request: ChatRequest, received: float, delivered: bool = False
    ) -> None:
        """Hold `request` and hand it to the engine. `delivered`: it reached this worker while it accepted requests
        (it waited for a look at the bus since), so a drain that began meanwhile does not refuse it."""
        durable = isinstance(req, Job)
        if isinstance(req, Job):
            req.requeue_to = self.subjects.model_jobs_chat(self.model_name)  # routed here: its model's queue
        request_id = req.request_id if durable else request_id_of(req.headers)
        tenant = tenant_of(req.headers)
        for problem in (request_id, tenant):
            if isinstance(problem, WireError):
                return await self.outbox.refuse(req, kind, problem, received, stream=request.stream)
        key, engine_id = (req.reply, request_id), self.held.new_engine_id()
        held = Held(req, key, engine_id, kind, request.chat_id, request.stream, received=received)
        refusal = self._cancelled_earlier(key) if self.held.was_cancelled(key) else None
        refusal = refusal or self._refusal(key, 1, not durable, delivered) or check_max_tokens(request, self.limits)
        if refusal is not None:
            return await self.outbox.refuse(req, kind, refusal, received, stream=request.stream, request_id=request_id)
        deadline = deadline_of(request, req.age if durable else 0.0)
        if self.config.log_prompts:
            logs.prompt(request_id, conversation(request))
        self.held.hold(held)
        self._idle.clear()
        build = functools.partial(self._prepare, held.engine_id, request, deadline, tenant)
        self._thread.submit(build, held.engine_id)

    def _prepare(self, engine_id: str, request: ChatRequest, deadline: float | None, tenant: str) -> Sequence | Failed:
        """Runs in the engine thread: template and tokenize (a failure here fails this request only)."""
        try:
            return prepare(engine_id, request, self.loaded.encode_chat_with_prefix, self.limits, deadline, tenant)
        except Exception as exc:
            log.exception("preparing request %s failed", engine_id)
            return Failed(engine_id, 500, f"internal error while preparing the request: {exc!r}", name="internal")

    async def route_batch(self, req: Replier) -> None:
        """`llm.chat.batched`: each query goes to the model it names, or to the default model."""
        await self._batch(req, model=None)

    async def serve_batch(self, req: Replier) -> None:
        """`llm.model.<token>.chat.batched`: queries that name no model are for this worker's model."""
        await self._batch(req, model=self.model_name)

    async def _batch(self, req: Replier, model: str | None) -> None:
        received = time.monotonic()
        if not req.reply:
            return
        kind = content_type(req.headers)
        batch = parse_batch(req.data, kind, model)
        if isinstance(batch, WireError):
            return await self.outbox.refuse(req, kind, batch, received)
        durable = isinstance(req, Job)
        if isinstance(req, Job) and model is not None:
            req.requeue_to = self.subjects.model_jobs_chat_batched(model)
        batch_id = req.request_id if durable else request_id_of(req.headers)
        problem = batch_id if isinstance(batch_id, WireError) else check_batch(batch, self.limits, durable)
        if problem is not None:
            stream = batch.stream and not durable  # a stream's error ends it: the end marker and the sentinel
            return await self.outbox.refuse(req, kind, problem, received, stream=stream)
        key = (req.reply, batch_id)
        if self.held.was_cancelled(key):
            cancelled = WireError.of("cancelled", "the batch was cancelled before it ran")
            return await self.outbox.refuse(req, kind, cancelled, received, stream=batch.stream, request_id=batch_id)
        if (refusal := self._refusal(key, 0, check_load=False)) is not None:
            return await self.outbox.refuse(req, kind, refusal, received, stream=batch.stream, request_id=batch_id)
        headers = propagated(req.headers)
        if isinstance(headers, WireError):
            return await self.outbox.refuse(req, kind, headers, received, stream=batch.stream and not durable)
        self._idle.clear()
        if isinstance(req, Job):
            req.queries = len(batch.items)  # counted by `jobs_wanted` while the batch runs
        age = req.age if isinstance(req, Job) else 0.0  # each query's timeout counts from the job's publication
        task = asyncio.create_task(self._run_batch(req, kind, batch, key, headers, age, received))
        self.batches[key] = task
        task.add_done_callback(lambda _: self._batch_done(key))

    async def _run_batch(
        self, req: Replier, kind: str, batch: Batch, key: Key, headers: Headers, age: float, at: float
    ) -> None:
        """Gather the batch's answers and answer it (`at`: when it arrived, for a failure's log line). Cancelled, it
        answers 499 when its client cancelled it (`handle_cancel`), during a drain too; else `close` stopped it."""
        batch_id = key[1]
        try:
            code = await self.coordinator.answer(req, kind, batch, batch_id, headers, age)
            self.outbox.batch_answered(req, code)  # counted when every query failed, or a 413 replaced the answer
        except asyncio.CancelledError:
            cancelled = WireError.of("cancelled", "the batch was cancelled before it finished")
            failure = cancelled if key in self.cancelled_batches else self._cut_short("the batch finished")
            with contextlib.suppress(Exception):
                await self.outbox.refuse(req, kind, failure, at, stream=batch.stream, request_id=batch_id)
        except Exception as exc:  # one batch that cannot be answered must not take the worker down
            log.exception("batch %s failed", batch_id)
            with contextlib.suppress(Exception):
                internal = WireError.of("internal", f"internal error: {exc!r}")
                await self.outbox.refuse(req, kind, internal, at, request_id=batch_id)

    def _cut_short(self, what: str) -> WireError:
        """Why a batch or a request being routed that `close` cancelled fails. A worker that stops cleanly answers
        503 shutting_down (a durable job is stored again at once, not charged). A worker whose engine died answers a
        retryable 500, as for the requests its engine held: a durable job is charged a delivery and comes back after
        its delay, so a batch whose query kills every engine it reaches stops after its attempts, not at max_age."""
        if self.dead is None:
            return WireError.of("shutting_down", f"worker stopped before {what}; retry")
        return WireError.of("internal", f"the engine died before {what}; retry")

    @functools.cached_property
    def cancelled_batches(self) -> set[Key]:
        """The running batches a client cancelled (`handle_cancel`), each until it ends (`_batch_done`): a batch task
        that was cancelled answers 499 for these, whether or not a drain began meanwhile."""
        return set()

    def _batch_done(self, key: Key) -> None:
        self.batches.pop(key, None)
        self.cancelled_batches.discard(key)
        self._released()

    async def handle_cancel(self, msg: Msg) -> None:
        reply = (msg.headers or {}).get(REPLY_TO)
        if not reply:
            return  # a cancel names its request by reply subject and id; an id alone never cancels anything
        key = (reply, msg.subject.rsplit(".", 1)[-1])
        if (held := self.held.find(key)) is not None:
            self._thread.cancel(held.engine_id)
        elif (task := self.batches.get(key)) is not None:
            self.cancelled_batches.add(key)  # dropped when the batch ends (`_batch_done`)
            task.cancel()
        else:
            self.held.bury(key)

    def _refusal(self, key: Key, count: int, check_load: bool, delivered: bool = False) -> WireError | None:
        """Why a new request cannot be held (None: it can). A batch holds nothing itself (its queries come back as
        requests), and a durable job was fetched only when it fits (`jobs_wanted`), so neither checks the load.
        `delivered`: the request reached this worker before it stopped accepting, and a drain serves those."""
        if self.held.holds(key) or key in self.batches:
            return WireError.of("duplicate_request", f"request id {key[1]!r} is already in flight from this client")
        if not self.accepting and not (delivered and self._draining_serves()):
            return WireError.of("shutting_down", "worker is shutting down; retry and another worker will answer")
        if check_load and len(self.held) + count > self.config.max_pending:
            return WireError.of(
                "overloaded",
                f"worker overloaded: {len(self.held)} requests held, limit {self.config.max_pending} (max_pending);"
                " retry later",
            )
        return None

    def _cancelled_earlier(self, key: Key) -> WireError:
        """A request whose key was cancelled in the last `tombstone_ttl` seconds: its cancel came first (they travel
        on different subscriptions), or a client re-sent a cancelled request with its id (a retry after a timeout,
        whose cancel every worker remembered). Either way it does not run, and an error says why, not an empty
        answer that looks like a success."""
        ttl = round(self.held.tombstone_ttl)
        message = f"request id {key[1]!r} was cancelled in the last {ttl} s: send it again with a new request id"
        return WireError.of("cancelled", message)

    def _draining_serves(self) -> bool:
        """A drain still serves what was delivered before it: the engine runs, and the worker is not closing."""
        return self.draining and self.dead is None and self._thread is not None
