from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from inference_worker.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its tokens, its place in the KV cache, and the text produced so far.

    Token i of `prompt_ids + completion_ids` has position i and lives in column i of its KV-cache slot.
    The newest completion token is *pending*: sampled but not yet run through the model.
    The `*_at` fields are `time.monotonic()` milestones: arrival (creation, unless the caller passes the time it
    received the request), first prefill, first token, finish.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    deadline: float | None = None
    prefix_len: int = 0
    tenant: str = ""  # whose request it is: admission rotates among tenants (admission.py)
    priority: int = 0  # lower is admitted first within its tenant
    seq_id: int = field(default_factory=itertools.count().__next__)
    status: Status = Status.WAITING
    completion_ids: list[int] = field(default_factory=list)
    num_prefilled: int = 0
    slot: int = -1
    text: str = ""
    num_emitted_chars: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    decoder: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.completion_ids)

    @property
    def num_cached_tokens(self) -> int:
        return self.num_prefilled + max(0, len(self.completion_ids) - 1)

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled == len(self.prompt_ids)

    @property
    def prefix(self) -> tuple[int, ...]:
        return tuple(self.prompt_ids[: self.prefix_len])

    @property
    def last_token(self) -> int:
        return self.completion_ids[-1]

    def append_token(self, token_id: int, tokenizer: Tokenizer, eos_token_ids: frozenset[int], now: float) -> None:
        self.completion_ids.append(token_id)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        if token_id in eos_token_ids and not self.params.ignore_eos:
            self._decode_held_bytes(tokenizer, self.completion_ids[:-1])
            self.finish("stop")
            return
        before = len(self.text)
        self.text += self.decoder.step(tokenizer, token_id) or ""
        if self.params.stop and self._cut_at_stop(before):
            self.finish("stop")
        elif self.num_completion_tokens >= self.params.max_tokens:
            self._decode_held_bytes(tokenizer, self.completion_ids)
            self.finish("length")

    def _decode_held_bytes(self, tokenizer: Tokenizer, ids: list[int]) -> None:
        """At the end, the bytes of an incomplete UTF-8 character that the streaming decoder still holds come out
        as U+FFFD, as `tokenizer.decode` gives them, instead of being lost."""
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        if len(whole) > len(self.text) and whole.startswith(self.text):
            self.text = whole

    def _cut_at_stop(self, before: int) -> bool:
        longest = max(map(len, self.params.stop))
        window_start = max(0, before - longest + 1)
        hits = [i for s in self.params.stop if (i := self.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def take_delta(self) -> str:
        """Text that is safe to stream now: everything, except a tail that could still start a stop string."""
        ready = len(self.text)
        if self.params.stop and self.status is not Status.FINISHED:
            ready -= max(map(len, self.params.stop)) - 1
        if ready <= self.num_emitted_chars:
            return ""
        delta = self.text[self.num_emitted_chars : ready]
        self.num_emitted_chars = ready
        return delta

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finished_at = time.monotonic()
