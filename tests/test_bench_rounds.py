"""`llmbus bench --rounds N`: the targets alternate their order round by round, and each target's rounds are one
point (tokens/s over the summed wall time, percentiles over all the requests, counters summed). One round is the
point as measured, and bench.json never carries the raw requests. With N > 1 the eager ceiling is measured in the
rounds too, and the ratios use that one."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable

import pytest

from llmbus.bench.baselines import Baselines, CeilingPoint, NaiveResult, PrefillResult, ceiling_point
from llmbus.bench.main import use_ceiling_of_rounds
from llmbus.bench.options import BenchOptions, parse_options
from llmbus.bench.report import baselines_json, point_json
from llmbus.bench.rounds import in_round_order, merge_ceilings, merge_rounds
from llmbus.bench.stats import PointResult, RequestRecord, summarize
from llmbus.bench.summary import summary_lines
from llmbus.bench.sweep import Sweep, Target, ceiling_in_a_thread, measure_points
from llmbus.bench.verdicts import compute_ratios, diagnostics


def measured(concurrency: int, via: str, wall_s: float, first_token_s: float, tokens: int) -> PointResult:
    """A point of `concurrency` requests of `tokens` tokens each, first token after `first_token_s`."""
    records = [
        RequestRecord(sent=0.0, token_times=[first_token_s, first_token_s + 0.1], end=1.0, usage_tokens=tokens)
        for _ in range(concurrency)
    ]
    point = summarize(concurrency, records, wall_s, False, via)
    point.client_cpu_s, point.worker_cpu_s, point.bridge_cpu_s = 0.5, 10.0, None
    point.engine_decode_steps, point.engine_mean_decode_batch, point.engine_decode_s = 100, float(concurrency), 5.0
    return point


def test_the_targets_alternate_their_order_round_by_round() -> None:
    assert [in_round_order(["nats", "http"], r) for r in range(3)] == [
        ["nats", "http"],
        ["http", "nats"],
        ["nats", "http"],
    ]


def test_one_round_is_the_point_as_measured() -> None:
    point = measured(4, "nats", 2.0, 0.1, 8)
    assert merge_rounds([point]) is point and point.rounds == 1


def test_rounds_merge_into_one_point_over_all_their_requests() -> None:
    fast, slow = measured(4, "http", 2.0, 0.1, 8), measured(4, "http", 6.0, 0.5, 8)
    merged = merge_rounds([fast, slow])
    assert merged.rounds == 2 and merged.requests == 8 and merged.completion_tokens == 64
    assert merged.tokens_per_s == pytest.approx(64 / 8.0)  # over the summed wall time, not a mean of rates
    assert merged.ttft_p50_s == pytest.approx(0.3)  # the median of all eight first tokens
    assert merged.client_cpu_s == 1.0 and merged.worker_cpu_s == 20.0 and merged.bridge_cpu_s is None
    assert merged.engine_decode_steps == 200 and merged.engine_decode_s == 10.0 and merged.engine_mean_decode_batch == 4
    assert "records" not in point_json(merged) and point_json(merged)["rounds"] == 2
    json.dumps(point_json(merged))  # bench.json can hold it


async def never_sent(prompt: str, max_tokens: int) -> RequestRecord:
    raise AssertionError("`measure` stands in for the requests")


TARGETS = [Target("nats", never_sent, True), Target("http", never_sent, True)]


def measure_in(order: list[str]) -> Callable[[Target, int, int], Awaitable[PointResult]]:
    """A stand-in for a point's requests: notes the point in `order`; its wall time is its place in the order + 1."""

    async def measure(target: Target, concurrency: int, per_client: int) -> PointResult:
        order.append(f"{target.via}@{concurrency}")
        return measured(concurrency, target.via, 1.0 + len(order), 0.1, 8)

    return measure


async def test_a_sweep_of_two_rounds_measures_abba_and_reports_one_point_per_target() -> None:
    opts = BenchOptions(concurrency=[2, 8], rounds=2, skip_baselines=True)
    order: list[str] = []
    sweep = Sweep(1, 0.0, [])
    await measure_points(sweep, TARGETS, opts, measure_in(order), lambda: None)
    assert order == ["nats@2", "http@2", "http@2", "nats@2", "nats@8", "http@8", "http@8", "nats@8"]
    assert [(p.concurrency, p.rounds) for p in sweep.points] == [(2, 2), (8, 2)]
    assert [(p.concurrency, p.rounds) for p in sweep.http_points] == [(2, 2), (8, 2)]
    assert sweep.points[0].wall_s == 2.0 + 5.0 and sweep.http_points[0].wall_s == 3.0 + 4.0  # rounds 1 and 4; 2 and 3


