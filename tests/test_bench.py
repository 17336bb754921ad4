"""`llmbus bench` end to end with tiny settings: it starts its own nats-server, a pinned worker process and an
HTTP bridge process, measures the in-process baselines, measures a peer (llmbus's own bridge beside the shared
test worker, as any OpenAI-compatible server would be) and writes a complete report. Speed is not asserted here;
the bench itself reports it. And what main does around the phases: it fails in seconds on a bus or a bridge it
cannot reach, a `kill` stops what it started, and the bridge it starts logs in with the bench's NATS settings."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.bridge import Bridge
from helpers.tiny_model import save_model_directory, tiny_model
from helpers.workers import RunningWorker
from inference_worker.model_loader import LoadedModel
from llmbus import bench
from llmbus.bench.cores import physical_cores, read_topology
from llmbus.bench.eager import EagerModel, decode_loop, generate
from llmbus.bench.options import parse_options
from llmbus.bench.stack import Stack, WorkerProcess, gateway_env
from llmbus.config import Config
from llmbus.nats_server import NatsServer, free_port

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
    available = os.sched_getaffinity(0)
    first_core = physical_cores(available, read_topology(available))[0]  # every hyper-thread of the first core
    assert workers["pinned"] is True and workers["threads"] == len(first_core)
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


class StuckProcess:
    """A worker process that cannot be signalled (as when stopping it raises)."""

    pid = 1
    returncode = None

    def poll(self) -> None:
        return None

    def send_signal(self, signum: int) -> None:
        raise PermissionError("not allowed")


class RecordingServer:
    stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_the_nats_server_is_stopped_even_when_stopping_a_worker_raises(tmp_path: Path) -> None:
    server = RecordingServer()
    stack = Stack(parse_options(["--out", str(tmp_path)]), server=server)  # type: ignore[arg-type]
    stack.workers.append(WorkerProcess(0, StuckProcess(), [], 1, None, tmp_path / "w.log"))  # type: ignore[arg-type]
    with pytest.raises(PermissionError):
        stack.stop()
    assert server.stopped and stack.server is None


def test_the_bench_started_bridge_logs_in_to_nats_with_the_bench_settings_from_the_environment() -> None:
    """Flags would show the secrets in `ps`; the bench's own login reaches the bridge as LLMBUS_NATS_*."""
    env = {"PATH": "/bin", "LLMBUS_API_KEYS": "k", "LLMBUS_NATS_CREDS": "stale.creds", "LLMBUS_NATS_USER": "old"}
    connection = Config(
        nats_url="tls://h:4222",
        nats_token="tok",
        nats_tls_ca="ca.pem",
        nats_tls_cert="c.pem",
        nats_tls_key="k.pem",
        nats_inbox_prefix="_INBOX.bench",
    )
    child = gateway_env(env, connection)
    assert child["PATH"] == "/bin" and "LLMBUS_API_KEYS" not in child
    assert child["LLMBUS_NATS_URL"] == "tls://h:4222" and child["LLMBUS_NATS_TOKEN"] == "tok"
    assert (child["LLMBUS_NATS_TLS_CA"], child["LLMBUS_NATS_TLS_CERT"], child["LLMBUS_NATS_TLS_KEY"]) == (
        "ca.pem",
        "c.pem",
        "k.pem",
    )
    assert child["LLMBUS_NATS_INBOX_PREFIX"] == "_INBOX.bench"
    assert "LLMBUS_NATS_CREDS" not in child and "LLMBUS_NATS_USER" not in child  # not the bench's login
    assert Config.load(env=child).nats_token == "tok"
    with_user = gateway_env({}, Config(nats_user="alice", nats_password="pw"))
    assert (with_user["LLMBUS_NATS_USER"], with_user["LLMBUS_NATS_PASSWORD"]) == ("alice", "pw")


def no_baselines(*args: object) -> None:
    raise AssertionError("the baselines ran before the check")


