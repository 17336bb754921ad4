"""The inputs of a compiled step, ragged: the tokens of several sequences one after another, each with its cache row
and column, and which tokens' logits come back. A decode step is the case of one token a sequence."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class StepInputs:
    """A step's tokens, ragged: token n runs in cache row `rows[n]` at column `positions[n]`; the logits are those
    of the tokens `last` (one per sequence, in order)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    last: torch.Tensor

    @classmethod
    def of(cls, first_row: int, chunks: list[list[int]], starts: list[int], scratch: int, size: int) -> StepInputs:
        """Sequence r's tokens `chunks[r]` in row `first_row + r` from column `starts[r]`, then padding up to `size`
        tokens (and as many logits): token 0 in the scratch column of row `first_row`, which no query reads."""
        tokens = [token for chunk in chunks for token in chunk]
        positions = [start + i for chunk, start in zip(chunks, starts, strict=True) for i in range(len(chunk))]
        rows = [first_row + r for r, chunk in enumerate(chunks) for _ in chunk]
        last = list(itertools.accumulate(len(chunk) for chunk in chunks))
        padding = size - len(tokens)
        return cls(
            torch.tensor(tokens + [0] * padding),
            torch.tensor(positions + [scratch] * padding),
            torch.tensor(rows + [first_row] * padding),
            torch.tensor([end - 1 for end in last] + list(range(len(tokens), size))),
        )

    def to(self, device: torch.device) -> StepInputs:
        return StepInputs(*(t.to(device) for t in (self.tokens, self.positions, self.rows, self.last)))
