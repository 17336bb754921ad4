"""`llmbus bench`: throughput and latency of llmbus over NATS, against in-process baselines measured in the same run.

Phases (progress on stderr, one line each):
1. In this process, before any worker starts (so nothing competes for the cores): load the model, then measure
   the engine ceiling (a pure batched greedy decode loop at each batch size of the sweep, no bus, no scheduler),
   the in-process prefill time of the prompts the 1-client point sends, and the naive baseline in the seed's
   style (one `model.generate` per request, 8 at a time in threads, no cross-request batching). Then free it.
2. Start an embedded nats-server and `--workers N` worker processes (unless `--nats-url`), wait until N workers
   answer `$SRV.PING.llm-inference`, warm them up.
3. For each concurrency C: C clients in a closed loop send streaming chat requests (greedy, fixed `max_tokens`)
   on raw NATS inboxes; time to first token and inter-token gaps come from chunk arrival times.
4. Print the ratios against the targets (PASS/MISS), write `bench.json` and `bench.png` under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus_gateway.client import BusClient
from llmbus.nats_server import NatsServer, NatsServerError
from schemas import SERVICE_NAME, ChatChunk, ChatRequest, Subjects, encode
from schemas.subjects import ERROR, ERROR_CODE, REQUEST_ID, STREAM, STREAM_END

PROMPTS: tuple[str, ...] = (
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a refrigerator keeps food cold.",
    "Write a story about a robot that learns to paint.",
    "Explain in detail how the human heart pumps blood through the body.",
    "Describe, step by step, how to bake a loaf of bread at home.",
    "Write a story about two friends who get lost in a forest at night.",
    "Explain in detail why the sky is blue during the day and red at sunset.",
    "Write a letter from a sailor to his family describing a storm at sea.",
    "Explain in detail how a bill becomes a law.",
    "Write a story about a cat who becomes the mayor of a small town.",
    "Describe the water cycle and explain each of its stages.",
    "Write a story about a girl who discovers a hidden door in her grandmother's house.",
    "Explain in detail how vaccines train the immune system.",
    "Write a travel guide for a weekend in a city by the sea.",
    "Explain in detail how a computer runs a program, from the source code to the processor.",
    "Write a story about an astronaut who hears music on the Moon.",
    "Describe the life of a honeybee from egg to adult.",
    "Explain in detail how photosynthesis works in plants.",
    "Write a story about a baker who bakes bread that grants wishes.",
    "Explain the causes and effects of the Industrial Revolution.",
    "Write a story about a dragon who is afraid of fire.",
    "Explain in detail how the internet sends a message from one computer to another.",
    "Describe how to plan and plant a vegetable garden.",
    "Write a story about a detective who solves a mystery in a train.",
    "Explain in detail how earthquakes happen and how scientists measure them.",
    "Write a story about a village where it never stops snowing.",
    "Explain in detail how money and banks work.",
    "Write a diary of a week in the life of a medieval knight.",
    "Explain in detail how an airplane stays in the air.",
    "Write a story about a boy who can talk to the wind.",
    "Describe the history of the bicycle and how it changed cities.",
    "Explain in detail how the seasons change during the year.",
)

TARGETS = {
    "throughput_vs_ceiling": (">=", 0.8),
    "throughput_vs_naive": (">=", 15.0),
    "ttft_vs_prefill": ("<=", 1.3),
    "ttft_vs_e2e": ("<", 0.25),
}


# --- options ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class BenchOptions:
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    max_tokens: int = 128
    requests_per_client: int = 2
    min_requests: int = 8
    point_time_cap: float = 120.0
    request_timeout: float = 300.0
    workers: int = 1
    worker_threads: int = 0
    nats_url: str | None = None
    subject_prefix: str = "llm"
    out: Path = Path("bench-results")
    skip_baselines: bool = False
    ceiling: str = "hf"
    naive_requests: int = 8
    naive_threads: int = 8
    baseline_time_cap: float = 60.0
    warmup_requests: int = 8
    ready_timeout: float = 180.0
    seed: int = 0
    model: str | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmbus bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = BenchOptions()
    p.add_argument("--concurrency", type=_int_list, default=d.concurrency, help="client counts, comma-separated")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="max_tokens of every request")
    p.add_argument("--requests-per-client", type=int, default=d.requests_per_client, help="requests each client sends")
    p.add_argument("--min-requests", type=int, default=d.min_requests, help="at least this many requests per point")
    p.add_argument("--point-time-cap", type=float, default=d.point_time_cap, help="seconds; then no new requests")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds one request may take")
    p.add_argument("--workers", type=int, default=d.workers, help="workers to start (--nats-url: to wait for)")
    p.add_argument("--worker-threads", type=int, default=d.worker_threads, help="torch threads per worker (0: cores/N)")
    p.add_argument("--nats-url", default=None, help="use this NATS server and its workers instead of starting a stack")
    p.add_argument("--subject-prefix", default=d.subject_prefix, help="subject prefix of the workers (<prefix>.chat)")
    p.add_argument("--out", type=Path, default=d.out, help="directory for bench.json and bench.png")
    p.add_argument("--skip-baselines", action="store_true", help="skip the in-process ceiling/prefill/naive phase")
    p.add_argument(
        "--ceiling",
        choices=["hf", "runner", "best"],
        default=d.ceiling,
        help="engine-ceiling loop: hf (transformers DynamicCache), runner (our ModelRunner), best (both, faster wins)",
    )
    p.add_argument(
        "--naive-requests",
        type=int,
        default=d.naive_requests,
        help="requests of the naive baseline (default: one per thread)",
    )
    p.add_argument("--naive-threads", type=int, default=d.naive_threads, help="threads of the naive baseline")
    p.add_argument(
        "--baseline-time-cap",
        type=float,
        default=d.baseline_time_cap,
        help="seconds each ceiling loop and the naive baseline may take (fewer steps/tokens past it)",
    )
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests, help="untimed requests before the sweep")
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout, help="seconds to wait for the workers")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the prompt order")
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    return p


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, comma-separated, e.g. 1,8,32,64")
    return sorted(set(values))


def parse_options(argv: Sequence[str]) -> BenchOptions:
    args = build_parser().parse_args(list(argv))
    return BenchOptions(**{name: getattr(args, name) for name in BenchOptions.__slots__})


def progress(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


# --- workload --------------------------------------------------------------------------------------------------


def workload(seed: int) -> list[str]:
    """The prompts in a seeded order: request j of client c gets `prompt_for(order, c, j, C)`."""
    order = list(PROMPTS)
    random.Random(seed).shuffle(order)
    return order


def requests_per_client(opts: BenchOptions, concurrency: int) -> int:
    return max(opts.requests_per_client, math.ceil(opts.min_requests / concurrency))


def prompt_for(prompts: list[str], client: int, j: int, concurrency: int) -> str:
    return prompts[(client + j * concurrency) % len(prompts)]


def chat_turns(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


# --- in-process baselines --------------------------------------------------------------------------------------


@dataclass(slots=True)
class CeilingPoint:
    """`tokens_per_s` = batch * steps / seconds (wall time of the timed decode steps). `tokens_per_s_median_step`
    = batch / median step time: the same on a quiet machine, higher when other processes took the cores for part
    of the loop (`disturbed`). The ratio uses `ceiling_tokens_per_s`, the higher of the two: noise can only lower
    a ceiling, so taking the higher one never makes the target easier to meet."""

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


CEILING_METHODS = {
    "hf": "transformers model(...) with a DynamicCache: left-padded prefill with an attention mask, then timed "
    "greedy decode steps of the whole batch",
    "runner": "inference_worker ModelRunner (the engine's slot KV cache) without scheduler or sampler: one prefill, "
    "then timed greedy decode steps of the whole batch",
    "best": "both hf and runner; per batch size the faster one is the ceiling",
}


@dataclass(slots=True)
class Baselines:
    ceiling_method: str
    ceiling_description: str
    ceiling: list[CeilingPoint]
    prefill: PrefillResult
    naive: NaiveResult
    seconds: float


def measure_baselines(opts: BenchOptions, prompts: list[str]) -> Baselines:
    import torch
    from transformers.utils import logging as hf_logging

    from inference_worker.hardware import pick_threads
    from inference_worker.model_loader import load_model

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    torch.set_num_threads(pick_threads())
    loaded = load_model(opts.model)
    progress(f"model loaded: {loaded.name} on {loaded.device} ({loaded.dtype}), {torch.get_num_threads()} threads")
    with_prefix = [loaded.encode_chat_with_prefix(chat_turns(p)) for p in prompts]
    encoded = [ids for ids, _ in with_prefix]
    ceiling = measure_ceiling(loaded, encoded, opts)
    first_point = requests_per_client(opts, opts.concurrency[0]) if opts.concurrency[0] == 1 else 1
    prefill = measure_prefill(loaded, [with_prefix[i % len(with_prefix)] for i in range(first_point)])
    progress(
        f"in-process prefill p50 {prefill.p50_s * 1000:.1f} ms over {len(prefill.samples_s)} prompts "
        f"({prefill.suffix_p50_s * 1000:.1f} ms after a cached shared prefix)"
    )
    naive = measure_naive(loaded, encoded, opts)
    del loaded
    gc.collect()
    seconds = time.perf_counter() - started
    return Baselines(opts.ceiling, CEILING_METHODS[opts.ceiling], ceiling, prefill, naive, seconds)


def measure_ceiling(loaded: Any, encoded: list[list[int]], opts: BenchOptions) -> list[CeilingPoint]:
    methods = {"hf": [hf_decode_loop], "runner": [runner_decode_loop], "best": [hf_decode_loop, runner_decode_loop]}
    loops = methods[opts.ceiling]
    points = []
    for batch in opts.concurrency:
        batch_prompts = [encoded[i % len(encoded)] for i in range(batch)]
        results = []
        for loop in loops:
            loop(loaded, batch_prompts, min(8, opts.max_tokens), opts.baseline_time_cap)  # warm-up at this shape
            times = loop(loaded, batch_prompts, opts.max_tokens, opts.baseline_time_cap)
            name = "hf" if loop is hf_decode_loop else "runner"
            point = ceiling_point(batch, times, name, capped=len(times) < opts.max_tokens)
            results.append(point)
            progress(
                f"ceiling ({name}) batch {batch}: {point.tokens_per_s:.1f} tok/s ({point.steps} steps in "
                f"{point.seconds:.2f} s; by median step {point.tokens_per_s_median_step:.1f} tok/s; "
                f"load {point.load_average_1m:.2f})"
            )
        points.append(max(results, key=lambda p: p.ceiling_tokens_per_s))
    return points


def ceiling_point(batch: int, step_times: list[float], method: str, capped: bool) -> CeilingPoint:
    seconds, median = sum(step_times), _percentile(step_times, 50)
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
    )


def hf_decode_loop(loaded: Any, prompts: list[list[int]], steps: int, time_cap: float) -> list[float]:
    """Left-padded prefill with an attention mask into a transformers DynamicCache, then `steps` timed greedy
    decode forwards of the whole batch (fewer once `time_cap` seconds have passed). Returns each step's time."""
    import torch
    from transformers import DynamicCache

    model, device = loaded.model, loaded.device
    pad = loaded.tokenizer.pad_token_id or 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ones = torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)
        _sync(device)
        times: list[float] = []
        for _ in range(steps):
            if sum(times) > time_cap:
                break
            start = time.perf_counter()
            mask = torch.cat([mask, ones], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            times.append(time.perf_counter() - start)
        return times


def runner_decode_loop(loaded: Any, prompts: list[list[int]], steps: int, time_cap: float) -> list[float]:
    """The engine's own ModelRunner (slot KV cache) without scheduler or sampler: one prefill, `steps` timed
    greedy decode forwards (fewer once `time_cap` seconds have passed). Returns each step's time."""
    from inference_worker.model_runner import ModelRunner

    runner = ModelRunner(loaded, len(prompts), max(map(len, prompts)) + steps + 1)
    logits = runner.forward(0, prompts, [0] * len(prompts))
    tokens = logits.argmax(-1).tolist()
    lengths = [len(p) for p in prompts]
    times: list[float] = []
    for _ in range(steps):
        if sum(times) > time_cap:
            break
        start = time.perf_counter()
        logits = runner.forward(0, [[t] for t in tokens], lengths)
        lengths = [n + 1 for n in lengths]
        tokens = logits.argmax(-1).tolist()
        times.append(time.perf_counter() - start)
    return times


def measure_prefill(loaded: Any, prompts: list[tuple[list[int], int]], repeats: int = 5) -> PrefillResult:
    """Fastest of `repeats` timed prefills per (prompt ids, shared prefix length), then the p50 over prompts."""
    import torch
    from transformers import DynamicCache

    def once(ids: list[int], skip: int) -> float:
        with torch.inference_mode():
            cache = DynamicCache(config=loaded.model.config)
            if skip:
                loaded.model(input_ids=torch.tensor([ids[:skip]], device=loaded.device), cache=cache, logits_to_keep=1)
            tensor = torch.tensor([ids[skip:]], device=loaded.device)
            _sync(loaded.device)
            start = time.perf_counter()
            out = loaded.model(input_ids=tensor, cache=cache, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).tolist()
            return time.perf_counter() - start

    def fastest(ids: list[int], skip: int) -> float:
        return min(once(ids, skip) for _ in range(repeats))

    for ids, _ in prompts[:2]:
        once(ids, 0)  # warm-up
    whole = [fastest(ids, 0) for ids, _ in prompts]
    suffix = [fastest(ids, prefix) for ids, prefix in prompts]
    return PrefillResult(
        _percentile(whole, 50),
        whole,
        [len(ids) for ids, _ in prompts],
        _percentile(suffix, 50),
        [prefix for _, prefix in prompts],
    )


def measure_naive(loaded: Any, encoded: list[list[int]], opts: BenchOptions) -> NaiveResult:
    import torch

    model, device = loaded.model, loaded.device
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        pad = next(iter(loaded.eos_token_ids))

    def generate(ids: list[int], max_new_tokens: int) -> int:
        tensor = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=tensor,
                attention_mask=torch.ones_like(tensor),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                max_time=opts.baseline_time_cap,
            )
        new = out[0, len(ids) :].tolist()
        ends = [i for i, t in enumerate(new) if t in loaded.eos_token_ids]
        return ends[0] + 1 if ends else len(new)

    generate(encoded[0], 4)  # warm-up
    requests = [encoded[i % len(encoded)] for i in range(opts.naive_requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=opts.naive_threads) as pool:
        tokens = sum(pool.map(lambda ids: generate(ids, opts.max_tokens), requests))
    seconds = time.perf_counter() - start
    result = NaiveResult(len(requests), opts.naive_threads, tokens, seconds, tokens / seconds)
    progress(
        f"naive baseline: {result.tokens_per_s:.1f} tok/s ({tokens} tokens, {len(requests)} requests, {seconds:.1f}s)"
    )
    return result


def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


# --- the stack -------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """An embedded nats-server and N `llmbus worker` processes, or just the URL of an existing server."""

    opts: BenchOptions
    server: NatsServer | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    url: str = ""

    def start(self) -> Stack:
        if self.opts.nats_url:
            self.url = self.opts.nats_url
            return self
        self.server = NatsServer().start()
        self.url = self.server.url
        progress(f"nats-server on {self.url}")
        self.opts.out.mkdir(parents=True, exist_ok=True)
        for index in range(self.opts.workers):
            log_path = self.opts.out / f"worker-{index}.log"
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    self.worker_command(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
                )
            self.procs.append(proc)
            progress(f"worker {index} started (pid {proc.pid}, log {log_path})")
        return self

    def worker_threads(self) -> int:
        if self.opts.worker_threads > 0:
            return self.opts.worker_threads
        return max(1, len(os.sched_getaffinity(0)) // self.opts.workers)

    def worker_command(self) -> list[str]:
        command = [sys.executable, "-m", "llmbus.cli", "worker", "--nats-url", self.url]
        command += ["--subject-prefix", self.opts.subject_prefix]
        command += ["--max-batch-size", str(max(self.opts.concurrency))]
        command += ["--max-pending", str(max(256, 2 * max(self.opts.concurrency)))]
        command += ["--max-tokens-cap", str(max(1024, self.opts.max_tokens))]
        command += ["--threads", str(self.worker_threads()), "--log-level", "WARNING"]
        if self.opts.model:
            command += ["--model", self.opts.model]
        return command

    def worker_cpu_seconds(self) -> float | None:
        """User + system CPU seconds the worker processes used so far (None without our own workers)."""
        if not self.procs:
            return None
        return sum(_process_cpu_seconds(proc.pid) for proc in self.procs)

    def check_alive(self) -> None:
        for index, proc in enumerate(self.procs):
            if proc.poll() is not None:
                log_path = self.opts.out / f"worker-{index}.log"
                raise BenchError(f"worker {index} exited with code {proc.returncode}; see {log_path}")

    def stop(self, timeout: float = 30.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                progress(f"worker pid {proc.pid} did not stop in {timeout:.0f}s; killing it")
                proc.kill()
                proc.wait()
        self.procs = []
        if self.server is not None:
            self.server.stop()
            self.server = None


class BenchError(RuntimeError):
    pass


def _process_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_for_workers(nc: NATS, stack: Stack, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        stack.check_alive()
        seen = {str(reply.get("id")) for reply in await BusClient(nc).ping()}
        if len(seen) >= count:
            return len(seen)
    raise BenchError(f"{len(seen)} of {count} workers answered $SRV.PING.{SERVICE_NAME} after {timeout:.0f}s")


# --- clients ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    sent: float
    first: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


async def stream_request(nc: NATS, subject: str, prompt: str, max_tokens: int, timeout: float) -> RequestRecord:
    """One streaming chat request on its own inbox; returns its chunk arrival times and usage."""
    done = asyncio.Event()
    request_id = uuid.uuid4().hex
    record = RequestRecord(sent=0.0)

    async def on_message(msg: Msg) -> None:
        now = time.perf_counter()
        if record.first is None:
            record.first = now
        headers = msg.headers or {}
        if headers.get("Status") == "503" and not msg.data:
            record.error = "no responders"
        elif ERROR_CODE in headers:
            record.error = f"{headers[ERROR_CODE]} {headers.get(ERROR, '')}".strip()
        elif headers.get(STREAM) == STREAM_END:
            chunk = msgspec.json.decode(msg.data, type=ChatChunk)
            record.completion_tokens = chunk.usage.completion_tokens if chunk.usage else 0
            record.finish_reason = chunk.finish_reason
        else:
            record.chunk_times.append(now)
            return
        record.end = now
        done.set()

    request = ChatRequest(
        chat_id=request_id, user_prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True, timeout=timeout
    )
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_message)
    try:
        record.sent = time.perf_counter()
        await nc.publish(subject, encode(request), reply=inbox, headers={REQUEST_ID: request_id})
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            record.error = f"no end of stream after {timeout:.0f}s"
    finally:
        await sub.unsubscribe()
    return record


@dataclass(slots=True)
class PointResult:
    concurrency: int
    requests: int
    errors: int
    error_samples: list[str]
    completion_tokens: int
    mean_completion_tokens: float
    finish_reasons: dict[str, int]
    wall_s: float
    time_capped: bool
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_s: float
    itl_p95_s: float
    e2e_p50_s: float
    e2e_p95_s: float
    engine_decode_steps: int = 0
    engine_mean_decode_batch: float = math.nan
    engine_prefill_forwards: int = 0
    engine_prompt_tokens: int = 0
    engine_prefix_tokens_reused: int = 0
    client_cpu_s: float = math.nan
    worker_cpu_s: float | None = None
    load_average_1m: float = math.nan


@dataclass(slots=True)
class EngineCounters:
    """Summed over the workers, from `$SRV.STATS`: what the engines did during one point."""

    decode_steps: int = 0
    decode_tokens: int = 0
    prefill_forwards: int = 0
    prompt_tokens: int = 0
    prefix_tokens_reused: int = 0

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_tokens / self.decode_steps if self.decode_steps else math.nan

    def minus(self, before: EngineCounters) -> EngineCounters:
        return EngineCounters(
            self.decode_steps - before.decode_steps,
            self.decode_tokens - before.decode_tokens,
            self.prefill_forwards - before.prefill_forwards,
            self.prompt_tokens - before.prompt_tokens,
            self.prefix_tokens_reused - before.prefix_tokens_reused,
        )


async def engine_counters(nc: NATS) -> EngineCounters:
    total = EngineCounters()
    for answer in await BusClient(nc).stats():
        endpoints = answer.get("endpoints") or [{}]
        data = endpoints[0].get("data") or {}
        batches = data.get("decode_batch_sizes", {})
        total.decode_steps += int(data.get("decode_steps", 0))
        total.decode_tokens += sum(int(size) * int(count) for size, count in batches.items())
        total.prefill_forwards += int(data.get("prefill_forwards", 0))
        total.prompt_tokens += int(data.get("prompt_tokens", 0))
        total.prefix_tokens_reused += int(data.get("prefix_tokens_reused", 0))
    return total


async def run_point(
    nc: NATS, subject: str, prompts: list[str], concurrency: int, per_client: int, opts: BenchOptions
) -> PointResult:
    records: list[RequestRecord] = []
    start = time.perf_counter()
    cap = start + opts.point_time_cap
    capped = False

    async def client(index: int) -> None:
        nonlocal capped
        for j in range(per_client):
            if time.perf_counter() >= cap:
                capped = True
                return
            prompt = prompt_for(prompts, index, j, concurrency)
            records.append(await stream_request(nc, subject, prompt, opts.max_tokens, opts.request_timeout))

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return summarize(concurrency, records, time.perf_counter() - start, capped)


def summarize(concurrency: int, records: list[RequestRecord], wall: float, capped: bool) -> PointResult:
    ok = [r for r in records if r.error is None and r.end is not None]
    errors = [r.error or "?" for r in records if r not in ok]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    e2e = [r.end - r.sent for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    reasons: dict[str, int] = {}
    for r in ok:
        reasons[r.finish_reason or "?"] = reasons.get(r.finish_reason or "?", 0) + 1
    return PointResult(
        concurrency=concurrency,
        requests=len(ok),
        errors=len(errors),
        error_samples=sorted(set(errors))[:5],
        completion_tokens=tokens,
        mean_completion_tokens=tokens / len(ok) if ok else 0.0,
        finish_reasons=reasons,
        wall_s=wall,
        time_capped=capped,
        tokens_per_s=tokens / wall,
        requests_per_s=len(ok) / wall,
        ttft_p50_s=_percentile(ttft, 50),
        ttft_p95_s=_percentile(ttft, 95),
        itl_p50_s=_percentile(gaps, 50),
        itl_p95_s=_percentile(gaps, 95),
        e2e_p50_s=_percentile(e2e, 50),
        e2e_p95_s=_percentile(e2e, 95),
    )


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(slots=True)
class BusRun:
    workers_seen: int
    warmup_s: float
    points: list[PointResult]


async def bench_over_bus(opts: BenchOptions, stack: Stack, prompts: list[str]) -> BusRun:
    nc = await nats.connect(stack.url, name="llmbus-bench", connect_timeout=5, max_reconnect_attempts=3)
    try:
        expected = opts.workers
        progress(f"waiting for {expected} worker(s) to answer $SRV.PING.{SERVICE_NAME}")
        seen = await wait_for_workers(nc, stack, expected, opts.ready_timeout)
        progress(f"{seen} worker(s) ready")
        subject = Subjects(opts.subject_prefix).chat
        warmup_s = await warm_up(nc, subject, prompts, opts)
        points = []
        for concurrency in opts.concurrency:
            per_client = requests_per_client(opts, concurrency)
            progress(f"concurrency {concurrency}: {concurrency * per_client} requests ({per_client} per client)")
            before, client_cpu, worker_cpu = await engine_counters(nc), time.process_time(), stack.worker_cpu_seconds()
            point = await run_point(nc, subject, prompts, concurrency, per_client, opts)
            point.client_cpu_s = time.process_time() - client_cpu
            if worker_cpu is not None:
                point.worker_cpu_s = stack.worker_cpu_seconds() - worker_cpu
            point.load_average_1m = os.getloadavg()[0]
            during = (await engine_counters(nc)).minus(before)
            point.engine_decode_steps = during.decode_steps
            point.engine_mean_decode_batch = during.mean_decode_batch
            point.engine_prefill_forwards = during.prefill_forwards
            point.engine_prompt_tokens = during.prompt_tokens
            point.engine_prefix_tokens_reused = during.prefix_tokens_reused
            stack.check_alive()
            points.append(point)
            progress(describe_point(point))
        return BusRun(seen, warmup_s, points)
    finally:
        await nc.close()


async def warm_up(nc: NATS, subject: str, prompts: list[str], opts: BenchOptions) -> float:
    """Untimed requests so that the workers' first forwards (allocation, kernel selection) are not measured."""
    if opts.warmup_requests < 1:
        return 0.0
    start = time.perf_counter()
    count = max(opts.warmup_requests, 2 * opts.workers)
    records = await asyncio.gather(
        *(stream_request(nc, subject, prompts[i % len(prompts)], 8, opts.request_timeout) for i in range(count))
    )
    failed = [r.error for r in records if r.error]
    if failed:
        raise BenchError(f"{len(failed)} of {count} warm-up requests failed: {failed[0]}")
    seconds = time.perf_counter() - start
    progress(f"warm-up: {count} requests in {seconds:.1f} s")
    return seconds


def describe_point(p: PointResult) -> str:
    text = (
        f"concurrency {p.concurrency}: {p.tokens_per_s:.1f} tok/s, {p.requests_per_s:.2f} req/s, "
        f"TTFT p50/p95 {p.ttft_p50_s * 1000:.0f}/{p.ttft_p95_s * 1000:.0f} ms, "
        f"ITL p50/p95 {p.itl_p50_s * 1000:.0f}/{p.itl_p95_s * 1000:.0f} ms, "
        f"e2e p50/p95 {p.e2e_p50_s:.2f}/{p.e2e_p95_s:.2f} s ({p.requests} ok, {p.errors} errors, {p.wall_s:.1f} s); "
        f"engine: {p.engine_decode_steps} decode steps, mean batch {p.engine_mean_decode_batch:.1f}, "
        f"{p.engine_prefill_forwards} prefill forwards; CPU s: bench clients {p.client_cpu_s:.1f}, "
        f"workers {p.worker_cpu_s if p.worker_cpu_s is not None else math.nan:.1f}; load {p.load_average_1m:.2f}"
    )
    return text + (" [time cap reached]" if p.time_capped else "")


# --- ratios and report -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Ratio:
    name: str
    description: str
    value: float | None
    op: str
    target: float
    status: str


def compute_ratios(points: list[PointResult], baselines: Baselines | None) -> list[Ratio]:
    top = max(points, key=lambda p: p.concurrency)
    one = next((p for p in points if p.concurrency == 1), None)
    ceiling = None
    prefill = naive = None
    if baselines is not None:
        ceiling = next((c.ceiling_tokens_per_s for c in baselines.ceiling if c.batch == top.concurrency), None)
        prefill, naive = baselines.prefill.p50_s, baselines.naive.tokens_per_s
    c = top.concurrency
    values = {
        "throughput_vs_ceiling": (f"throughput@{c} / engine ceiling@{c}", _div(top.tokens_per_s, ceiling)),
        "throughput_vs_naive": (f"throughput@{c} / naive baseline", _div(top.tokens_per_s, naive)),
        "ttft_vs_prefill": ("TTFT p50@1 / in-process prefill p50", _div(one and one.ttft_p50_s, prefill)),
        "ttft_vs_e2e": ("TTFT p50@1 / end-to-end p50@1", _div(one and one.ttft_p50_s, one and one.e2e_p50_s)),
    }
    ratios = []
    for name, (description, value) in values.items():
        op, target = TARGETS[name]
        ratios.append(Ratio(name, description, value, op, target, _verdict(value, op, target)))
    return ratios


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _verdict(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "N/A"
    passed = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return "PASS" if passed else "MISS"


def diagnostics(points: list[PointResult], baselines: Baselines | None, load_before: float) -> list[str]:
    """Plain-language notes that help read the figures (noise from other processes, CPU use); no targets."""
    notes = []
    if load_before > 1.0:
        notes.append(
            f"the 1-minute load average was {load_before:.2f} when the bench started: other processes were using "
            "the cores, so every figure may be low and the ratios noisy"
        )
    for p in points:
        if p.worker_cpu_s is not None and p.wall_s > 0:
            notes.append(
                f"concurrency {p.concurrency}: workers used {p.worker_cpu_s / p.wall_s:.2f} cores, the bench's "
                f"clients {p.client_cpu_s / p.wall_s:.2f}; engine decode rate from ITL p50: "
                f"{p.concurrency / p.itl_p50_s if p.itl_p50_s else math.nan:.1f} tok/s"
            )
    if baselines is None:
        return notes
    for c in baselines.ceiling:
        if c.disturbed:
            notes.append(
                f"ceiling batch {c.batch}: {c.tokens_per_s:.1f} tok/s by wall time but "
                f"{c.tokens_per_s_median_step:.1f} by median step: other processes took the cores for part of the loop"
                " (the ratio uses the higher figure)"
            )
        if c.time_capped:
            notes.append(f"ceiling batch {c.batch}: stopped by the time cap after {c.steps} steps")
    one = next((p for p in points if p.concurrency == 1), None)
    if one is not None and baselines.prefill.suffix_p50_s > 0:
        notes.append(
            f"TTFT p50@1 / in-process prefill of the prompt after its shared prefix = "
            f"{one.ttft_p50_s / baselines.prefill.suffix_p50_s:.3f} (the worker's prefix cache reused "
            f"{one.engine_prefix_tokens_reused} prompt tokens of {one.engine_prompt_tokens} at that point)"
        )
    return notes


def machine_info() -> dict[str, Any]:
    import torch

    from inference_worker.hardware import cpu_flags, pick_device, pick_dtype, pick_threads

    device = pick_device()
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "cpu_bf16": sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"}),
        "torch_threads": pick_threads(),
        "device": str(device),
        "dtype": str(pick_dtype(device)).removeprefix("torch."),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_summary(run: BusRun, baselines: Baselines | None, ratios: list[Ratio], notes: list[str]) -> None:
    print("concurrency  tok/s    req/s  TTFT p50/p95 ms  ITL p50/p95 ms  e2e p50/p95 s  errors")
    for p in run.points:
        print(
            f"{p.concurrency:>11}  {p.tokens_per_s:>7.1f}  {p.requests_per_s:>5.2f}  "
            f"{p.ttft_p50_s * 1000:>7.0f}/{p.ttft_p95_s * 1000:<7.0f}  "
            f"{p.itl_p50_s * 1000:>6.0f}/{p.itl_p95_s * 1000:<7.0f}  "
            f"{p.e2e_p50_s:>6.2f}/{p.e2e_p95_s:<6.2f}  {p.errors}"
        )
    if baselines is not None:
        ceiling = ", ".join(f"{c.batch}: {c.ceiling_tokens_per_s:.1f}" for c in baselines.ceiling)
        print(f"engine ceiling tok/s by batch ({baselines.ceiling_method}): {ceiling}")
        print(f"in-process prefill p50: {baselines.prefill.p50_s * 1000:.1f} ms")
        print(f"naive baseline: {baselines.naive.tokens_per_s:.1f} tok/s")
    for r in ratios:
        value = "n/a" if r.value is None else f"{r.value:.3f}"
        print(f"{r.status:4}  {r.description} = {value} (target {r.op} {r.target})")
    for note in notes:
        print(f"note: {note}")


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=False) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _clean(value: Any) -> Any:
    """NaN (no samples) becomes null so the JSON stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def plot(path: Path, run: BusRun, baselines: Baselines | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p.concurrency for p in run.points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    left.plot(xs, [p.tokens_per_s for p in run.points], "o-", label="llmbus over NATS (streaming)")
    if baselines is not None:
        cx = [c.batch for c in baselines.ceiling]
        ceiling = [c.ceiling_tokens_per_s for c in baselines.ceiling]
        left.plot(cx, ceiling, "s--", label="engine ceiling (in-process batched decode)")
        left.axhline(
            baselines.naive.tokens_per_s,
            color="tab:red",
            linestyle=":",
            label=f"naive baseline (generate, {baselines.naive.threads} threads)",
        )
    left.set(xlabel="concurrent clients", ylabel="generated tokens/s", title="Throughput")
    right.plot(xs, [p.ttft_p50_s * 1000 for p in run.points], "o-", label="TTFT p50")
    right.plot(xs, [p.ttft_p95_s * 1000 for p in run.points], "^--", label="TTFT p95")
    if baselines is not None:
        right.axhline(baselines.prefill.p50_s * 1000, color="tab:gray", linestyle=":", label="in-process prefill p50")
    right.set(xlabel="concurrent clients", ylabel="milliseconds", title="Time to first token")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(sys.argv[1:] if argv is None else argv)
    started = time.time()
    load_before = os.getloadavg()
    prompts = workload(opts.seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    progress(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    baselines = None if opts.skip_baselines else measure_baselines(opts, prompts)
    stack = Stack(opts)
    try:
        stack.start()
        run = asyncio.run(bench_over_bus(opts, stack, prompts))
    except (BenchError, NatsServerError) as exc:
        progress(f"error: {exc}")
        return 1
    finally:
        stack.stop()
    ratios = compute_ratios(run.points, baselines)
    notes = diagnostics(run.points, baselines, load_before[0])
    print_summary(run, baselines, ratios, notes)
    report = build_report(opts, stack, prompts, baselines, run, ratios, notes)
    report["machine"]["load_average_before"] = load_before
    report["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
    report["duration_s"] = time.time() - started
    json_path, png_path = opts.out / "bench.json", opts.out / "bench.png"
    write_json(json_path, _clean(report))
    machine = report["machine"]
    title = (
        f"llmbus bench: {machine['device']} {machine['dtype']}, {opts.workers} worker(s), max_tokens {opts.max_tokens}"
    )
    plot(png_path, run, baselines, title)
    progress(f"wrote {json_path} and {png_path} ({report['duration_s']:.0f} s)")
    return 0


def build_report(
    opts: BenchOptions,
    stack: Stack,
    prompts: list[str],
    baselines: Baselines | None,
    run: BusRun,
    ratios: list[Ratio],
    notes: list[str],
) -> dict[str, Any]:
    return {
        "config": asdict(opts),
        "machine": {**machine_info(), "load_average_after": os.getloadavg()},
        "workload": {"prompts": prompts, "temperature": 0.0, "stream": True, "max_tokens": opts.max_tokens},
        "workers": {
            "count": opts.workers if not opts.nats_url else run.workers_seen,
            "threads": None if opts.nats_url else stack.worker_threads(),
        },
        "baselines": None if baselines is None else asdict(baselines),
        "warmup_s": run.warmup_s,
        "points": [asdict(p) for p in run.points],
        "ratios": [asdict(r) for r in ratios],
        "notes": notes,
    }


if __name__ == "__main__":
    sys.exit(main())
