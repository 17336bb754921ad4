"""What the engine tells its caller, one event per request per step, and the hooks an observer gets per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from inference_worker.sequence import Sequence


@dataclass(slots=True, frozen=True)
class Timings:
    """Monotonic times (`time.monotonic()`) of one request's milestones; None where it never got there."""

    arrived_at: float | None = None
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def of(cls, seq: Sequence) -> Timings:
        return cls(seq.arrived_at, seq.scheduled_at, seq.first_token_at, seq.finished_at)


@dataclass(slots=True, frozen=True)
class Accepted:
    """A streaming request entered the engine's queue (sent before its first token)."""

    request_id: str


@dataclass(slots=True, frozen=True)
class TokenDelta:
    request_id: str
    text: str


@dataclass(slots=True, frozen=True)
class Finished:
    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings = Timings()

    @classmethod
    def of(cls, seq: Sequence) -> Finished:
        return cls(
            seq.request_id,
            seq.text,
            seq.finish_reason or "stop",
            seq.num_prompt_tokens,
            seq.num_completion_tokens,
            Timings.of(seq),
        )


@dataclass(slots=True, frozen=True)
class Failed:
    request_id: str
    code: int
    message: str
    timings: Timings = Timings()
    name: str = ""  # the error's row in schemas.errors.ERRORS (empty: the default for its code)

    @classmethod
    def of(cls, seq: Sequence, code: int, message: str, name: str = "") -> Failed:
        return cls(seq.request_id, code, message, Timings.of(seq), name=name)


Event = Accepted | TokenDelta | Finished | Failed


class StepObserver(Protocol):
    """Per-step figures for metrics. Called from the engine thread; keep it cheap."""

    def prefill_step(self, seconds: float, rows: int, tokens: int) -> None: ...

    def decode_step(self, seconds: float, rows: int) -> None: ...

    def token_gaps(self, gaps: list[float]) -> None:
        """Seconds since each row's previous token, for the rows that got a token in this decode step."""


class NoObserver:
    def prefill_step(self, seconds: float, rows: int, tokens: int) -> None:
        pass

    def decode_step(self, seconds: float, rows: int) -> None:
        pass

    def token_gaps(self, gaps: list[float]) -> None:
        pass
