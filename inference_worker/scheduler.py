from __future__ import annotations

import math
import time

from inference_worker.admission import WaitingQueue
from inference_worker.sequence import Sequence, Status


class Scheduler:
    """Admission into a running batch of at most `max_batch_size` rows, in the order `WaitingQueue` gives
    (tenants take turns, lower priority first, with aging).

    `running[i]` is the sequence in cache slot i, so the live rows are always `[0, len(running))`. The rows
    that decode come first; after them sits at most one `partial` row whose prompt is still being prefilled
    in chunks. Each step admits waiting sequences while the padded prefill cost (rows x longest prompt) fits
    `prefill_budget`; a prompt longer than the budget is admitted alone and prefilled `prefill_budget` tokens
    per step, so newcomers never stall the running rows for longer than one bounded prefill.
    """

    def __init__(self, max_batch_size: int, prefill_budget: int) -> None:
        self.max_batch_size = max_batch_size
        self.prefill_budget = prefill_budget
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []
        self.partial: Sequence | None = None

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def decoding(self) -> list[Sequence]:
        return self.running[:-1] if self.partial is not None else self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """The rows to prefill this step, in slot order: the partial row, or newly admitted ones."""
        if self.partial is not None:
            return [self.partial]
        batch: list[Sequence] = []
        width = 0
        while self.waiting and len(self.running) + len(batch) < self.max_batch_size:
            new_width = max(width, self.waiting.peek().num_prompt_tokens)
            if batch and new_width * (len(batch) + 1) > self.prefill_budget:
                break
            batch.append(self.waiting.popleft())
            width = new_width
            if width > self.prefill_budget:
                break
        now = time.monotonic()
        for seq in batch:
            seq.slot = len(self.running)
            seq.status = Status.RUNNING
            seq.scheduled_at = now
            self.running.append(seq)
        return batch

    def prefilled(self, batch: list[Sequence]) -> None:
        """After a prefill forward over `batch`: its last row stays partial while its prompt is not complete."""
        self.partial = batch[-1] if not batch[-1].prefill_done else None

    def abort_all(self) -> list[Sequence]:
        """Finish every sequence held (running and waiting), e.g. after an engine error; returns them."""
        held = [*self.running, *self.waiting]
        for seq in held:
            seq.finish("cancelled")
        self.waiting.clear()
        self.partial = None
        return held

    def release_finished(self) -> list[tuple[Sequence, int, int]]:
        """Drop finished rows, filling each hole with the last live decoding row, and keep the partial row last.
        Returns the (seq, src, dst) row moves the KV cache must copy: only live rows move (finished rows at the end
        are dropped first, so a batch that finishes together copies nothing)."""
        partial = self.partial
        if partial is not None:
            self.running.pop()
        moves = []
        self._drop_finished_tail()
        slot = 0
        while slot < len(self.running):
            if self.running[slot].status is Status.FINISHED:
                last = self.running.pop()  # live (the tail is), and after `slot`, which is finished
                moves.append((last, last.slot, slot))
                last.slot = slot
                self.running[slot] = last
                self._drop_finished_tail()
            slot += 1
        if partial is not None and partial.status is Status.FINISHED:
            self.partial = None
        elif partial is not None:
            if partial.slot != len(self.running):
                moves.append((partial, partial.slot, len(self.running)))
                partial.slot = len(self.running)
            self.running.append(partial)
        return moves

    def _drop_finished_tail(self) -> None:
        while self.running and self.running[-1].status is Status.FINISHED:
            self.running.pop()

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def drop_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)

    def first_deadline(self) -> float:
        """The earliest deadline of a waiting sequence (`inf`: none has one): a hold for more requests ends there."""
        return min((seq.deadline for seq in self.waiting if seq.deadline is not None), default=math.inf)
