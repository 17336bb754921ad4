"""The bench's fixes from a review: pinned workers get whole physical cores on SMT machines, `--request-timeout`
is an idle timeout on HTTP as on NATS, NATS and HTTP requests name the same model, a worker dying mid-sweep keeps
the points measured before it, and pairwise ratios say when their points had failed requests. Crafted
topologies, metadata, streams and points; one test asks a real worker for its model by name."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bus_gateway.client import BusClient
from helpers.workers import start_worker
from inference_worker.model_loader import LoadedModel
from llmbus.bench import options as bench_options
from llmbus.bench.bus_load import measured_model, worker_options
from llmbus.bench.cores import physical_cores, read_topology
from llmbus.bench.http_load import OpenAITarget, stream_over_http
from llmbus.bench.options import BenchError, BenchOptions, build_parser, parse_options
from llmbus.bench.stack import assign_cores
from llmbus.bench.stats import PointResult, RequestRecord, summarize
from llmbus.bench.summary import summary_lines
from llmbus.bench.sweep import Sweep, Target, bus_sender, measure_points
from llmbus.bench.verdicts import compute_ratios, pairwise, point_notes
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import ChatChunk, ChatRequest, Usage

bench_main = importlib.import_module("llmbus.bench.main")  # `llmbus.bench.main` the name is the function

# --- 1. --pin hands out whole physical cores ---------------------------------------------------------------------


def smt(cores: int, packages: int = 1) -> dict[int, tuple[int, int]]:
    """The usual x86 numbering: CPU k and CPU k + (number of cores) are the two hyper-threads of one core; core ids
    restart at 0 in each package."""
    per_package = cores // packages
    return {cpu: ((cpu % cores) // per_package, (cpu % cores) % per_package) for cpu in range(2 * cores)}


def test_pinned_workers_on_an_smt_machine_get_whole_cores_and_never_share_one() -> None:
    topology = smt(8)
    groups = assign_cores(range(16), 2, topology=topology)
    assert groups == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    first, second = ({topology[cpu] for cpu in group} for group in groups)
    assert not first & second, "two workers on the same physical core"
    assert assign_cores(range(16), 3, per_worker=1, topology=topology) == [[0, 8], [1, 9], [2, 10]]
    two_sockets = smt(4, packages=2)  # core ids 0-1 in each package: the package tells them apart
    assert assign_cores(range(8), 4, topology=two_sockets) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert physical_cores([0, 8, 1], topology) == [[0, 8], [1]]  # only CPUs in the affinity mask


def test_pinning_more_workers_than_whole_cores_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BenchError, match=r"3 worker\(s\) do not fit in 2 whole core\(s\)"):
        assign_cores(range(4), 3, topology=smt(2))
    with pytest.raises(BenchError, match="do not fit"):
        assign_cores(range(16), 3, per_worker=3, topology=smt(8))
    available = sorted(os.sched_getaffinity(0))
    one_core = {cpu: (0, 0) for cpu in available}  # every CPU of this machine a hyper-thread of one core
    monkeypatch.setattr(bench_options, "read_topology", lambda cpus: one_core)
    with pytest.raises(SystemExit):
        parse_options(["--pin", "--workers", "2"])
    assert bench_options.check(BenchOptions(pin=True, workers=2)) is not None
    assert bench_options.check(BenchOptions(pin=True, workers=1)) is None


def test_the_topology_is_read_from_sysfs_and_each_cpu_is_a_core_without_it(tmp_path: Path) -> None:
    for cpu, (package, core) in smt(2).items():
        folder = tmp_path / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    topology = read_topology(range(4), root=tmp_path)
    assert topology == smt(2)
    assert assign_cores(range(4), 2, topology=topology) == [[0, 2], [1, 3]]
    (tmp_path / "cpu3" / "topology" / "core_id").unlink()
    assert read_topology(range(4), root=tmp_path) is None
    assert assign_cores(range(4), 2, topology=None) == [[0, 1], [2, 3]]  # one core per CPU


# --- 2. --request-timeout is an idle timeout on HTTP, as on NATS ------------------------------------------------


class JumpingClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a test moves forward at will, so that timeouts of minutes run in no time."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0.0

    def time(self) -> float:
        return super().time() + self.skipped


async def wait_virtually(seconds: float) -> None:
    """Let `seconds` pass on the loop's clock while suspended: timers that fall due fire before this returns."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, JumpingClockLoop)
    loop.skipped += seconds
    await asyncio.sleep(0)  # the loop sees the due timers...
    await asyncio.sleep(0)  # ...and runs them while this task is still suspended


def sse_body(tokens: int) -> list[bytes]:
    deltas = [f'data: {{"choices":[{{"delta":{{"content":"t{i}"}}}}]}}\n\n'.encode() for i in range(tokens)]
    last = b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\ndata: [DONE]\n\n'
    return [*deltas, last]


