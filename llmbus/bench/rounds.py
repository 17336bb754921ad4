"""`--rounds N`: each concurrency measured N times, the targets in alternating order, each target's rounds reported
as one point.

A shared machine's speed drifts over minutes (this project's 2-core machines moved by half from one minute to the
next), so a ratio of two points measured one after the other (HTTP over NATS, NATS over a peer) carries that drift.
Alternating the order (NATS, HTTP, then HTTP, NATS, ...) puts each target first as often as second, which cancels
a steady drift, and N rounds average the rest. A target's rounds merge into one point: tokens/s over the summed wall
time, latency percentiles over all their requests, CPU seconds and engine counters summed. One round (the default)
is the point as measured. The eager ceiling takes part in the rounds too (`baselines.CeilingMeter`): its rounds
merge into one ceiling over all their decode steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

from llmbus.bench.baselines import CeilingPoint, ceiling_point
from llmbus.bench.stats import PointResult, summarize

T = TypeVar("T")


def in_round_order(targets: Sequence[T], round_index: int) -> list[T]:
    """The targets as given in even rounds, reversed in odd ones."""
    return list(targets) if round_index % 2 == 0 else list(reversed(targets))


def merge_rounds(points: Sequence[PointResult]) -> PointResult:
    """One point for a target's rounds at one concurrency (the point itself when there is one)."""
    if len(points) == 1:
        return points[0]
    first = points[0]
    records = [record for point in points for record in point.records]
    merged = summarize(
        first.concurrency, records, sum(p.wall_s for p in points), any(p.time_capped for p in points), first.via
    )
    merged.rounds = len(points)
    merged.client_cpu_s = sum(p.client_cpu_s for p in points)
    merged.worker_cpu_s = _sum_known([p.worker_cpu_s for p in points])
    merged.nats_server_cpu_s = _sum_known([p.nats_server_cpu_s for p in points])
    merged.bridge_cpu_s = _sum_known([p.bridge_cpu_s for p in points])
    merged.load_average_1m = sum(p.load_average_1m for p in points) / len(points)
    merged.engine_decode_steps = sum(p.engine_decode_steps for p in points)
    merged.engine_prefill_forwards = sum(p.engine_prefill_forwards for p in points)
    merged.engine_prompt_tokens = sum(p.engine_prompt_tokens for p in points)
    merged.engine_prefix_tokens_reused = sum(p.engine_prefix_tokens_reused for p in points)
    merged.engine_decode_s = sum(p.engine_decode_s for p in points)
    merged.engine_prefill_s = sum(p.engine_prefill_s for p in points)
    if merged.engine_decode_steps:
        rows = sum(p.engine_mean_decode_batch * p.engine_decode_steps for p in points if p.engine_decode_steps)
        merged.engine_mean_decode_batch = rows / merged.engine_decode_steps
    merged.engine_compile_failed = max(p.engine_compile_failed for p in points)
    merged.engine_workers_missing = sorted({w for p in points for w in p.engine_workers_missing})
    merged.stack_failure = next((p.stack_failure for p in points if p.stack_failure), None)
    return merged


def merge_ceilings(points: Sequence[CeilingPoint]) -> CeilingPoint:
    """One eager ceiling for a batch's rounds: tokens/s over all their timed steps, the median of all their steps."""
    if len(points) == 1:
        return points[0]
    first = points[0]
    steps = [seconds for point in points for seconds in point.step_times_s]
    merged = ceiling_point(first.batch, steps, first.method, capped=any(p.time_capped for p in points))
    merged.rounds = len(points)
    merged.beside_the_stack = all(p.beside_the_stack for p in points)
    merged.load_average_1m = sum(p.load_average_1m for p in points) / len(points)
    return merged


def _sum_known(values: list[float | None]) -> float | None:
    """The sum, or None when any round did not know the value (no such process)."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) if len(known) == len(values) else None
