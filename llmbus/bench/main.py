"""`llmbus bench` from start to end: options, checks of the given URLs, baselines, stack, sweep, verdicts, report,
plot."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import sys
import time
from collections.abc import Sequence

from llmbus.bench.baselines import Baselines, CeilingPoint, measure_baselines
from llmbus.bench.options import BenchOptions, parse_options, progress
from llmbus.bench.plot import plot
from llmbus.bench.preflight import FAILURES, check_bridge, check_bus, check_peer, describe
from llmbus.bench.report import build_report, write_json
from llmbus.bench.signals import exit_on_signals
from llmbus.bench.stack import Stack
from llmbus.bench.summary import print_summary
from llmbus.bench.sweep import Sweep, run_sweep
from llmbus.bench.verdicts import compute_ratios, diagnostics, http_notes, peer_notes, point_notes
from llmbus.bench.workload import workload


def main(argv: Sequence[str] | None = None) -> int:
    from llmbus import bench

    opts = parse_options(sys.argv[1:] if argv is None else argv, description=bench.__doc__)
    if importlib.util.find_spec("matplotlib") is None:
        progress("error: the plot needs matplotlib: pip install 'llmbus[bench]'")
        return 2
    with exit_on_signals():
        return run(opts)


def run(opts: BenchOptions) -> int:
    """The whole bench; 0 when every point was measured. 1 when a check failed (nothing is written), or when the
    stack did not start or a worker or the bridge died: then the baselines, the points measured until then (none
    if it happened before the first) and the reason (`stopped`) are still written to bench.json and the plot."""
    started = time.time()
    load_before = os.getloadavg()
    prompts = workload(opts.seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    progress(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    for check in (check_bus, check_bridge, check_peer):
        if problem := check(opts):
            progress(f"error: {problem}")
            return 1
    baselines, meter = (None, None) if opts.skip_baselines else measure_baselines(opts, prompts)
    if opts.rounds == 1:
        meter = None  # the ceiling is not measured again: free its model before the workers load theirs
        gc.collect()
    stack = Stack(opts)
    try:
        stack.start()
        sweep = asyncio.run(run_sweep(opts, stack, prompts, meter))
    except FAILURES as exc:
        progress(f"error: {describe(exc)}")
        if baselines is None:
            return 1
        sweep = Sweep(0, 0.0, [], stopped=f"{describe(exc)} (before the first point)")  # keep the baselines' minutes
    finally:
        stack.stop()
        del meter
    if baselines is not None and sweep.ceiling:
        use_ceiling_of_rounds(baselines, sweep.ceiling)
    ratios = compute_ratios(sweep.points, baselines, sweep.http_points)
    notes = diagnostics(sweep.points, baselines, load_before[0], sweep.worker_options)
    notes += http_notes(sweep.http_points, sweep.points) + peer_notes(sweep.peer_points, sweep.points)
    notes += point_notes([*sweep.points, *sweep.http_points, *sweep.peer_points])
    print_summary(sweep, baselines, ratios, notes)
    report = build_report(opts, stack, prompts, baselines, sweep, ratios, notes)
    report["machine"]["load_average_before"] = load_before
    report["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
    report["duration_s"] = time.time() - started
    json_path, png_path = opts.out / "bench.json", opts.out / "bench.png"
    write_json(json_path, report)
    plot(png_path, sweep, baselines, title(opts, report), opts.peer_model)
    progress(f"wrote {json_path} and {png_path} ({report['duration_s']:.0f} s)")
    if sweep.stopped:
        progress(f"error: {sweep.stopped}: bench.json and the plot hold the points measured until then")
        return 1
    return 0


def use_ceiling_of_rounds(baselines: Baselines, rounds: list[CeilingPoint]) -> None:
    """The ratios use the eager ceiling measured in the rounds, batch by batch (a sweep that stopped early keeps the
    ceiling measured before the stack for the batches it did not reach); that one stays in `ceiling_before_stack`."""
    by_batch = {point.batch: point for point in rounds}
    baselines.ceiling_before_stack = baselines.ceiling
    baselines.ceiling = [by_batch.get(point.batch, point) for point in baselines.ceiling]


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
