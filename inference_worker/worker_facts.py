"""What a worker says about itself in its `$SRV` discovery replies: its metadata (INFO, PING) and its figures
(STATS). `schemas/discovery.py` describes both for the AsyncAPI document."""

from __future__ import annotations

import os
import socket

from inference_worker.worker_parts import WorkerParts


class WorkerFacts(WorkerParts):
    def metadata(self) -> dict[str, str]:
        return {
            "model": self.model_name,
            "default_model": str(self.config.default_model).lower(),
            "subject_prefix": self.config.subject_prefix,
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
            "refused_replies": self.service.replies.refused if self.service is not None else 0,
            **self._waiting_counts(),
            "metrics": self.metrics.summary(),
        }
        if self.jobs is not None:
            figures["jobs"] = self.jobs.snapshot()
        return figures

    def _waiting_counts(self) -> dict[str, dict[str, int]]:
        """Requests waiting for admission, by tenant and by priority (copied atomically from the engine thread's)."""
        waiting = self.engine.scheduler.waiting
        by_priority = dict(waiting.by_priority)
        return {
            "waiting_by_tenant": {tenant or "-": n for tenant, n in dict(waiting.by_tenant).items()},
            "waiting_by_priority": {str(priority): n for priority, n in sorted(by_priority.items())},
        }
