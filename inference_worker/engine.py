"""The engine: iteration-level (continuous) batching over a slot KV cache.

Every `step()` (1) admits waiting requests and prefills them in one bounded forward, (2) runs one decode
forward over all running rows, (3) samples, and (4) frees the rows that finished, so a short request that
arrives late never waits for a long one. `EngineThread` runs steps off the event loop; the asyncio side
meets it at one inbox queue and receives events through one callback per step.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from inference_worker.model_loader import LoadedModel
from inference_worker.model_runner import ModelRunner
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

    @classmethod
    def of(cls, seq: Sequence) -> Finished:
        return cls(
            seq.request_id, seq.text, seq.finish_reason or "stop", seq.num_prompt_tokens, seq.num_completion_tokens
        )


@dataclass(slots=True, frozen=True)
class Failed:
    request_id: str
    code: int
    message: str
    name: str = ""  # the error's row in schemas.errors.ERRORS (empty: the default for its code)


@dataclass(slots=True, frozen=True)
class Accepted:
    """A streaming request is in the engine (the worker tells its client before the first token)."""

    request_id: str


Event = Accepted | TokenDelta | Finished | Failed


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
    decode_batch_sizes: dict[int, int] = field(default_factory=dict)
    prefill_batch_sizes: dict[int, int] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.max_seq_len = min(self.config.max_seq_len, loaded.max_context)
        self.tokenizer = loaded.tokenizer.backend_tokenizer
        self.runner = ModelRunner(loaded, self.config.max_batch_size, self.max_seq_len)
        self.scheduler = Scheduler(self.config.max_batch_size, self.config.prefill_budget)
        self.prefix_cache = PrefixCache(min_len=self.config.min_prefix_tokens) if self.config.prefix_cache else None
        self.shared_generator = torch.Generator(loaded.device)
        self.stats = EngineStats()
        self._lock = threading.Lock()

    def add_request(self, seq: Sequence) -> Failed | None:
        """Queue a request, fitted to the context window: too long a prompt is an error, max_tokens is cut to fit."""
        room = self.max_seq_len - seq.num_prompt_tokens
        if room < 1:
            self.stats.requests_failed += 1
            return Failed(
                seq.request_id,
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

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[Event]:
        return self.expire() + self.prefill() + self.decode()

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
        done = [row for row, seq in enumerate(batch) if seq.prefill_done]
        self.scheduler.partial = None if len(done) == len(batch) else batch[-1]
        if done:
            self._advance([batch[row] for row in done], logits[done], events)
        with self._lock:
            self.stats.prefill_forwards += 1
            self.stats.prompt_tokens += sum(map(len, chunks)) + reused
            self.stats.prefix_tokens_reused += reused
            if done:
                _bump(self.stats.prefill_batch_sizes, len(done))
        self._release()
        return events

    def decode(self) -> list[Event]:
        """One token for every running row whose prompt is complete, in one forward."""
        events: list[Event] = []
        running = self.scheduler.decoding
        if not running:
            return events
        logits = self.runner.forward(0, [[s.last_token] for s in running], [s.num_cached_tokens for s in running])
        self._advance(running, logits, events)
        with self._lock:
            self.stats.decode_steps += 1
            self.stats.max_running = max(self.stats.max_running, len(running))
            _bump(self.stats.decode_batch_sizes, len(running))
        self._release()
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

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor, events: list[Event]) -> None:
        tokens = sample(logits, seqs, self.shared_generator)
        self.stats.tokens_generated += len(seqs)
        for seq, token in zip(seqs, tokens, strict=True):
            seq.append_token(token, self.tokenizer, self.loaded.eos_token_ids)
            if seq.stream and (delta := seq.take_delta()):
                events.append(TokenDelta(seq.request_id, delta))
            if seq.status is Status.FINISHED:
                self.stats.requests_finished += 1
                events.append(Finished.of(seq))

    def _expire(self, now: float, events: list[Event]) -> None:
        for seq in list(self.scheduler.waiting):
            if seq.deadline is not None and seq.deadline <= now:
                self.scheduler.drop_waiting(seq)
                self.stats.requests_failed += 1
                events.append(Failed(seq.request_id, 504, "deadline exceeded before generation started"))
        for seq in self.scheduler.running:
            if seq.status is not Status.FINISHED and seq.deadline is not None and seq.deadline <= now:
                seq.finish("cancelled")
                self.stats.requests_failed += 1
                events.append(
                    Failed(seq.request_id, 504, f"deadline exceeded after {seq.num_completion_tokens} generated tokens")
                )
        self._release()

    def _release(self) -> None:
        for seq, src, dst in self.scheduler.release_finished():
            self.runner.move_row(src, dst, seq.num_cached_tokens)

    def fail_all(self, code: int, message: str) -> list[Event]:
        events: list[Event] = []
        for seq in (*self.scheduler.running, *self.scheduler.waiting):
            seq.finish("cancelled")
            events.append(Failed(seq.request_id, code, message))
        self.scheduler.waiting.clear()
        self.scheduler.partial = None
        self._release()
        self.stats.requests_failed += len(events)
        return events

    def snapshot(self) -> dict:
        with self._lock:
            s = self.stats
            return {
                "running": self.num_running,
                "waiting": self.num_waiting,
                "decode_steps": s.decode_steps,
                "prefill_forwards": s.prefill_forwards,
                "tokens_generated": s.tokens_generated,
                "prompt_tokens": s.prompt_tokens,
                "prefix_tokens_reused": s.prefix_tokens_reused,
                "requests_finished": s.requests_finished,
                "requests_failed": s.requests_failed,
                "requests_cancelled": s.requests_cancelled,
                "max_running": s.max_running,
                "decode_batch_sizes": {str(k): v for k, v in sorted(s.decode_batch_sizes.items())},
                "prefill_batch_sizes": {str(k): v for k, v in sorted(s.prefill_batch_sizes.items())},
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
                if isinstance(event, Finished):
                    results[event.request_id] = event
        return [results[i] for i in ids]


def _bump(histogram: dict[int, int], key: int) -> None:
    histogram[key] = histogram.get(key, 0) + 1


Intake = Sequence | Callable[[], "Sequence | Failed"]


@dataclass(slots=True, frozen=True)
class _Submit:
    request: Intake


@dataclass(slots=True, frozen=True)
class _SetThreads:
    threads: int


@dataclass(slots=True, frozen=True)
class _Cancel:
    request_id: str


_STOP = object()


class EngineThread:
    """Runs `LLMEngine.step()` in a dedicated thread. `submit`/`cancel` are thread-safe; `sink` receives the
    events of each step (from the engine thread: the caller hands them to its event loop).

    The engine is built inside the thread by `build`, so that every torch op of the engine (the KV cache's
    allocation included) runs in one OS thread: when two threads share the work, libgomp keeps a thread pool
    per thread and the steps ran 20-30% slower on 1.5 of 2 cores (measured on the bench machine)."""

    def __init__(
        self,
        build: Callable[[], LLMEngine],
        sink: Callable[[list[Event]], None],
        on_death: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.build = build
        self.engine: LLMEngine | None = None
        self.sink = sink
        self.on_death = on_death
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llmbus-engine", daemon=True)
        self._built = threading.Event()
        self._build_error: BaseException | None = None

    def start(self) -> LLMEngine:
        """Start the thread and wait until its engine is built (blocking: call it off the event loop)."""
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        assert self.engine is not None
        return self.engine

    def submit(self, request: Intake) -> None:
        """A `Sequence`, or a callable that builds one (or a `Failed`) in the engine thread: tokenizing then runs
        off the caller's event loop."""
        self.inbox.put(_Submit(request))

    def set_threads(self, threads: int) -> None:
        self.inbox.put(_SetThreads(threads))

    def cancel(self, request_id: str) -> None:
        self.inbox.put(_Cancel(request_id))

    def stop(self, timeout: float | None = None) -> None:
        self.inbox.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.engine = self.build()
        except BaseException as exc:
            self._build_error = exc
            return
        finally:
            self._built.set()
        try:
            self._loop(self.engine)
        except BaseException as exc:  # outside the step phases: the engine cannot go on
            log.critical("engine thread died:\n%s", traceback.format_exc())
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        try:
            self.sink(self.engine.fail_all(500, f"internal engine error: {exc!r}"))
        except BaseException:
            log.exception("could not fail the requests the dead engine held")
        if self.on_death is not None:
            self.on_death(exc)

    def _loop(self, engine: LLMEngine) -> None:
        while True:
            events: list[Event] = []
            idle = not engine.has_work()
            if not self._take(events, block=idle):
                break
            if idle and engine.has_work() and engine.config.max_wait_ms > 0:
                deadline = time.monotonic() + engine.config.max_wait_ms / 1000
                while engine.num_waiting < engine.config.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._flush(events)  # `Accepted` goes out at once, not after the wait
                    if not self._take(events, block=True, timeout=left):
                        return
            for phase in (engine.expire, engine.prefill, engine.decode):
                try:
                    events += phase()
                except Exception as exc:  # a bug must not kill the worker: fail what is in flight and go on
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    events += engine.fail_all(500, f"internal engine error: {exc!r}")
                if events:
                    self.sink(events)
                    events = []

    def _flush(self, events: list[Event]) -> None:
        if events:
            self.sink(list(events))
            events.clear()

    def _admit(self, request: Intake) -> Event:
        seq = request if isinstance(request, Sequence) else request()
        if isinstance(seq, Failed):
            return seq
        failed = self.engine.add_request(seq)
        return failed or Accepted(seq.request_id)

    def _take(self, events: list[Event], block: bool, timeout: float | None = None) -> bool:
        """Apply every queued command (waiting for one if `block`); False once asked to stop."""
        try:
            command = self.inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if command is _STOP:
                return False
            if isinstance(command, _Submit):
                events.append(self._admit(command.request))
            elif isinstance(command, _SetThreads):
                torch.set_num_threads(command.threads)
            elif isinstance(command, _Cancel) and (seq := self.engine.cancel(command.request_id)) is not None:
                events.append(Finished.of(seq))
            try:
                command = self.inbox.get_nowait()
            except queue.Empty:
                return True
