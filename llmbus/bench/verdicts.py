"""Ratios against the targets, all from one run, and plain-language notes that help read them.

"At 64" means at 64 clients when the sweep has that point, else at its largest concurrency (the description of
each ratio names the concurrency it used). A sweep of 1 client alone has no such point: its "at 64" ratios are N/A
rather than a second copy of the 1-client ones. A ratio whose inputs were not measured is N/A, never a guess.

A ratio one of whose points had failed requests (or no answered one) is ERRORS, never PASS: its value comes from
the requests that were answered, which a failure can flatter (fewer requests behind the NATS figure, one TTFT of
eight). `inputs_with_errors` names those points (`nats@64`), and a note says what failed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from llmbus.bench.baselines import Baselines, CeilingPoint
from llmbus.bench.stats import PointResult

REFERENCE_CONCURRENCY = 64

# name: (operator, target, aim). Issue 12 set the first two and http_over_nats; the rest are the original targets.
TARGETS: dict[str, tuple[str, float, float | None]] = {
    "throughput_vs_ceiling": (">=", 1.5, 2.0),
    "throughput_vs_ceiling_at_1": (">=", 2.0, None),
    "throughput_vs_naive": (">=", 15.0, None),
    "ttft_vs_prefill": ("<=", 1.3, None),
    "ttft_vs_e2e": ("<", 0.25, None),
    "http_over_nats": (">=", 0.95, None),
}


@dataclass(slots=True)
class Ratio:
    name: str
    description: str
    value: float | None
    op: str
    target: float
    status: str  # PASS, MISS, N/A (not measured) or ERRORS (an input point had failed requests)
    aim: float | None = None
    inputs_with_errors: list[str] = field(default_factory=list)


def reference_point(points: list[PointResult]) -> PointResult | None:
    """The 64-client point, else the largest concurrency above 1."""
    wide = [p for p in points if p.concurrency > 1]
    if not wide:
        return None
    return next((p for p in wide if p.concurrency == REFERENCE_CONCURRENCY), max(wide, key=lambda p: p.concurrency))


def at(points: list[PointResult], concurrency: int) -> PointResult | None:
    return next((p for p in points if p.concurrency == concurrency), None)


def compute_ratios(
    points: list[PointResult], baselines: Baselines | None, http_points: list[PointResult] | None = None
) -> list[Ratio]:
    ref, one = reference_point(points), at(points, 1)
    c = ref.concurrency if ref is not None else REFERENCE_CONCURRENCY
    ceiling_ref = ceiling_one = prefill = naive = None
    if baselines is not None:
        by_batch = {p.batch: p.ceiling_tokens_per_s for p in baselines.ceiling}
        ceiling_ref, ceiling_one = by_batch.get(c), by_batch.get(1)
        prefill, naive = baselines.prefill.p50_s, baselines.naive.tokens_per_s
    http_ref = at(http_points or [], c)
    values = {
        "throughput_vs_ceiling": (
            f"throughput@{c} / eager ceiling@{c}",
            _div(ref and ref.tokens_per_s, ceiling_ref),
            [ref],
        ),
        "throughput_vs_ceiling_at_1": (
            "throughput@1 / eager ceiling@1",
            _div(one and one.tokens_per_s, ceiling_one),
            [one],
        ),
        "throughput_vs_naive": (f"throughput@{c} / naive baseline", _div(ref and ref.tokens_per_s, naive), [ref]),
        "ttft_vs_prefill": ("TTFT p50@1 / in-process prefill p50", _div(one and one.ttft_p50_s, prefill), [one]),
        "ttft_vs_e2e": (
            "TTFT p50@1 / end-to-end p50@1",
            _div(one and one.ttft_p50_s, one and one.e2e_p50_s),
            [one],
        ),
        "http_over_nats": (
            f"HTTP throughput@{c} / NATS throughput@{c}, back to back",
            _div(http_ref and http_ref.tokens_per_s, ref and ref.tokens_per_s),
            [http_ref, ref],
        ),
    }
    ratios = []
    for name, (description, value, inputs) in values.items():
        op, target, aim = TARGETS[name]
        flawed = [label(p) for p in inputs if p is not None and has_errors(p)]
        status = "ERRORS" if flawed and value is not None else verdict(value, op, target)
        ratios.append(Ratio(name, description, value, op, target, status, aim, flawed))
    return ratios


def has_errors(p: PointResult) -> bool:
    """A point whose figures leave requests out or cannot be trusted: some failed, none was answered, or a process
    of the stack died during it (`stack_failure`)."""
    return p.errors > 0 or p.requests == 0 or p.stack_failure is not None


def label(p: PointResult) -> str:
    return f"{p.via}@{p.concurrency}"


def pairwise(numerators: list[PointResult], denominators: list[PointResult]) -> list[dict[str, Any]]:
    """Throughput and TTFT of one target over another at each concurrency both measured. Each row also carries
    `errors`, the failed request counts of its two points by target (`{"http": 2, "nats": 0}`), and
    `inputs_with_errors`, the points whose figures leave requests out (`has_errors`: failed requests, none
    answered, or the stack died), as a ratio does: a row with any is not a like-for-like comparison."""
    rows = []
    for top in numerators:
        bottom = at(denominators, top.concurrency)
        if bottom is None:
            continue
        rows.append(
            {
                "concurrency": top.concurrency,
                "tokens_per_s": _div(top.tokens_per_s, bottom.tokens_per_s),
                "ttft_p50": _div(top.ttft_p50_s, bottom.ttft_p50_s),
                "itl_p50": _div(top.itl_p50_s, bottom.itl_p50_s),
                "errors": {top.via: top.errors, bottom.via: bottom.errors},
                "inputs_with_errors": [label(p) for p in (top, bottom) if has_errors(p)],
            }
        )
    return rows


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def verdict(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "N/A"
    passed = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return "PASS" if passed else "MISS"


def diagnostics(
    points: list[PointResult],
    baselines: Baselines | None,
    load_before: float,
    worker_options: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Notes on noise, CPU use and like-for-like; no targets."""
    notes = []
    if load_before > 1.0:
        notes.append(
            f"the 1-minute load average was {load_before:.2f} when the bench started: other processes were using "
            "the cores, so every figure may be low and the ratios noisy"
        )
    failed = [p.concurrency for p in points if p.engine_compile_failed]
    if failed:
        notes.append(
            f"a worker's compiled decode step failed (by the end of concurrency {failed[0]}): it decodes eagerly "
            "from then on, so these figures are the eager engine's; the worker's log has the error"
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
    for o in worker_options or []:
        if o.get("dtype") and baselines.dtype and o["dtype"] != baselines.dtype:
            notes.append(
                f"a worker ran in {o['dtype']} but the baselines in {baselines.dtype}: the ceiling ratios compare "
                "different precisions (pass --dtype to the bench, not --worker-arg, to keep them alike)"
            )
    for c in baselines.ceiling:
        rounds = f" ({c.rounds} rounds together)" if c.rounds > 1 else ""
        if c.disturbed:
            why = "the rounds ran at different speeds, or " if c.rounds > 1 else ""
            notes.append(
                f"ceiling batch {c.batch}{rounds}: {c.tokens_per_s:.1f} tok/s by wall time but "
                f"{c.tokens_per_s_median_step:.1f} by median step: {why}other processes took the cores for part of "
                "the loop (the ratios use the higher figure)"
            )
        if c.time_capped:
            notes.append(f"ceiling batch {c.batch}{rounds}: stopped by the time cap after {c.steps} steps")
    for before in baselines.ceiling_before_stack:
        in_rounds, point = at_batch(baselines.ceiling, before.batch), at(points, before.batch)
        if in_rounds is not None and in_rounds.beside_the_stack and point is not None:
            notes.append(
                f"eager ceiling batch {before.batch}: {in_rounds.ceiling_tokens_per_s:.1f} tok/s in the rounds (what "
                f"the ratios use), {before.ceiling_tokens_per_s:.1f} before the stack started; against that one, "
                f"throughput@{before.batch} / eager ceiling@{before.batch} = "
                f"{point.tokens_per_s / before.ceiling_tokens_per_s:.3f}"
            )
    one = at(points, 1)
    if one is not None and baselines.prefill.suffix_p50_s > 0:
        notes.append(
            f"TTFT p50@1 / in-process prefill of the prompt after its shared prefix = "
            f"{one.ttft_p50_s / baselines.prefill.suffix_p50_s:.3f} (the worker's prefix cache reused "
            f"{one.engine_prefix_tokens_reused} prompt tokens of {one.engine_prompt_tokens} at that point)"
        )
    return notes


def at_batch(ceiling: list[CeilingPoint], batch: int) -> CeilingPoint | None:
    return next((c for c in ceiling if c.batch == batch), None)


def point_notes(points: list[PointResult]) -> list[str]:
    """Each point after which a process of the stack was found dead, each with failed requests (or none
    answered), and each whose engine counters miss a worker."""
    notes = []
    for p in points:
        if p.stack_failure:
            notes.append(
                f"{label(p)}: {p.stack_failure}: found after this point, which may have run without it, so no ratio "
                "using this point can PASS; the sweep stopped there"
            )
        if p.errors > 0 or p.requests == 0:
            first = f" (first: {p.error_samples[0]})" if p.error_samples else ""
            notes.append(
                f"{label(p)}: {p.errors} of {p.errors + p.requests} requests failed{first}: its figures count only "
                "the answered ones, so no ratio using this point can PASS"
            )
        if p.engine_workers_missing:
            notes.append(
                f"{label(p)}: the engine counters are incomplete: worker(s) {', '.join(p.engine_workers_missing)} "
                "answered $SRV.STATS only before or only after the point, and are left out"
            )
    return notes


def http_notes(http_points: list[PointResult], points: list[PointResult]) -> list[str]:
    """The bench's own HTTP clients cost more CPU than its NATS clients; where cores are scarce, that comes out of
    the workers' share and lowers the HTTP figure. Say how much, so the HTTP/NATS ratio can be read with it."""
    notes = []
    for http in http_points:
        nats = at(points, http.concurrency)
        if nats is None or not (http.wall_s > 0 and nats.wall_s > 0):
            continue
        extra = http.client_cpu_s / http.wall_s - nats.client_cpu_s / nats.wall_s
        if extra > 0.05:
            notes.append(
                f"concurrency {http.concurrency}: the bench's HTTP clients used {extra:.2f} more cores than its NATS "
                f"clients ({os.cpu_count()} cores here): with no spare core that comes out of the workers' share"
            )
    return notes


def peer_notes(peer_points: list[PointResult], points: list[PointResult]) -> list[str]:
    """What to keep in mind when comparing with the peer: how its tokens were counted, and its answer lengths."""
    notes = []
    sources = {p.token_count_source for p in peer_points}
    if sources - {"usage"}:
        notes.append(
            "the peer sent no usage in some streams (stream_options.include_usage): its completion tokens there are "
            "the count of content deltas, which is one per token on llama.cpp and vLLM but may differ elsewhere"
        )
    for peer in peer_points:
        ours = at(points, peer.concurrency)
        if ours is not None and ours.mean_completion_tokens and peer.mean_completion_tokens:
            ratio = peer.mean_completion_tokens / ours.mean_completion_tokens
            if not 0.8 <= ratio <= 1.25:
                notes.append(
                    f"concurrency {peer.concurrency}: the peer's answers averaged {peer.mean_completion_tokens:.0f} "
                    f"tokens, llmbus's {ours.mean_completion_tokens:.0f}: they stop at different places, so compare "
                    "tokens/s and ITL rather than requests/s"
                )
    return notes
