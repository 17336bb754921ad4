"""`bench.png`: throughput, time to first token and inter-token latency against concurrency, for llmbus over
NATS, through the HTTP bridge and the peer when measured, with the in-process baselines as reference lines."""

from __future__ import annotations

from pathlib import Path

from llmbus.bench.baselines import Baselines
from llmbus.bench.stats import PointResult
from llmbus.bench.sweep import Sweep

STYLES = {"nats": ("o-", "tab:blue"), "http": ("D-", "tab:green"), "peer": ("v-", "tab:purple")}


def series(sweep: Sweep, peer_name: str | None) -> list[tuple[str, str, list[PointResult]]]:
    """(via, legend label, points) of every target that was measured."""
    out = [("nats", "llmbus over NATS", sweep.points)]
    if sweep.http_points:
        out.append(("http", "llmbus over the HTTP bridge (OpenAI API)", sweep.http_points))
    if sweep.peer_points:
        out.append(("peer", f"peer: {peer_name or 'OpenAI-compatible server'}", sweep.peer_points))
    return out


def plot(path: Path, sweep: Sweep, baselines: Baselines | None, title: str, peer_name: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft, itl) = plt.subplots(1, 3, figsize=(17, 4.8))
    for via, label, points in series(sweep, peer_name):
        marker, color = STYLES[via]
        xs = [p.concurrency for p in points]
        tput.plot(xs, [p.tokens_per_s for p in points], marker, color=color, label=label)
        ttft.plot(xs, [p.ttft_p50_s * 1000 for p in points], marker, color=color, label=f"{label}, p50")
        ttft.plot(xs, [p.ttft_p95_s * 1000 for p in points], ":", color=color, alpha=0.6, label=f"{label}, p95")
        itl.plot(xs, [p.itl_p50_s * 1000 for p in points], marker, color=color, label=f"{label}, p50")
    if baselines is not None:
        cx = [c.batch for c in baselines.ceiling]
        label = "eager ceiling"
        if baselines.ceiling_before_stack:  # measured in the rounds (before the stack for batches never reached)
            everywhere = all(c.beside_the_stack for c in baselines.ceiling)
            label += ", in the rounds" if everywhere else ", in the rounds where the sweep reached"
        tput.plot(cx, [c.ceiling_tokens_per_s for c in baselines.ceiling], "s--", color="tab:orange", label=label)
        tput.axhline(
            baselines.naive.tokens_per_s,
            color="tab:red",
            linestyle=":",
            label=f"naive baseline (generate, {baselines.naive.threads} threads)",
        )
        ttft.axhline(baselines.prefill.p50_s * 1000, color="tab:gray", linestyle=":", label="in-process prefill p50")
        itl.plot(
            cx, [c.median_step_s * 1000 for c in baselines.ceiling], "s--", color="tab:orange", label="eager step p50"
        )
    tput.set(xlabel="concurrent clients", ylabel="generated tokens/s", title="Throughput")
    ttft.set(xlabel="concurrent clients", ylabel="milliseconds", title="Time to first token")
    itl.set(xlabel="concurrent clients", ylabel="milliseconds", title="Inter-token latency")
    # a sweep stopped before its first point still shows its baselines, at their batch sizes
    xs = [p.concurrency for p in sweep.points] or ([c.batch for c in baselines.ceiling] if baselines else [])
    for ax in (tput, ttft, itl):
        ax.set_xscale("log", base=2)
        if xs:  # the limits too: an axis with lines across it only had none, and log scale refused it
            ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
