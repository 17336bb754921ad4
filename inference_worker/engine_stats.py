"""What an engine has done since it started: the counters behind `$SRV.STATS` and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    decode_steps: int = 0
    prefill_forwards: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    prefix_tokens_reused: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    max_running: int = 0
    decode_seconds: float = 0.0  # wall time in decode steps (forward, sampling and bookkeeping)
    prefill_seconds: float = 0.0  # wall time in prefill forwards (the same)
    decode_batch_sizes: dict[int, int] = field(default_factory=dict)
    prefill_batch_sizes: dict[int, int] = field(default_factory=dict)

    def decode_step(self, rows: int, seconds: float) -> None:
        self.decode_steps += 1
        self.decode_seconds += seconds
        self.max_running = max(self.max_running, rows)
        self.decode_batch_sizes[rows] = self.decode_batch_sizes.get(rows, 0) + 1

    def prefill_batch(self, rows: int) -> None:
        self.prefill_batch_sizes[rows] = self.prefill_batch_sizes.get(rows, 0) + 1

    def figures(self) -> dict:
        """The counters as JSON-ready values (histogram keys as strings)."""
        return {
            "decode_steps": self.decode_steps,
            "prefill_forwards": self.prefill_forwards,
            "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens,
            "prefix_tokens_reused": self.prefix_tokens_reused,
            "requests_finished": self.requests_finished,
            "requests_failed": self.requests_failed,
            "requests_cancelled": self.requests_cancelled,
            "max_running": self.max_running,
            "decode_seconds": round(self.decode_seconds, 6),
            "prefill_seconds": round(self.prefill_seconds, 6),
            "decode_batch_sizes": {str(k): v for k, v in sorted(self.decode_batch_sizes.items())},
            "prefill_batch_sizes": {str(k): v for k, v in sorted(self.prefill_batch_sizes.items())},
        }