class SlowResponse(SimpleNamespace):
    """An `aiohttp.ClientResponse`'s status and body, and its `async with` (which releases nothing here)."""

    async def __aenter__(self) -> SlowResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class SlowServer:
    """Stands in for `aiohttp.ClientSession`: answers after `headers_after` seconds, then sends each body read
    `gaps[i]` seconds after the one before, on the loop's jumping clock."""

    def __init__(self, headers_after: float, gaps: list[float]) -> None:
        self.headers_after = headers_after
        self.gaps = gaps

    async def post(self, url: str, json: dict[str, Any], headers: dict[str, str]) -> SlowResponse:
        await wait_virtually(self.headers_after)
        return SlowResponse(status=200, content=SimpleNamespace(iter_any=self.reads))

    async def reads(self) -> AsyncIterator[bytes]:
        for gap, chunk in zip(self.gaps, sse_body(len(self.gaps) - 1), strict=True):
            await wait_virtually(gap)
            yield chunk


def stream_on_jumping_clock(server: SlowServer, timeout: float) -> RequestRecord:
    loop = JumpingClockLoop()
    target = OpenAITarget("the bridge", "http://bridge", "m")
    try:
        return loop.run_until_complete(stream_over_http(server, target, "Hi", 8, timeout))  # type: ignore[arg-type]
    finally:
        loop.close()


def test_an_http_stream_that_keeps_streaming_is_never_cut_by_the_request_timeout() -> None:
    """Six reads 100 s apart with a 150 s timeout: 600 s in all, but never 150 s without a read (as on NATS)."""
    record = stream_on_jumping_clock(SlowServer(headers_after=100.0, gaps=[100.0] * 6), timeout=150.0)
    assert record.error is None and record.ok
    assert record.completion_tokens == 5 and record.finish_reason == "length"


def test_an_http_stream_idle_for_longer_than_the_request_timeout_fails() -> None:
    stalled = stream_on_jumping_clock(SlowServer(headers_after=1.0, gaps=[1.0, 1.0, 200.0, 1.0]), timeout=150.0)
    assert stalled.error == "nothing from the server for 150s (idle timeout)"
    no_answer = stream_on_jumping_clock(SlowServer(headers_after=200.0, gaps=[1.0, 1.0]), timeout=150.0)
    assert no_answer.error == "nothing from the server for 150s (idle timeout)"
    help_text = next(a.help for a in build_parser()._actions if a.dest == "request_timeout")
    assert help_text is not None and "idle timeout" in help_text and "each next" in help_text


# --- 3. NATS and HTTP requests name the same model ---------------------------------------------------------------


def metadata(model: str, default: bool = False) -> dict[str, str]:
    return {"model": model, "default_model": str(default).lower(), "subject_prefix": "llm"}


def test_the_measured_model_is_the_bus_default_else_the_only_one_else_named() -> None:
    assert measured_model([metadata("smol"), metadata("smol")]) == "smol"  # the bench's own workers
    assert measured_model([metadata("alpha"), metadata("beta", default=True)]) == "beta"  # not sorted()[0]
    assert measured_model([{"pid": "1"}]) is None  # no model named: the bus default, by NATS
    with pytest.raises(BenchError, match=r"several models \(alpha, beta\) and none is the default.*--served-model"):
        measured_model([metadata("alpha"), metadata("beta")])
    with pytest.raises(BenchError, match="alpha, beta all claim to be the default"):
        measured_model([metadata("alpha", default=True), metadata("beta", default=True)])
    assert measured_model([metadata("alpha"), metadata("beta", default=True)], named="alpha") == "alpha"
    with pytest.raises(BenchError, match="--served-model gamma: no worker serves it"):
        measured_model([metadata("alpha")], named="gamma")
    assert parse_options(["--served-model", "alpha"]).served_model == "alpha"


class RecordingBus:
    """Stands in for `BusClient`: keeps each request and answers it with one chunk and the last."""

    def __init__(self) -> None:
        self.requests: list[ChatRequest] = []

    async def stream(self, request: ChatRequest, timeout: float) -> AsyncIterator[ChatChunk]:
        self.requests.append(request)
        yield ChatChunk(chat_id=request.chat_id, delta="Hi", index=1)
        usage = Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
        yield ChatChunk(chat_id=request.chat_id, delta="", index=2, done=True, finish_reason="stop", usage=usage)


async def test_nats_requests_name_the_model_the_http_requests_name() -> None:
    bus = RecordingBus()
    model = measured_model([metadata("alpha"), metadata("beta", default=True)])
    record = await bus_sender(bus, 30.0, model)("Hello", 8)  # type: ignore[arg-type]
    assert record.ok and record.completion_tokens == 1
    assert [r.model for r in bus.requests] == ["beta"]
    assert OpenAITarget("the HTTP bridge", "http://b", model or "").body("Hello", 8)["model"] == "beta"


# --- 4. a worker dying mid-sweep keeps what was measured -----------------------------------------------------------


def point(concurrency: int, tokens_per_s: float, via: str = "nats", errors: int = 0) -> PointResult:
    records = [RequestRecord(sent=0.0, token_times=[0.1, 0.2], end=0.4, usage_tokens=2)]
    records += [RequestRecord(sent=0.0, error="504 no message") for _ in range(errors)]
    p = summarize(concurrency, records, 1.0, False, via)
    p.tokens_per_s = tokens_per_s
    return p


