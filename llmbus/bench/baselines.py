"""The in-process baselines, measured before any worker starts so that nothing competes for the cores:
the eager ceiling at each batch size of the sweep, the prefill time of the 1-client prompts, the naive baseline.

With `--rounds N` (N > 1) the eager ceiling is measured again in every round, beside the targets and in the same
alternating order (`sweep.measure_points`), while the stack waits idle between points: a shared machine's speed
drifts over the minutes between the baselines and the points, and a ratio to a ceiling measured minutes earlier
carries that drift. The ratios then use the ceiling of the rounds; the one measured before the stack stays in
bench.json beside it (`Baselines.ceiling_before_stack`)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmbus.bench.eager import EagerModel, decode_loop, generate, prefill_seconds
from llmbus.bench.options import BenchOptions, progress
from llmbus.bench.stats import percentile
from llmbus.bench.workload import requests_per_client

CEILING_METHODS = {
    "hf": "the transformers eager decode loop: model(...) with a DynamicCache, left-padded prefill with an attention "
    "mask, then timed greedy decode steps of the whole batch, in-process, no bus and no scheduler",
}


@dataclass(slots=True)
class CeilingPoint:
    """`tokens_per_s` = batch * steps / seconds (wall time of the timed decode steps). `tokens_per_s_median_step`
    = batch / median step time: the same on a quiet machine, higher when other processes took the cores for part
    of the loop (`disturbed`). The ratios use `ceiling_tokens_per_s`, the higher of the two: noise can only lower
    a ceiling, so taking the higher one never makes a target easier to meet."""

    batch: int
    steps: int
    seconds: float
    tokens_per_s: float
    median_step_s: float
    tokens_per_s_median_step: float
    ceiling_tokens_per_s: float
    disturbed: bool
    time_capped: bool
    method: str
    load_average_1m: float
    rounds: int = 1  # `--rounds N`: the rounds merged into this point (`rounds.merge_ceilings`)
    beside_the_stack: bool = False  # measured in the sweep's rounds, the stack idle, not before the stack started
    step_times_s: list[float] = field(default_factory=list)  # for merging rounds; not written to bench.json


@dataclass(slots=True)
class PrefillResult:
    """`p50_s`: the whole prompt (what the TTFT target compares with). `suffix_p50_s`: only the tokens after the
    shared chat-template prefix, on top of that prefix's KV: the work left to a worker whose prefix cache holds
    the prefix (a diagnostic)."""

    p50_s: float
    samples_s: list[float]
    prompt_tokens: list[int]
    suffix_p50_s: float
    prefix_tokens: list[int]
    method: str = (
        "transformers model(...) forward, batch 1, logits_to_keep=1; per prompt the fastest of 5 runs (the least "
        "disturbed by other processes, so the TTFT target is never easier to meet because of noise); p50 over prompts"
    )


@dataclass(slots=True)
class NaiveResult:
    requests: int
    threads: int
    completion_tokens: int
    seconds: float
    tokens_per_s: float
    method: str = "model.generate(max_new_tokens, do_sample=False) per request, N at a time in threads"


@dataclass(slots=True)
class Baselines:
    ceiling_method: str
    ceiling_description: str
    ceiling: list[CeilingPoint]
    prefill: PrefillResult
    naive: NaiveResult
    seconds: float
    model: str = ""
    device: str = ""
    dtype: str = ""
    torch_threads: int = 0
    ceiling_before_stack: list[CeilingPoint] = field(default_factory=list)  # when `ceiling` is the rounds' one


@dataclass(slots=True)
class CeilingMeter:
    """The eager ceiling at any batch of the workload's prompts, on one loaded model: before the stack starts, and
    with `--rounds N` once more in each round of the sweep."""

    model: EagerModel
    encoded: list[list[int]]
    max_tokens: int
    time_cap: float
    method: str

    def measure(self, batch: int, beside_the_stack: bool = False, stop: threading.Event | None = None) -> CeilingPoint:
        """`stop` ends the loop after its current step (a bench stopped while this runs in a thread)."""
        prompts = [self.encoded[i % len(self.encoded)] for i in range(batch)]
        decode_loop(self.model, prompts, min(8, self.max_tokens), self.time_cap, stop)  # warm-up at this shape
        times, _ = decode_loop(self.model, prompts, self.max_tokens, self.time_cap, stop)
        release_cached_memory(self.model.device)
        point = ceiling_point(batch, times, self.method, capped=len(times) < self.max_tokens)
        point.beside_the_stack = beside_the_stack
        progress(
            f"eager ceiling batch {batch}: {point.tokens_per_s:.1f} tok/s ({point.steps} steps in "
            f"{point.seconds:.2f} s; by median step {point.tokens_per_s_median_step:.1f} tok/s; "
            f"load {point.load_average_1m:.2f})"
        )
        return point


def release_cached_memory(device: object) -> None:
    """On CUDA, give the loop's cache back to the driver: the workers beside it plan their memory on what is free."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.empty_cache()


