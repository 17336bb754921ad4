"""A worker's Prometheus figures as `$SRV.STATS` data, so `nats micro stats` shows them: counters and gauges as
numbers, histograms as count, sum, mean and p50/p90/p99 estimated from their buckets, a state-as-label gauge by the
name of its state."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

QUANTILES = (0.5, 0.9, 0.99)
BY_LABEL = {"request_success": "finished_reason", "request_failure": "code"}  # the counters with one more label


def registry_summary(registry: CollectorRegistry, prefix: str) -> dict[str, Any]:
    """The `prefix` figures of `registry`, named without the prefix: counters and gauges as numbers (by label where
    they have one more than model and worker), histograms as count, sum and estimated quantiles, the compile state by
    name."""
    out: dict[str, Any] = {}
    for family in registry.collect():
        if not family.name.startswith(prefix):
            continue
        name = family.name.removeprefix(prefix)
        if family.type == "histogram":
            out[name] = histogram_summary(family)
        elif name == "decode_compile_state":
            out[name] = current_state(family)
        elif name in BY_LABEL:
            out[name + "_total"] = by_label(family, BY_LABEL[name])
        else:
            suffix = "_total" if family.type == "counter" else ""
            out[name + suffix] = sum(s.value for s in family.samples if s.name == family.name + suffix)
    return out


def current_state(family: Metric) -> str | None:
    """The state whose series is 1 in a state-as-label gauge (`decode_compile_state`); None before it has one."""
    return next((s.labels["state"] for s in family.samples if s.value == 1), None)


def by_label(family: Metric, label: str) -> dict[str, float]:
    """A labelled counter's totals by the value of `label`."""
    return {s.labels[label]: s.value for s in family.samples if s.name == family.name + "_total"}


def histogram_summary(family: Metric) -> dict[str, float | None]:
    """count, sum and p50/p90/p99 of a histogram family, estimated from its buckets as Prometheus'
    `histogram_quantile` does (linear inside a bucket)."""
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    count = next((s.value for s in family.samples if s.name.endswith("_count")), 0.0)
    total = next((s.value for s in family.samples if s.name.endswith("_sum")), 0.0)
    out = {"count": count, "sum": round(total, 6), "mean": round(total / count, 6) if count else None}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = bucket_quantile(q, buckets)
    return out


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile from cumulative (upper bound, count) buckets ending at +Inf; None without observations."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    index = bisect_left([count for _, count in buckets], rank)
    upper, count = buckets[index]
    lower, below = buckets[index - 1] if index > 0 else (0.0, 0.0)
    if upper == float("inf"):
        return lower
    inside = count - below
    return round(lower + (upper - lower) * ((rank - below) / inside if inside else 1.0), 6)
