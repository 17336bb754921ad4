"""The sweep: wait for the workers (and the bridge), warm every target up, then at each concurrency measure the
targets back to back: NATS, then the HTTP bridge (`--http`), then the peer (`--peer-url`). Measuring them one
after the other at the same concurrency, against the same workers, keeps their ratio free of the drift that
separate runs on a shared machine would add. Every NATS and HTTP request names the same model (`measured_model`).
A worker or the bridge found dead after a point ends the sweep there, keeping the points before it
(`measure_points`). With `--rounds N` the eager ceiling is one more target of the rounds (`baselines.CeilingMeter`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bus_gateway.client import BusClient
from llmbus.bench.baselines import CeilingMeter, CeilingPoint
from llmbus.bench.bus_load import (
    counters_during,
    engine_counters,
    measured_model,
    stream_over_bus,
    wait_for_compiled,
    wait_for_workers,
    worker_options,
)
from llmbus.bench.closed_loop import Send, closed_loop, warm_up
from llmbus.bench.http_load import OpenAITarget, http_client, stream_over_http, wait_until_ready
from llmbus.bench.options import BenchError, BenchOptions, progress
from llmbus.bench.rounds import in_round_order, merge_ceilings, merge_rounds
from llmbus.bench.stack import Stack
from llmbus.bench.stats import PointResult, RequestRecord, describe_point, summarize
from llmbus.bench.workload import requests_per_client


@dataclass(slots=True)
class Target:
    via: str
    send: Send
    ours: bool  # served by the stack's workers: engine counters apply


EAGER = "eager"  # the eager ceiling's place among the targets of a round
Ceiling = Callable[[int], Awaitable[CeilingPoint]]


@dataclass(slots=True)
class Sweep:
    workers_seen: int
    warmup_s: float
    points: list[PointResult]
    http_points: list[PointResult] = field(default_factory=list)
    peer_points: list[PointResult] = field(default_factory=list)
    warmups_s: dict[str, float] = field(default_factory=dict)
    worker_processes: list[dict[str, Any]] = field(default_factory=list)
    worker_options: list[dict[str, Any]] = field(default_factory=list)
    served_model: str | None = None
    compile_wait_s: float = 0.0
    stopped: str | None = None  # why the sweep stopped before its last point (a worker or the bridge died)
    ceiling: list[CeilingPoint] = field(default_factory=list)  # the eager ceiling measured in the rounds


async def run_sweep(opts: BenchOptions, stack: Stack, prompts: list[str], meter: CeilingMeter | None = None) -> Sweep:
    """With a `meter` the eager ceiling is measured in each round too (in a thread, the stack idle)."""
    connection = dataclasses.replace(
        opts.connection, nats_url=stack.url, subject_prefix=opts.subject_prefix, request_timeout=opts.request_timeout
    )
    bus = await BusClient.from_config(connection, name="llmbus-bench")
    try:
        progress(f"waiting for {opts.workers} worker(s) to answer $SRV.PING")
        seen = len(await wait_for_workers(bus, stack, opts.workers, opts.ready_timeout))
        progress("waiting for the workers' decode step to compile ($SRV.STATS compile)")
        compile_wait_s = await wait_for_compiled(bus, stack, seen, opts.compile_timeout)
        options = await worker_options(bus)
        progress(f"{seen} worker(s) ready: {describe_workers(options)}")
        sweep = Sweep(seen, 0.0, [], worker_processes=[w.describe() for w in stack.workers], worker_options=options)
        sweep.served_model = measured_model(options, opts.served_model)
        progress(f"requests over NATS and HTTP name the model {sweep.served_model or '(none: the bus default)'}")
        sweep.compile_wait_s = compile_wait_s
        async with contextlib.AsyncExitStack() as exits:
            targets = [Target("nats", bus_sender(bus, opts.request_timeout, sweep.served_model), True)]
            top = max(opts.concurrency)
            if stack.http_url:
                await wait_until_ready(stack.http_url, stack.check_alive, opts.ready_timeout)
                if sweep.served_model is None:
                    raise BenchError("the workers report no model name in $SRV.INFO, so the bridge cannot be asked")
                bridge = OpenAITarget("the HTTP bridge", stack.http_url, sweep.served_model, opts.http_api_key)
                client = await exits.enter_async_context(http_client(top))
                targets.append(Target("http", http_sender(client, bridge, opts.request_timeout), True))
            if opts.peer_url and opts.peer_model:
                peer = OpenAITarget("the peer", opts.peer_url, opts.peer_model, opts.peer_api_key)
                client = await exits.enter_async_context(http_client(top))
                targets.append(Target("peer", http_sender(client, peer, opts.request_timeout), False))
            for target in targets:
                count = max(opts.warmup_requests, 2 * opts.workers) if target.via == "nats" else opts.warmup_requests
                sweep.warmups_s[target.via] = await warm_up(target.send, prompts, count, target.via)
            sweep.warmup_s = sweep.warmups_s["nats"]
            expect = None if opts.nats_url else seen  # a given server may carry other prefixes' workers

            async def measure(target: Target, concurrency: int, per_client: int) -> PointResult:
                return await measure_point(bus, stack, target, prompts, concurrency, per_client, opts, expect)

            ceiling = None if meter is None else ceiling_in_a_thread(meter)
            await measure_points(sweep, targets, opts, measure, stack.check_alive, ceiling)
        return sweep
    finally:
        await bus.close()


async def measure_points(
    sweep: Sweep,
    targets: list[Target],
    opts: BenchOptions,
    measure: Callable[[Target, int, int], Awaitable[PointResult]],
    check_alive: Callable[[], None],
    ceiling: Ceiling | None = None,
) -> None:
    """Every target at every concurrency, into the sweep's lists. After each point `check_alive` looks at the
    stack's processes: a worker or the bridge found dead marks that point failed (`stack_failure`, so it shows
    ERRORS), stops the sweep and sets `sweep.stopped`; the points measured before it are kept for the report. With
    `--rounds N` each concurrency runs the targets N times in alternating order, and each target's rounds are
    reported as one point (`rounds`); a `ceiling` is measured in each round as the last target of the first
    order, into `sweep.ceiling`."""
    by_via = {"nats": sweep.points, "http": sweep.http_points, "peer": sweep.peer_points}
    for concurrency in opts.concurrency:
        per_client = requests_per_client(opts.requests_per_client, opts.min_requests, concurrency)
        rounds = f", {opts.rounds} rounds in alternating order" if opts.rounds > 1 else ""
        rounds += ", the eager ceiling among them" if ceiling else ""
        progress(f"concurrency {concurrency}: {concurrency * per_client} requests per target{rounds}")
        measured: dict[str, list[PointResult]] = {target.via: [] for target in targets}
        ceilings: list[CeilingPoint] = []
        order: list[Target | str] = [*targets, EAGER] if ceiling else list(targets)
        try:
            for round_index in range(opts.rounds):
                for target in in_round_order(order, round_index):
                    if isinstance(target, str):
                        assert ceiling is not None
                        ceilings.append(await ceiling(concurrency))
                        continue
                    point = await measure(target, concurrency, per_client)
                    measured[target.via].append(point)
                    try:
                        check_alive()
                    except BenchError as exc:
                        point.stack_failure = str(exc)
                        sweep.stopped = f"{exc} (found after {target.via}@{concurrency}); the sweep stopped there"
                        progress(f"error: {sweep.stopped}")
                        return
        finally:
            for via, points in measured.items():
                if points:
                    by_via[via].append(merged := merge_rounds(points))
                    if merged.rounds > 1:
                        progress(f"{merged.rounds} rounds together: {describe_point(merged)}")
            if ceilings:
                sweep.ceiling.append(merged_ceiling := merge_ceilings(ceilings))
                progress(
                    f"eager ceiling batch {concurrency}, {merged_ceiling.rounds} rounds together: "
                    f"{merged_ceiling.ceiling_tokens_per_s:.1f} tok/s"
                )


def ceiling_in_a_thread(meter: CeilingMeter) -> Ceiling:
    """The meter in a thread (the event loop stays free); cancelled, the loop stops after its current step, so a
    stopped bench does not wait out the whole measurement."""

    async def ceiling(batch: int) -> CeilingPoint:
        stop = threading.Event()
        try:
            return await asyncio.to_thread(meter.measure, batch, True, stop)
        except asyncio.CancelledError:
            stop.set()
            raise

    return ceiling


def bus_sender(bus: BusClient, timeout: float, model: str | None) -> Send:
    async def send(prompt: str, max_tokens: int) -> RequestRecord:
        return await stream_over_bus(bus, prompt, max_tokens, timeout, model)

    return send


def http_sender(client: aiohttp.ClientSession, target: OpenAITarget, timeout: float) -> Send:
    async def send(prompt: str, max_tokens: int) -> RequestRecord:
        return await stream_over_http(client, target, prompt, max_tokens, timeout)

    return send


async def measure_point(
    bus: BusClient,
    stack: Stack,
    target: Target,
    prompts: list[str],
    concurrency: int,
    per_client: int,
    opts: BenchOptions,
    expect: int | None = None,
) -> PointResult:
    """One target at one concurrency; `expect`: how many workers answer `$SRV.STATS` (for the engine counters)."""
    before = await engine_counters(bus, expect) if target.ours else None
    client_cpu = time.process_time()
    worker_cpu, nats_cpu, bridge_cpu = (
        stack.worker_cpu_seconds(),
        stack.nats_server_cpu_seconds(),
        stack.bridge_cpu_seconds(),
    )
    run = await closed_loop(target.send, prompts, concurrency, per_client, opts.max_tokens, opts.point_time_cap)
    point = summarize(concurrency, run.records, run.wall_s, run.time_capped, target.via)
    point.client_cpu_s = time.process_time() - client_cpu
    point.worker_cpu_s = _minus(stack.worker_cpu_seconds(), worker_cpu)
    point.nats_server_cpu_s = _minus(stack.nats_server_cpu_seconds(), nats_cpu)
    point.bridge_cpu_s = _minus(stack.bridge_cpu_seconds(), bridge_cpu)
    point.load_average_1m = os.getloadavg()[0]
    if before is not None:
        counted = counters_during(before, await engine_counters(bus, expect))
        during = counted.counters
        point.engine_workers_missing = counted.missing
        point.engine_decode_steps = during.decode_steps
        point.engine_mean_decode_batch = during.mean_decode_batch
        point.engine_prefill_forwards = during.prefill_forwards
        point.engine_prompt_tokens = during.prompt_tokens
        point.engine_prefix_tokens_reused = during.prefix_tokens_reused
        point.engine_decode_s = during.decode_s
        point.engine_prefill_s = during.prefill_s
        point.engine_compile_failed = during.compile_failed
    progress(describe_point(point))
    return point


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def describe_workers(options: list[dict[str, Any]]) -> str:
    keys = ("model", "device", "dtype", "max_batch_size")
    return "; ".join(", ".join(f"{k} {o[k]}" for k in keys if k in o) or "no metadata" for o in options)
