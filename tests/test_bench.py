"""`llmbus bench` end to end with tiny settings: it starts its own nats-server and worker process, measures the
in-process baselines and writes a complete report. Speed is not asserted here; the bench itself reports it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmbus import bench

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
}
MACHINE_FIELDS = {"cpu_count", "torch_threads", "device", "dtype", "load_average_before", "load_average_after"}


@pytest.mark.model
@pytest.mark.timeout(600)
def test_bench_writes_complete_json_and_plot(tmp_path: Path) -> None:
    argv = ["--concurrency", "1,2", "--max-tokens", "8", "--requests-per-client", "1", "--min-requests", "1"]
    argv += ["--naive-requests", "2", "--warmup-requests", "1", "--out", str(tmp_path)]

    assert bench.main(argv) == 0

    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"config", "machine", "workload", "workers", "baselines", "points", "ratios", "duration_s"} <= set(report)
    assert set(report["machine"]) >= MACHINE_FIELDS
    assert report["config"]["concurrency"] == [1, 2]
    assert [p["concurrency"] for p in report["points"]] == [1, 2]
    for point in report["points"]:
        assert set(point) >= POINT_FIELDS
        assert point["errors"] == 0
        assert point["requests"] >= 1
        assert 0 < point["completion_tokens"] <= 8 * point["requests"]
        assert point["ttft_p50_s"] <= point["e2e_p50_s"]

    baselines = report["baselines"]
    assert [c["batch"] for c in baselines["ceiling"]] == [1, 2]
    assert all(c["tokens_per_s"] > 0 and c["method"] in {"hf", "runner"} for c in baselines["ceiling"])
    assert baselines["prefill"]["p50_s"] > 0
    assert baselines["naive"]["requests"] == 2 and baselines["naive"]["tokens_per_s"] > 0

    ratios = {r["name"]: r for r in report["ratios"]}
    assert set(ratios) == set(bench.TARGETS)
    for ratio in ratios.values():
        assert math.isfinite(ratio["value"])
        assert ratio["status"] in {"PASS", "MISS"}

    png = tmp_path / "bench.png"
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
