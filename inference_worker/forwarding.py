"""The forward of a chat to another model's workers, a part of `Intake`; forward_probe.py explains the probe first."""

from __future__ import annotations

import logging

from bus_gateway.bus_errors import no_durable_worker
from inference_worker.durable import Job
from inference_worker.forward_probe import nobody_serves
from inference_worker.held import Replier
from inference_worker.worker_parts import WorkerParts
from schemas import WireError

log = logging.getLogger("llmbus.worker")


class Forwarding(WorkerParts):
    """`Intake`'s forward of a chat to another model's workers (`routing.Forward`), on `Worker`'s state."""

    async def _forward(self, req: Replier, kind: str, model: str, received: float, stream: bool) -> None:
        """Hand a chat to `model`'s workers with the client's reply subject: they answer the client directly. A core
        request goes there only when the probe did not hear that nobody serves it; else it is a 503 that names the
        model, and the view forgets the model until its next look at the bus. A durable job is stored again in its
        model's queue, where it waits for a worker by design."""
        log.debug("forwarding a request for %s to its workers", model)
        if isinstance(req, Job):
            if self.jobs is not None and not await self.jobs.takes_jobs_for(model):
                unserved = WireError.of("model_not_found", no_durable_worker(model).message)
                return await self.outbox.refuse(req, kind, unserved, received)
            return await req.forward(self.subjects.model_jobs_chat(model))
        if await self.probe.served(subject := self.subjects.model_chat(model)):
            return await req.forward(subject)
        log.debug("nobody serves %s any more: refusing the request forwarded to it", model)
        self.directory.forget(model)
        await self.outbox.refuse(req, kind, nobody_serves(model), received, stream=stream)