async def test_a_worker_dying_mid_sweep_marks_that_point_failed_and_stops_the_sweep() -> None:
    opts = BenchOptions(concurrency=[1, 8, 32], skip_baselines=True)

    async def never_sent(prompt: str, max_tokens: int) -> RequestRecord:
        raise AssertionError("`measure` stands in for the requests")

    targets = [Target("nats", never_sent, True), Target("http", never_sent, True)]
    measured: list[str] = []
    checks = 0

    async def measure(target: Target, concurrency: int, per_client: int) -> PointResult:
        measured.append(f"{target.via}@{concurrency}")
        return point(concurrency, 100.0 * concurrency, target.via)

    def check_alive() -> None:
        nonlocal checks
        checks += 1
        if checks == 3:
            raise BenchError("worker 0 exited with code -9; see worker-0.log")

    sweep = Sweep(1, 0.0, [])
    await measure_points(sweep, targets, opts, measure, check_alive)
    assert measured == ["nats@1", "http@1", "nats@8"]
    assert [p.concurrency for p in sweep.points] == [1, 8] and [p.concurrency for p in sweep.http_points] == [1]
    assert sweep.points[0].stack_failure is None
    assert sweep.points[1].stack_failure == "worker 0 exited with code -9; see worker-0.log"
    assert sweep.stopped is not None and "worker 0 exited" in sweep.stopped and "nats@8" in sweep.stopped
    ratios = {r.name: r for r in compute_ratios(sweep.points, None, [point(8, 790.0, "http")])}
    assert ratios["http_over_nats"].status == "ERRORS" and ratios["http_over_nats"].inputs_with_errors == ["nats@8"]
    assert any("nats@8: worker 0 exited" in note for note in point_notes(sweep.points))
    assert not any("requests failed" in note for note in point_notes(sweep.points))


def test_a_sweep_stopped_by_a_dead_worker_still_writes_the_report_and_plot_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = point(8, 300.0)
    failed.stack_failure = "worker 0 exited with code -9; see worker-0.log"
    stopped = "worker 0 exited with code -9; see worker-0.log (found after nats@8); the sweep stopped there"
    sweep = Sweep(1, 0.5, [point(1, 40.0), failed], http_points=[point(1, 39.0, "http")], stopped=stopped)

    async def fake_sweep(opts: BenchOptions, stack: Any, prompts: list[str], meter: Any = None) -> Sweep:
        return sweep

    stack = SimpleNamespace(http_url=None, start=lambda: None, stop=lambda: None)
    monkeypatch.setattr(bench_main, "run_sweep", fake_sweep)
    monkeypatch.setattr(bench_main, "Stack", lambda opts: stack)
    opts = BenchOptions(concurrency=[1, 8, 32], skip_baselines=True, out=tmp_path)
    assert bench_main.run(opts) == 1

    report = json.loads((tmp_path / "bench.json").read_text())
    assert [p["concurrency"] for p in report["points"]] == [1, 8]
    assert report["points"][1]["stack_failure"] == failed.stack_failure and report["stopped"] == stopped
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr()
    assert f"error: {stopped}" in out.err
    assert "STACK FAILED" in out.out


# --- 5. pairwise rows say when their points had failed requests ---------------------------------------------------


def test_pairwise_rows_carry_the_failed_request_counts_and_the_summary_marks_them() -> None:
    nats = [point(1, 100.0), point(64, 1000.0, errors=3)]
    http = [point(1, 99.0, "http"), point(64, 1200.0, "http")]
    rows = pairwise(http, nats)
    assert [set(row) >= {"concurrency", "tokens_per_s", "ttft_p50", "itl_p50"} for row in rows] == [True, True]
    assert [row["errors"] for row in rows] == [{"http": 0, "nats": 0}, {"http": 0, "nats": 3}]
    assert [row["inputs_with_errors"] for row in rows] == [[], ["nats@64"]]
    assert rows[1]["tokens_per_s"] == 1.2  # the value is kept, flagged
    sweep = Sweep(1, 0.0, nats, http_points=http)
    line = next(line for line in summary_lines(sweep, None, [], []) if line.startswith("HTTP / NATS"))
    assert "1: 0.990, 64: 1.200 (ERRORS at nats@64)" in line
    peer = [point(64, 900.0, "peer", errors=1)]
    assert pairwise(nats, peer)[0]["errors"] == {"nats": 3, "peer": 1}


async def test_a_real_worker_answers_the_bench_request_that_names_its_model(
    fresh_nats_server: NatsServer, smollm: LoadedModel
) -> None:
    """The model from `$SRV.INFO` routes the bench's NATS request to the worker's own model subject."""
    running = await start_worker(Config(nats_url=fresh_nats_server.url, max_tokens_cap=16), smollm)
    bus = await BusClient.from_config(Config(nats_url=fresh_nats_server.url))
    try:
        model = measured_model(await worker_options(bus))
        assert model == smollm.name
        record = await bus_sender(bus, 60.0, model)("Say hello.", 4)
        assert record.error is None and record.ok and 1 <= record.completion_tokens <= 4
    finally:
        await bus.close()
        await running.shutdown()
