"""`llmbus bench` from start to end: options, peer probe, baselines, stack, sweep, verdicts, report, plot."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import Sequence

from llmbus.bench.baselines import measure_baselines
from llmbus.bench.http_load import OpenAITarget, probe
from llmbus.bench.options import BenchError, BenchOptions, parse_options, progress
from llmbus.bench.plot import plot
from llmbus.bench.report import build_report, write_json
from llmbus.bench.stack import Stack
from llmbus.bench.summary import print_summary
from llmbus.bench.sweep import run_sweep
from llmbus.bench.verdicts import compute_ratios, diagnostics, http_notes, peer_notes
from llmbus.bench.workload import workload
from llmbus.nats_server import NatsServerError


def main(argv: Sequence[str] | None = None) -> int:
    from llmbus import bench

    opts = parse_options(sys.argv[1:] if argv is None else argv, description=bench.__doc__)
    if importlib.util.find_spec("matplotlib") is None:
        progress("error: the plot needs matplotlib: pip install 'llmbus[bench]'")
        return 2
    started = time.time()
    load_before = os.getloadavg()
    prompts = workload(opts.seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    progress(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    if problem := check_peer(opts):
        progress(f"error: the peer did not answer a first request: {problem}")
        return 1
    baselines = None if opts.skip_baselines else measure_baselines(opts, prompts)
    stack = Stack(opts)
    try:
        stack.start()
        sweep = asyncio.run(run_sweep(opts, stack, prompts))
    except (BenchError, NatsServerError, TimeoutError) as exc:
        progress(f"error: {exc}")
        return 1
    finally:
        stack.stop()
    ratios = compute_ratios(sweep.points, baselines, sweep.http_points)
    notes = diagnostics(sweep.points, baselines, load_before[0], sweep.worker_options)
    notes += http_notes(sweep.http_points, sweep.points) + peer_notes(sweep.peer_points, sweep.points)
    print_summary(sweep, baselines, ratios, notes)
    report = build_report(opts, stack, prompts, baselines, sweep, ratios, notes)
    report["machine"]["load_average_before"] = load_before
    report["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
    report["duration_s"] = time.time() - started
    json_path, png_path = opts.out / "bench.json", opts.out / "bench.png"
    write_json(json_path, report)
    plot(png_path, sweep, baselines, title(opts, report), opts.peer_model)
    progress(f"wrote {json_path} and {png_path} ({report['duration_s']:.0f} s)")
    return 0


def check_peer(opts: BenchOptions) -> str | None:
    """One short request to the peer before the long phases, so a wrong URL, model or key fails in seconds."""
    if not (opts.peer_url and opts.peer_model):
        return None
    target = OpenAITarget("the peer", opts.peer_url, opts.peer_model, opts.peer_api_key)
    return asyncio.run(probe(target, min(opts.request_timeout, 120.0)))


def title(opts: BenchOptions, report: dict) -> str:
    options = report["workers"]["options"]
    worker = options[0] if options else {}
    device = worker.get("device", report["machine"]["device"])
    dtype = worker.get("dtype", report["machine"]["dtype"])
    pinned = ", pinned" if opts.pin else ""
    extra = f", {' '.join(opts.worker_args)}" if opts.worker_args else ""
    return (
        f"llmbus bench: {device} {dtype}, {report['workers']['count']} worker(s){pinned}{extra}, "
        f"max_tokens {opts.max_tokens}"
    )