def test_rounds_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_options(["--rounds", "3"]).rounds == 3 and parse_options([]).rounds == 1
    with pytest.raises(SystemExit):
        parse_options(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def ceiling(batch: int, step_s: float, steps: int = 4, beside_the_stack: bool = True) -> CeilingPoint:
    point = ceiling_point(batch, [step_s] * steps, "hf", capped=False)
    point.beside_the_stack = beside_the_stack
    return point


async def test_with_rounds_the_eager_ceiling_is_measured_in_each_round_among_the_targets() -> None:
    opts = BenchOptions(concurrency=[1, 8], rounds=2, skip_baselines=True)
    order: list[str] = []

    async def eager(batch: int) -> CeilingPoint:
        order.append(f"eager@{batch}")
        return ceiling(batch, 0.1 if len(order) <= 3 else 0.3)  # the machine slowed down after the first round

    sweep = Sweep(1, 0.0, [])
    await measure_points(sweep, TARGETS, opts, measure_in(order), lambda: None, eager)
    assert order[:6] == ["nats@1", "http@1", "eager@1", "eager@1", "http@1", "nats@1"]
    assert order[6:] == ["nats@8", "http@8", "eager@8", "eager@8", "http@8", "nats@8"]
    first = sweep.ceiling[0]
    assert [(c.batch, c.rounds, c.steps) for c in sweep.ceiling] == [(1, 2, 8), (8, 2, 8)]
    assert first.tokens_per_s == pytest.approx(8 / (4 * 0.1 + 4 * 0.3))  # over all the timed steps of both rounds
    assert first.beside_the_stack


def test_the_ratios_use_the_ceiling_of_the_rounds_and_bench_json_keeps_both() -> None:
    before = [ceiling(1, 0.025, beside_the_stack=False), ceiling(64, 0.1, beside_the_stack=False)]
    baselines = Baselines(
        "hf", "eager", before, PrefillResult(0.05, [0.05], [20], 0.02, [10]), NaiveResult(1, 1, 8, 1.0, 8.0), 60.0
    )
    in_rounds = merge_ceilings([ceiling(1, 0.04), ceiling(1, 0.06)])  # batch 64 not reached: the sweep stopped
    use_ceiling_of_rounds(baselines, [in_rounds])
    assert baselines.ceiling == [in_rounds, before[1]] and baselines.ceiling_before_stack == before
    one = measured(1, "nats", 8 / 40.0, 0.01, 8)  # 40 tok/s
    ratio = next(r for r in compute_ratios([one], baselines) if r.name == "throughput_vs_ceiling_at_1")
    assert ratio.value == pytest.approx(40 / 20.0)  # 20 tok/s in the rounds (0.05 s a step), not the 40 before
    before_stack = [n for n in diagnostics([one], baselines, 0.0) if "before the stack started" in n]
    assert before_stack == [
        "eager ceiling batch 1: 20.0 tok/s in the rounds (what the ratios use), 40.0 before the stack started; "
        "against that one, throughput@1 / eager ceiling@1 = 1.000"
    ]
    lines = summary_lines(Sweep(1, 0.0, [one]), baselines, [], [])
    assert (
        "eager ceiling tok/s by batch (, 0 threads; measured in the rounds, beside the idle stack): "
        "1: 20.0, 64: 640.0 (before the stack)" in lines
    )
    out = baselines_json(baselines)
    assert out["ceiling"][0]["rounds"] == 2 and out["ceiling"][0]["beside_the_stack"]
    assert out["ceiling_before_stack"][0]["ceiling_tokens_per_s"] == pytest.approx(40.0)
    assert all("step_times_s" not in p for p in [*out["ceiling"], *out["ceiling_before_stack"]])
    json.dumps(out)


def test_one_ceiling_round_is_the_point_as_measured() -> None:
    point = ceiling(8, 0.1)
    assert merge_ceilings([point]) is point and point.rounds == 1


async def test_a_cancelled_ceiling_stops_its_loop_after_the_current_step() -> None:
    """Ctrl-C during a ceiling of the rounds: the eager loop runs in a thread, which a cancel cannot interrupt, so
    the bench would wait out the whole loop (up to its time cap) before stopping its stack."""
    running, stops = threading.Event(), []

    class Meter:
        def measure(self, batch: int, beside_the_stack: bool, stop: threading.Event) -> CeilingPoint:
            stops.append(stop)
            running.set()
            assert stop.wait(timeout=60), "nobody told the loop to stop"
            return ceiling(batch, 0.1)

    task = asyncio.create_task(ceiling_in_a_thread(Meter())(1))  # type: ignore[arg-type]
    await asyncio.to_thread(running.wait, 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stops[0].is_set()
