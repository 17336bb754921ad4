"""`llmbus bench` end to end with tiny settings: it starts its own nats-server, a pinned worker process and an
HTTP bridge process, measures the in-process baselines, measures a peer (llmbus's own bridge beside the shared
test worker, as any OpenAI-compatible server would be) and writes a complete report. Speed is not asserted here;
the bench itself reports it."""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import pytest

from helpers.bridge import Bridge
from helpers.workers import RunningWorker
from inference_worker.model_loader import LoadedModel
from llmbus import bench
from llmbus.bench.eager import EagerModel, decode_loop, generate

POINT_FIELDS = {
    "concurrency",
    "requests",
    "errors",
    "completion_tokens",
    "wall_s",
    "tokens_per_s",
    "requests_per_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "itl_p50_s",
    "itl_p95_s",
    "e2e_p50_s",
    "e2e_p95_s",
    "engine_decode_steps",
    "engine_mean_decode_batch",
    "engine_decode_s",
    "engine_prefill_s",
}
MACHINE_FIELDS = {"cpu_count", "torch_threads", "device", "dtype", "load_average_before", "load_average_after"}
REPORT_KEYS = {"config", "machine", "workload", "workers", "baselines", "points", "ratios", "duration_s"}
NEW_REPORT_KEYS = {"http", "http_points", "http_over_nats", "peer", "peer_points", "nats_over_peer", "warmups_s"}


def check_points(points: list[dict], max_tokens: int) -> None:
    assert [p["concurrency"] for p in points] == [1, 2]
    for point in points:
        assert set(point) >= POINT_FIELDS
        assert point["errors"] == 0, point["error_samples"]
        assert point["requests"] >= 1
        assert 0 < point["completion_tokens"] <= max_tokens * point["requests"]
        assert point["ttft_p50_s"] <= point["e2e_p50_s"]


@pytest.mark.model
@pytest.mark.timeout(600)
async def test_bench_over_nats_http_and_a_peer_writes_complete_json_and_plot(
    tmp_path: Path, worker: RunningWorker, bridge: Bridge, smollm: LoadedModel
) -> None:
    argv = ["--concurrency", "1,2", "--max-tokens", "8", "--requests-per-client", "1", "--min-requests", "1"]
    argv += ["--naive-requests", "2", "--warmup-requests", "1", "--out", str(tmp_path)]
    argv += ["--http", "--peer-url", bridge.url + "/v1", "--peer-model", smollm.name]
    argv += ["--pin", "--cores-per-worker", "1", "--worker-arg=--max-tokens-cap=512"]

    # The peer (bridge + worker) serves from this event loop while the bench runs its own in a thread.
    assert await asyncio.to_thread(bench.main, argv) == 0

    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report) >= REPORT_KEYS | NEW_REPORT_KEYS
    assert set(report["machine"]) >= MACHINE_FIELDS
    assert report["config"]["concurrency"] == [1, 2]
    for key in ("points", "http_points", "peer_points"):
        check_points(report[key], max_tokens=8)
    assert {p["via"] for p in report["http_points"]} == {"http"}
    assert all(p["engine_decode_steps"] > 0 for p in report["http_points"]), "the bridge must reach our worker"
    for point in report["points"]:  # the engine was busy for part of the point's wall time, never more
        assert 0 < point["engine_decode_s"] + point["engine_prefill_s"] <= point["wall_s"]
    assert report["peer"]["model"] == smollm.name and report["peer"]["token_count_source"] == ["usage"]
    assert report["http"]["started_by_bench"] is True
    for key in ("http_over_nats", "nats_over_peer"):
        assert [row["concurrency"] for row in report[key]] == [1, 2]
        assert all(row["tokens_per_s"] > 0 for row in report[key])

    workers = report["workers"]
    assert workers["pinned"] is True and workers["threads"] == 1
    first_core = [min(os.sched_getaffinity(0))]
    assert [(p["pinned_cores"], p["affinity"]) for p in workers["processes"]] == [(first_core, first_core)]
    assert workers["extra_args"] == ["--max-tokens-cap=512"]
    assert workers["options"][0]["max_tokens_cap"] == "512", "the --worker-arg reached the worker"
    assert {"device", "dtype", "model"} <= set(workers["options"][0])

    baselines = report["baselines"]
    assert [c["batch"] for c in baselines["ceiling"]] == [1, 2]
    assert all(c["tokens_per_s"] > 0 and c["method"] == "hf" for c in baselines["ceiling"])
    assert baselines["prefill"]["p50_s"] > 0
    assert baselines["naive"]["requests"] == 2 and baselines["naive"]["tokens_per_s"] > 0

    ratios = {r["name"]: r for r in report["ratios"]}
    assert set(ratios) == set(bench.TARGETS)
    for ratio in ratios.values():
        assert math.isfinite(ratio["value"]), ratio
        assert ratio["status"] in {"PASS", "MISS"}

    png = tmp_path / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
def test_eager_ceiling_loop_decodes_what_generate_decodes() -> None:
    """The ceiling is a real greedy decode: left-padded batch rows give the tokens `model.generate` gives each
    prompt alone (float32, so that padding cannot change a near tie)."""
    m = EagerModel.load(None, "cpu", "float32")
    prompts = [m.encode("Name three colours.")[0], m.encode("Write a long story about a lighthouse keeper.")[0]]
    assert len(prompts[0]) != len(prompts[1])

    times, tokens = decode_loop(m, prompts, steps=6, time_cap=60.0)

    assert len(times) == 6
    for row, ids in zip(tokens.tolist(), prompts, strict=True):
        expected = generate(m, ids, 7, max_time=60.0)
        assert row[: len(expected)] == expected
