"""The durable-job side of `Intake` (intake.py): how many jobs a worker takes, how a job reaches its handler, and
where a model-less durable job goes while a model's workers restart.

Durable mode is for surviving restarts, so a durable job is not refused, nor served by another model, only because
its model's workers are away at the moment (`_job_route`):
- a job naming a model that no worker on the bus serves is forwarded to that model's job queue when the queue has
  its durable consumer (`llm-workers-<token>`: some worker of the model ran with `--durable`), to wait there for the
  model's workers; with no such consumer it is a 404, as before (a job there would wait unread until it expires);
- a job naming no model, while no default is on the bus, goes to the queue of the last default model seen whose
  workers take durable jobs (`ModelDirectory.durable_default`), when that queue's consumer exists, rather than to
  "the only model on the bus"; otherwise it is routed as before.
The queue's consumer is asked of the server each time (it may have been deleted); when the server cannot tell, the
job fails with a retryable 500 and comes back after its delay. Core requests are routed as before.
"""

from __future__ import annotations

import logging
import time

from inference_worker.durable import Job
from inference_worker.held import Replier
from inference_worker.job_consumer import jobs_to_fetch
from inference_worker.routing import Forward, Route
from inference_worker.worker_parts import WorkerParts
from schemas import WireError, content_type
from schemas.subjects import JSON

log = logging.getLogger("llmbus.worker")


class JobIntake(WorkerParts):
    def jobs_wanted(self) -> int:
        if not self.accepting:
            return 0
        batch_queries = self.jobs.batch_queries() if self.jobs is not None else 0
        held = len(self.held) + len(self.routing) + batch_queries
        return jobs_to_fetch(held, self.nothing_in_flight(), self.config)

    async def wait_for_capacity(self) -> None:
        while self.jobs_wanted() <= 0:  # check and clear together, so capacity freed meanwhile is not missed
            self._capacity.clear()
            await self._capacity.wait()

    async def run_job(self, job: Job) -> None:
        received, subjects, own = time.monotonic(), self.subjects, self.model_name
        handlers = {
            subjects.jobs_chat: self.route_chat,
            subjects.jobs_chat_batched: self.route_batch,
            subjects.model_jobs_chat(own): self.serve_chat,
            subjects.model_jobs_chat_batched(own): self.serve_batch,
        }
        try:
            if (handler := handlers.get(job.subject)) is None:
                unknown = WireError.of("not_found", f"no durable job type {job.subject}")
                return await self.outbox.refuse(job, JSON, unknown, received)
            await handler(job)
        except Exception as exc:  # as micro does for a handler: a 500 answer (here: a redelivery)
            log.exception("durable job %s failed", job.request_id)
            await self.outbox.refuse(job, JSON, WireError.of("internal", f"internal error: {exc!r}"), received)

    async def refuse_job(self, job: Job, failure: WireError, received: float) -> None:
        """A job the consumer answers `failure` before it runs (an invalid request id, a duplicate): answered in its
        encoding, counted, logged and traced as a core request refused at intake (`Outbox.refuse`)."""
        await self.outbox.refuse(job, content_type(job.headers), failure, received)

    def job_refused(self, job: Job, code: int, received: float) -> None:
        """A job the consumer answered `code` itself (`Job.give_up`, past its attempts): the failure count, log line
        and span of a refused request (`WorkerMetrics.refused`), never its prompt."""
        self.outbox.count(code)
        self.metrics.refused(job.headers, job.request_id, code, received)

    def _waits_for_its_default(self, req: Replier, requested: str | None) -> bool:
        """A durable job that names no model while the default it would go to is away: `_job_route` decides."""
        return isinstance(req, Job) and requested is None and self.directory.absent_default() is not None

    async def _job_route(self, req: Replier, requested: str | None, where: Route) -> Route:
        """`where` (the route on the bus as it is), or for a durable job whose model's workers are away, that model's
        job queue when it has its durable consumer (see the module's docstring)."""
        if not isinstance(req, Job) or self.jobs is None:
            return where
        if requested is None:
            waiting = self.directory.absent_default()
            if waiting is None or not await self.jobs.queue_exists(waiting):
                return where
            log.info("job %s names no model, and its default %s is away: queued for it", req.request_id, waiting)
            return Forward(waiting)
        if isinstance(where, WireError) and where.name == "model_not_found" and await self.jobs.queue_exists(requested):
            log.info("job %s: no worker of %s on the bus; queued for its workers", req.request_id, requested)
            return Forward(requested)
        return where
