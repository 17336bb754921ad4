"""From the arrival times of each request's tokens to one point's figures: throughput, TTFT, ITL, end-to-end.

Every target (NATS, the HTTP bridge, a peer server) fills the same `RequestRecord`, so all points are computed
the same way: TTFT is the first chunk that carries text, ITL the gaps between consecutive text chunks, end-to-end
the last message of the stream; completion tokens come from the final usage, or from the count of text chunks
when the server sends no usage (`token_count_source` says which).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    sent: float
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    usage_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    def arrived(self, now: float, text: str | None) -> None:
        if text:
            self.token_times.append(now)

    @property
    def first(self) -> float | None:
        return self.token_times[0] if self.token_times else self.end

    @property
    def completion_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None


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
    via: str = "nats"
    token_count_source: str = "usage"
    engine_decode_steps: int = 0
    engine_mean_decode_batch: float = math.nan
    engine_prefill_forwards: int = 0
    engine_prompt_tokens: int = 0
    engine_prefix_tokens_reused: int = 0
    engine_decode_s: float = math.nan  # seconds the workers' engines spent decoding during the point (summed)
    engine_prefill_s: float = math.nan  # and prefilling; the rest of their wall time they waited for work
    engine_compile_failed: int = 0  # workers whose compiled decode step had failed by the end of the point
    engine_workers_missing: list[str] = field(default_factory=list)  # answered $SRV.STATS before or after only
    client_cpu_s: float = math.nan
    worker_cpu_s: float | None = None
    nats_server_cpu_s: float | None = None
    bridge_cpu_s: float | None = None
    load_average_1m: float = math.nan
    stack_failure: str | None = None  # a worker or the bridge was found dead after this point: its figures are suspect
    rounds: int = 1  # rounds merged into this point (`--rounds`)
    records: list[RequestRecord] = field(default_factory=list)  # its requests, for merging rounds; not in bench.json


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def token_count_source(records: Sequence[RequestRecord]) -> str:
    sources = {"usage" if r.usage_tokens is not None else "deltas" for r in records}
    return sources.pop() if len(sources) == 1 else "mixed" if sources else "usage"


def summarize(
    concurrency: int, records: Sequence[RequestRecord], wall: float, capped: bool, via: str = "nats"
) -> PointResult:
    ok = [r for r in records if r.ok]
    errors = [r.error or "no end of stream" for r in records if not r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    e2e = [r.end - r.sent for r in ok if r.end is not None]
    gaps = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
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
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        itl_p50_s=percentile(gaps, 50),
        itl_p95_s=percentile(gaps, 95),
        e2e_p50_s=percentile(e2e, 50),
        e2e_p95_s=percentile(e2e, 95),
        via=via,
        token_count_source=token_count_source(ok),
        records=list(records),
    )


def describe_point(p: PointResult) -> str:
    """One progress line."""
    text = (
        f"{p.via} @ {p.concurrency}: {p.tokens_per_s:.1f} tok/s, {p.requests_per_s:.2f} req/s, "
        f"TTFT p50/p95 {p.ttft_p50_s * 1000:.0f}/{p.ttft_p95_s * 1000:.0f} ms, "
        f"ITL p50/p95 {p.itl_p50_s * 1000:.0f}/{p.itl_p95_s * 1000:.0f} ms, "
        f"e2e p50/p95 {p.e2e_p50_s:.2f}/{p.e2e_p95_s:.2f} s ({p.requests} ok, {p.errors} errors, {p.wall_s:.1f} s)"
    )
    if p.via != "peer":
        text += (
            f"; engine: {p.engine_decode_steps} decode steps, mean batch {p.engine_mean_decode_batch:.1f}, "
            f"{p.engine_prefill_forwards} prefill forwards"
        )
        if not math.isnan(p.engine_decode_s):
            text += f" (busy {p.engine_decode_s:.1f} s decoding, {p.engine_prefill_s:.1f} s prefilling)"

        if p.engine_workers_missing:
            text += f", counters incomplete ({len(p.engine_workers_missing)} worker(s) missing)"
        if p.engine_compile_failed:
            text += f", compiled decode step FAILED on {p.engine_compile_failed} worker(s)"
    text += f"; cores used: {cores_used(p)}; load {p.load_average_1m:.2f}"
    if p.error_samples:
        text += f"; first error: {p.error_samples[0]}"
    if p.stack_failure:
        text += f"; FAILED: {p.stack_failure}"
    return text + (" [time cap reached]" if p.time_capped else "")


def cores_used(p: PointResult) -> str:
    """CPU seconds of each process per wall second: where the cores went during the point."""
    parts = {
        "bench client": p.client_cpu_s,
        "workers": p.worker_cpu_s,
        "nats-server": p.nats_server_cpu_s,
        "bridge": p.bridge_cpu_s,
    }
    shown = [f"{name} {value / p.wall_s:.2f}" for name, value in parts.items() if _known(value) and p.wall_s > 0]
    return ", ".join(shown) or "n/a"


def _known(value: float | None) -> bool:
    return value is not None and not math.isnan(value)
