from __future__ import annotations

from collections import deque

from inference_worker.sequence import Sequence, Status


class Scheduler:
    """FIFO admission into a running batch of at most `max_batch_size` rows.

    `running[i]` is the sequence in cache slot i, so the live rows are always `[0, len(running))`.
    Each step admits waiting sequences while the padded prefill cost (rows x longest prompt) fits
    `prefill_budget`, so newcomers never stall the running rows for longer than one bounded prefill.
    """

    def __init__(self, max_batch_size: int, prefill_budget: int) -> None:
        self.max_batch_size = max_batch_size
        self.prefill_budget = prefill_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        batch: list[Sequence] = []
        width = 0
        while self.waiting and len(self.running) + len(batch) < self.max_batch_size:
            candidate = self.waiting[0]
            new_width = max(width, candidate.num_prompt_tokens)
            if batch and new_width * (len(batch) + 1) > self.prefill_budget:
                break
            batch.append(self.waiting.popleft())
            width = new_width
        for seq in batch:
            seq.slot = len(self.running)
            seq.status = Status.RUNNING
            self.running.append(seq)
        return batch

    def release_finished(self) -> list[tuple[Sequence, int, int]]:
        """Drop finished rows, filling each hole with the last row. Returns the (seq, src, dst) row moves."""
        moves = []
        slot = 0
        while slot < len(self.running):
            if self.running[slot].status is not Status.FINISHED:
                slot += 1
                continue
            last = self.running.pop()
            if slot < len(self.running):
                moves.append((last, last.slot, slot))
                last.slot = slot
                self.running[slot] = last
        return moves

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def drop_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
