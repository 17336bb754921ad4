"""The summary on stdout: one row per (concurrency, target), the baselines, the ratios with their verdicts, notes."""

from __future__ import annotations

from llmbus.bench.baselines import Baselines
from llmbus.bench.stats import PointResult, cores_used
from llmbus.bench.sweep import Sweep
from llmbus.bench.verdicts import Ratio, at, pairwise

HEADER = "concurrency  via    tok/s    req/s  TTFT p50/p95 ms  ITL p50/p95 ms  e2e p50/p95 s  errors  cores used"


def point_row(p: PointResult) -> str:
    return (
        f"{p.concurrency:>11}  {p.via:<5} {p.tokens_per_s:>7.1f}  {p.requests_per_s:>5.2f}  "
        f"{p.ttft_p50_s * 1000:>7.0f}/{p.ttft_p95_s * 1000:<7.0f}  "
        f"{p.itl_p50_s * 1000:>6.0f}/{p.itl_p95_s * 1000:<7.0f}  "
        f"{p.e2e_p50_s:>6.2f}/{p.e2e_p95_s:<6.2f}  {p.errors:>6}  {cores_used(p)}"
    ) + ("  STACK FAILED" if p.stack_failure else "")


def summary_lines(sweep: Sweep, baselines: Baselines | None, ratios: list[Ratio], notes: list[str]) -> list[str]:
    lines = [HEADER]
    for nats in sweep.points:
        for points in (sweep.points, sweep.http_points, sweep.peer_points):
            p = at(points, nats.concurrency)
            if p is not None:
                lines.append(point_row(p))
    for label, rows in (
        ("HTTP / NATS", pairwise(sweep.http_points, sweep.points)),
        ("llmbus NATS / peer", pairwise(sweep.points, sweep.peer_points)),
    ):
        if rows:
            cells = ", ".join(f"{r['concurrency']}: {_fmt(r['tokens_per_s'])}{_flawed(r)}" for r in rows)
            lines.append(f"{label} throughput by concurrency: {cells}")
    if baselines is not None:
        in_rounds = bool(baselines.ceiling_before_stack)
        before = " (before the stack)"  # a batch the sweep never reached keeps the ceiling measured before the stack
        ceiling = ", ".join(
            f"{c.batch}: {c.ceiling_tokens_per_s:.1f}{before if in_rounds and not c.beside_the_stack else ''}"
            for c in baselines.ceiling
        )
        rounds = "; measured in the rounds, beside the idle stack" if in_rounds else ""
        lines.append(
            f"eager ceiling tok/s by batch ({baselines.dtype}, {baselines.torch_threads} threads{rounds}): {ceiling}"
        )
        if in_rounds:
            alone = ", ".join(f"{c.batch}: {c.ceiling_tokens_per_s:.1f}" for c in baselines.ceiling_before_stack)
            lines.append(f"eager ceiling tok/s by batch before the stack started: {alone}")
        lines.append(f"in-process prefill p50: {baselines.prefill.p50_s * 1000:.1f} ms")
        lines.append(f"naive baseline: {baselines.naive.tokens_per_s:.1f} tok/s")
    for r in ratios:
        aim = f", aim {r.aim}" if r.aim is not None else ""
        flawed = f"; failed requests at {', '.join(r.inputs_with_errors)}" if r.inputs_with_errors else ""
        lines.append(f"{r.status:4}  {r.description} = {_fmt(r.value)} (target {r.op} {r.target}{aim}{flawed})")
    lines += [f"note: {note}" for note in notes]
    return lines


def _flawed(row: dict) -> str:
    """The mark of a pairwise row one of whose points had failed requests (its ratio is not like for like)."""
    flawed = row["inputs_with_errors"]
    return f" (ERRORS at {', '.join(flawed)})" if flawed else ""


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_summary(sweep: Sweep, baselines: Baselines | None, ratios: list[Ratio], notes: list[str]) -> None:
    print("\n".join(summary_lines(sweep, baselines, ratios, notes)))