@pytest.mark.parametrize("bridge_is_down", [False, True])
def test_a_bus_or_bridge_that_does_not_answer_fails_before_the_baselines_in_one_line(
    bridge_is_down: bool,
    nats_server: NatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.import_module("llmbus.bench.main"), "measure_baselines", no_baselines)
    argv = ["--out", str(tmp_path)]
    if bridge_is_down:
        argv += ["--nats-url", nats_server.url, "--http-url", f"http://127.0.0.1:{free_port()}"]
        expected = "did not answer GET /readyz"
    else:
        argv += ["--nats-url", f"nats://127.0.0.1:{free_port()}"]
        expected = "error: cannot connect to NATS at nats://127.0.0.1:"
    assert bench.main(argv) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def start_bench_holding_a_bridge(nats_url: str, out: Path) -> tuple[subprocess.Popen[str], int, list[str]]:
    """The bench with --http on a bus without workers: it starts its bridge, then waits for workers that never come.
    Returns the bench, its bridge's pid and the bench's output so far."""
    argv = ["--nats-url", nats_url, "--http", "--skip-baselines", "--ready-timeout", "600", "--out", str(out)]
    bench_proc = subprocess.Popen([sys.executable, "-m", "llmbus.bench", *argv], stderr=subprocess.PIPE, text=True)
    assert bench_proc.stderr is not None
    seen = []
    for line in bench_proc.stderr:
        seen.append(line)
        if started := re.search(r"HTTP bridge started .*\(pid (\d+)", line):
            return bench_proc, int(started[1]), seen
    bench_proc.wait()
    raise AssertionError("".join(seen))


def test_a_worker_that_exits_at_its_start_keeps_the_baselines_measured_before_it(tmp_path: Path) -> None:
    """The baselines take minutes on a real model; a worker that never serves (here: a flag it refuses) must not
    throw them away. bench.json holds them, no point, and the reason; the exit status is 1."""
    model = save_model_directory(tiny_model(), tmp_path / "tiny")
    argv = ["--model", str(model), "--device", "cpu", "--concurrency", "1", "--max-tokens", "4"]
    argv += ["--naive-requests", "2", "--ready-timeout", "120", "--out", str(tmp_path / "out")]
    argv += ["--worker-arg=--no-such-flag"]
    assert bench.main(argv) == 1
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["points"] == [] and report["http_points"] == []
    assert "worker 0 exited" in report["stopped"] and "before the first point" in report["stopped"]
    assert [c["batch"] for c in report["baselines"]["ceiling"]] == [1]
    assert report["baselines"]["naive"]["requests"] == 2 and report["baselines"]["prefill"]["p50_s"] > 0
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0


BENCH_STOP_S = 240  # below pytest's 300 s timeout, so that a bench that does not stop says what it printed


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda sig: sig.name)
def test_killing_the_bench_stops_the_processes_it_started(
    kill: signal.Signals, fresh_nats_server: NatsServer, tmp_path: Path
) -> None:
    """`kill <bench>` or a closed terminal runs the same cleanup as Ctrl-C; after a SIGKILL, which no cleanup
    survives, the kernel sends the bridge SIGTERM (PR_SET_PDEATHSIG)."""
    bench_proc, bridge_pid, seen = start_bench_holding_a_bridge(fresh_nats_server.url, tmp_path)
    bridge = os.pidfd_open(bridge_pid)  # readable once the bridge has exited, whoever's child it is by then
    try:
        bench_proc.send_signal(kill)
        try:
            _, rest = bench_proc.communicate(timeout=BENCH_STOP_S)
        except subprocess.TimeoutExpired as late:  # once in CI (not reproduced): say what the bench said
            said = "".join(seen) + (late.stderr.decode(errors="replace") if isinstance(late.stderr, bytes) else "")
            raise AssertionError(f"the bench did not exit within {BENCH_STOP_S} s of {kill.name}:\n{said}") from None
        if kill == signal.SIGKILL:
            select.select([bridge], [], [], 60)  # the kernel's SIGTERM, then the bridge's own stop
        else:
            assert bench_proc.returncode == 128 + kill, "".join(seen) + rest
            assert "did not end within" not in rest, rest  # the cleanup itself ended, not its watchdog
        assert select.select([bridge], [], [], 0)[0], "the bench left its bridge running"
    finally:
        bench_proc.kill()
        bench_proc.wait()
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(bridge, signal.SIGKILL)
        os.close(bridge)


HANGING_CLEANUP = """
import threading
from llmbus.bench import signals

signals.EXIT_GRACE_S = 0.5

def cleanup_that_never_ends():
    threading.Event().wait()

with signals.exit_on_signals():
    try:
        print("ready", flush=True)
        threading.Event().wait()
    finally:
        cleanup_that_never_ends()
"""


def test_a_bench_whose_cleanup_hangs_after_sigterm_exits_and_says_where_it_waited() -> None:
    """A cleanup that never ends is cut short `EXIT_GRACE_S` after the signal: the bench exits with the signal's
    status and prints every thread's stack, the frame it waited in among them."""
    child = subprocess.Popen(
        [sys.executable, "-c", HANGING_CLEANUP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert "the cleanup after SIGTERM did not end within 0.5 s; exiting now" in stderr
    assert "cleanup_that_never_ends" in stderr