def measure_baselines(opts: BenchOptions, prompts: list[str]) -> tuple[Baselines, CeilingMeter]:
    """The baselines, and the meter that measured the ceiling (its model stays loaded while the caller keeps it)."""
    import torch
    from transformers.utils import logging as hf_logging

    from inference_worker.hardware import pick_threads

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    torch.set_num_threads(pick_threads())
    m = EagerModel.load(opts.model, opts.device, opts.dtype)
    dtype = str(m.dtype).removeprefix("torch.")
    progress(f"model loaded: {m.name} on {m.device} ({dtype}), {torch.get_num_threads()} threads")
    with_prefix = [m.encode(p) for p in prompts]
    encoded = [ids for ids, _ in with_prefix]
    meter = CeilingMeter(m, encoded, opts.max_tokens, opts.baseline_time_cap, opts.ceiling)
    ceiling = [meter.measure(batch) for batch in opts.concurrency]
    first = opts.concurrency[0]
    count = requests_per_client(opts.requests_per_client, opts.min_requests, first) if first == 1 else 1
    prefill = measure_prefill(m, [with_prefix[i % len(with_prefix)] for i in range(count)])
    progress(
        f"in-process prefill p50 {prefill.p50_s * 1000:.1f} ms over {len(prefill.samples_s)} prompts "
        f"({prefill.suffix_p50_s * 1000:.1f} ms after a cached shared prefix)"
    )
    naive = measure_naive(m, encoded, opts)
    threads = torch.get_num_threads()
    baselines = Baselines(
        opts.ceiling,
        CEILING_METHODS[opts.ceiling],
        ceiling,
        prefill,
        naive,
        time.perf_counter() - started,
        m.name,
        str(m.device),
        dtype,
        threads,
    )
    return baselines, meter


def ceiling_point(batch: int, step_times: list[float], method: str, capped: bool) -> CeilingPoint:
    seconds, median = sum(step_times), percentile(step_times, 50)
    wall, by_median = batch * len(step_times) / seconds, batch / median
    return CeilingPoint(
        batch=batch,
        steps=len(step_times),
        seconds=seconds,
        tokens_per_s=wall,
        median_step_s=median,
        tokens_per_s_median_step=by_median,
        ceiling_tokens_per_s=max(wall, by_median),
        disturbed=wall < 0.8 * by_median,
        time_capped=capped,
        method=method,
        load_average_1m=os.getloadavg()[0],
        step_times_s=list(step_times),
    )


def measure_prefill(m: EagerModel, prompts: list[tuple[list[int], int]], repeats: int = 5) -> PrefillResult:
    """Fastest of `repeats` timed prefills per (prompt ids, shared prefix length), then the p50 over prompts."""

    def fastest(ids: list[int], skip: int) -> float:
        return min(prefill_seconds(m, ids, skip) for _ in range(repeats))

    for ids, _ in prompts[:2]:
        prefill_seconds(m, ids, 0)  # warm-up
    whole = [fastest(ids, 0) for ids, _ in prompts]
    suffix = [fastest(ids, prefix) for ids, prefix in prompts]
    return PrefillResult(
        percentile(whole, 50),
        whole,
        [len(ids) for ids, _ in prompts],
        percentile(suffix, 50),
        [prefix for _, prefix in prompts],
    )


def measure_naive(m: EagerModel, encoded: list[list[int]], opts: BenchOptions) -> NaiveResult:
    generate(m, encoded[0], 4, opts.baseline_time_cap)  # warm-up
    requests = [encoded[i % len(encoded)] for i in range(opts.naive_requests)]

    def one(ids: list[int]) -> int:
        return len(generate(m, ids, opts.max_tokens, opts.baseline_time_cap))

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=opts.naive_threads) as pool:
        tokens = sum(pool.map(one, requests))
    seconds = time.perf_counter() - start
    result = NaiveResult(len(requests), opts.naive_threads, tokens, seconds, tokens / seconds)
    progress(
        f"naive baseline: {result.tokens_per_s:.1f} tok/s ({tokens} tokens, {len(requests)} requests, {seconds:.1f}s)"
    )
    return result
