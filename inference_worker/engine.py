"""The engine: iteration-level (continuous) batching over a slot KV cache.

Every `step()` (1) admits waiting requests and prefills them in one bounded forward, (2) runs one decode
forward over all running rows, (3) samples, and (4) frees the rows that finished, so a short request that
arrives late never waits for a long one. `EngineThread` runs steps off the event loop; the asyncio side
meets it at one inbox queue and receives events through one callback per step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from inference_worker.engine_stats import EngineStats
from inference_worker.events import Accepted, Event, Failed, Finished, NoObserver, StepObserver, Timings, TokenDelta

__all__ = [  # the engine's public names, events included (callers import them from here)
    "Accepted",
    "EngineConfig",
    "EngineStats",
    "Event",
    "Failed",
    "Finished",
    "LLMEngine",
    "StepObserver",
    "Timings",
    "TokenDelta",
]
from inference_worker.memory import plan_memory
from inference_worker.model_loader import LoadedModel
from inference_worker.model_runner import ModelRunner, fit_runner
from inference_worker.prefix_cache import PrefixCache
from inference_worker.sampler import sample
from inference_worker.sampling_params import SamplingParams
from inference_worker.scheduler import Scheduler
from inference_worker.sequence import Sequence, Status

log = logging.getLogger("llmbus.engine")


@dataclass(slots=True)
class EngineConfig:
    max_batch_size: int = 64
    prefill_budget: int = 512
    max_seq_len: int = 2048
    max_wait_ms: float = 0.0
    prefix_cache: bool = True
    min_prefix_tokens: int = 8
    prefix_cache_tokens: int = 4096
    kv_cache_tokens: int = 0
    compile: bool = False
    quantize: str = "none"
    prefill_matmuls: str = "float32"  # or bf16: model_runner.py


class LLMEngine:
    def __init__(
        self, loaded: LoadedModel, config: EngineConfig | None = None, observer: StepObserver | None = None
    ) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.observer = observer or NoObserver()
        self.max_seq_len = min(self.config.max_seq_len, loaded.max_context)
        self.tokenizer = loaded.tokenizer.backend_tokenizer
        prefix_tokens = self.config.prefix_cache_tokens if self.config.prefix_cache else 0
        rows, window, kv_tokens = self.config.max_batch_size, self.max_seq_len, self.config.kv_cache_tokens
        plan = partial(plan_memory, loaded.model, loaded.dtype, loaded.device, rows, window, kv_tokens, prefix_tokens)
        compile, quantize, prefill_matmuls = self.config.compile, self.config.quantize, self.config.prefill_matmuls
        self.plan, freeze_wide = fit_runner(loaded, compile, quantize, plan, prefill_matmuls)
        log.info("%s", self.plan.describe())
        self.runner = ModelRunner(
            loaded, self.plan.rows, window, compile, quantize, freeze_wide=freeze_wide, prefill_matmuls=prefill_matmuls
        )
        self.scheduler = Scheduler(self.plan.rows, self.config.prefill_budget)
        self.prefix_cache = (
            PrefixCache(max_tokens=prefix_tokens, min_len=self.config.min_prefix_tokens) if prefix_tokens else None
        )
        self.shared_generator = torch.Generator(loaded.device).manual_seed(_os_seed())
        self.stats = EngineStats()
        self._lock = threading.Lock()

    def add_request(self, seq: Sequence) -> Failed | None:
        """Queue a request, fitted to the context window: too long a prompt is an error, max_tokens is cut to fit."""
        room = self.max_seq_len - seq.num_prompt_tokens
        if room < 1:
            self.stats.requests_failed += 1
            return Failed.of(
                seq,
                413,
                f"prompt has {seq.num_prompt_tokens} tokens; the context window is {self.max_seq_len} "
                "tokens, so there is no room to generate",
            )
        if seq.params.max_tokens > room:
            seq.params = dataclasses.replace(seq.params, max_tokens=room)
        if seq.params.seed is not None and not seq.params.greedy:
            seq.generator = torch.Generator(self.loaded.device).manual_seed(seq.params.seed)
        self.scheduler.add(seq)
        return None

    def cancel(self, request_id: str) -> Sequence | None:
        seq = self.scheduler.find(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return None
        if seq.status is Status.WAITING:
            self.scheduler.drop_waiting(seq)
        seq.finish("cancelled")
        self.stats.requests_cancelled += 1
        return seq

    def close(self) -> None:
        """Stop compiling in the background (the engine itself holds no thread)."""
        self.runner.close()

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def max_rows(self) -> int:
        """The rows the scheduler can run together: those the memory plan bought, at most `max_batch_size`."""
        return self.scheduler.max_batch_size

    def count_failed(self, failed: Failed) -> Failed:
        """Count a request that failed before `add_request` took it (its preparation refused it, or building it or
        `add_request` raised), so that `requests_failed` counts every request the engine answered with a failure."""
        self.stats.requests_failed += 1
        return failed

    def step(self, emit: Callable[[list[Event]], None] | None = None) -> list[Event]:
        """One engine step: expire, prefill, decode. With `emit`, each phase's events go out as soon as that phase
        ends (first tokens right after prefill) and nothing is returned. A phase that raises fails everything in
        flight with a 500 and the step goes on; an error in that failing itself propagates (the engine is broken)."""
        collected: list[Event] = []
        for phase in (self.expire, self.prefill, self.decode):
            try:
                events = phase()
            except Exception as exc:
                log.exception("engine %s failed; failing every request in flight", phase.__name__)
                events = self.fail_all(500, f"internal engine error: {exc!r}")
            if emit is None:
                collected += events
            elif events:
                emit(events)
        return collected

    def expire(self) -> list[Event]:
        """Answer 504 for requests whose client has given up: waiting ones are never prefilled."""
        events: list[Event] = []
        self._expire(time.monotonic(), events)
        return events

    def prefill(self) -> list[Event]:
        """Admit waiting requests (bounded by the prefill budget) and run their prompts: each gets its first token.
        A prompt whose shared prefix is cached starts after it; one longer than the budget runs in chunks."""
        events: list[Event] = []
        batch = self.scheduler.admit()
        if not batch:
            return events
        started = time.perf_counter()
        reused = 0
        for seq in batch:
            if seq.num_prefilled == 0:
                seq.num_prefilled = self._reuse_prefix(seq)
                reused += seq.num_prefilled
        chunks = [seq.prompt_ids[seq.num_prefilled :] for seq in batch]
        if len(batch) == 1:
            chunks[0] = chunks[0][: self.config.prefill_budget]
        logits = self.runner.forward(batch[0].slot, chunks, [seq.num_prefilled for seq in batch])
        for seq, chunk in zip(batch, chunks, strict=True):
            seq.num_prefilled += len(chunk)
            self._remember_prefix(seq)
        self.scheduler.prefilled(batch)
        done = [row for row, seq in enumerate(batch) if seq.prefill_done]
        if done:
            self._advance([batch[row] for row in done], logits[done], events)
        computed = sum(map(len, chunks))
        self._release()
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats.prefill_forwards += 1
            self.stats.prefill_seconds += seconds
            self.stats.prompt_tokens += computed + reused
            self.stats.prefix_tokens_reused += reused
            if done:
                self.stats.prefill_batch(len(done))
        self.observer.prefill_step(seconds, len(batch), computed)
        return events

    def decode(self) -> list[Event]:
        """One token for every running row whose prompt is complete, in one forward."""
        events: list[Event] = []
        running = self.scheduler.decoding
        if not running:
            return events
        started, rows = time.perf_counter(), len(running)
        logits = self.runner.forward(0, [[s.last_token] for s in running], [s.num_cached_tokens for s in running])
        gaps = self._advance(running, logits, events)
        self._release()
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats.decode_step(rows, seconds)
        self.observer.decode_step(seconds, rows)
        self.observer.token_gaps(gaps)
        return events

    def _reuse_prefix(self, seq: Sequence) -> int:
        reusable = 0 < seq.prefix_len < seq.num_prompt_tokens and self.prefix_cache is not None
        kv = self.prefix_cache.get(seq.prefix) if reusable else None
        if kv is None:
            return 0
        self.runner.cache.write_prefix(seq.slot, kv)
        return seq.prefix_len

    def _remember_prefix(self, seq: Sequence) -> None:
        if (
            self.prefix_cache is not None
            and seq.num_prefilled >= seq.prefix_len
            and self.prefix_cache.wants(seq.prefix)
        ):
            self.prefix_cache.put(seq.prefix, self.runner.cache.read_prefix(seq.slot, seq.prefix_len))

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor, events: list[Event]) -> list[float]:
        """Sample one token per sequence and apply it; returns the gaps since each row's previous token."""
        tokens = sample(logits, seqs, self.shared_generator)
        now = time.monotonic()
        gaps = [now - seq.last_token_at for seq in seqs if seq.last_token_at is not None]
        self.stats.tokens_generated += len(seqs)
        for seq, token in zip(seqs, tokens, strict=True):
            seq.append_token(token, self.tokenizer, self.loaded.eos_token_ids, now)
            if seq.stream and (delta := seq.take_delta()):
                events.append(TokenDelta(seq.request_id, delta))
            if seq.status is Status.FINISHED:
                self.stats.requests_finished += 1
                events.append(Finished.of(seq))
        return gaps

    def _expire(self, now: float, events: list[Event]) -> None:
        for seq in list(self.scheduler.waiting):
            if seq.deadline is not None and seq.deadline <= now:
                self.scheduler.drop_waiting(seq)
                seq.finish("cancelled")
                self.stats.requests_failed += 1
                events.append(Failed.of(seq, 504, "deadline exceeded before generation started"))
        for seq in self.scheduler.running:
            if seq.status is not Status.FINISHED and seq.deadline is not None and seq.deadline <= now:
                seq.finish("cancelled")
                self.stats.requests_failed += 1
                events.append(
                    Failed.of(seq, 504, f"deadline exceeded after {seq.num_completion_tokens} generated tokens")
                )
        self._release()

    def _release(self) -> None:
        for seq, src, dst in self.scheduler.release_finished():
            self.runner.move_row(src, dst, seq.num_cached_tokens)

    def fail_all(self, code: int, message: str) -> list[Event]:
        events: list[Event] = [Failed.of(seq, code, message) for seq in self.scheduler.abort_all()]
        self._release()
        self.stats.requests_failed += len(events)
        return events

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "compile": self.runner.compile_state,
                "running": self.num_running,
                "waiting": self.num_waiting,
                **self.stats.figures(),
            }

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Finished]:
        """Synchronous batch generation (tests, benchmarks). Results come back in input order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{i}" for i in range(len(prompts))]
        results: dict[str, Finished] = {}
        for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
            if failed := self.add_request(Sequence(request_id, list(prompt), p)):
                raise ValueError(failed.message)
        while self.has_work():
            for event in self.step():
                if isinstance(event, Failed):
                    raise RuntimeError(f"{event.request_id} failed: {event.code} {event.message}")
                if isinstance(event, Finished):
                    results[event.request_id] = event
        return [results[i] for i in ids]


def _os_seed() -> int:
    """A seed from the OS, so every replica and every restart draws different noise (a request's own seed still
    makes its text reproducible)."""
    return int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
