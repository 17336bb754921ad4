from __future__ import annotations

from dataclasses import dataclass

GREEDY_BELOW = 1e-5


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How one sequence is sampled. `temperature == 0` is greedy decoding."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1
        assert self.temperature >= 0.0
        assert 0.0 < self.top_p <= 1.0
        assert self.top_k >= 0

    @property
    def greedy(self) -> bool:
        """Temperatures this small would overflow the logits; they mean greedy anyway."""
        return self.temperature < GREEDY_BELOW
