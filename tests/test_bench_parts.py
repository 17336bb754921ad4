"""The bench's parts that need no model: option checks, core assignment, the OpenAI SSE reader, point statistics,
ratios against the targets, the report's URL redaction, and the peer probe against real bridges."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from bus_gateway.client import BusClient
from helpers.bridge import API_KEY, Bridge
from helpers.workers import start_worker
from inference_worker.model_loader import LoadedModel
from llmbus import bench
from llmbus.bench.bus_load import EngineCounters, counters_during, on_prefix, wait_for_compiled
from llmbus.bench.http_load import OpenAITarget, SseSplitter, apply_event, probe
from llmbus.bench.options import BenchError, parse_options
from llmbus.bench.report import connection_settings, redact_url
from llmbus.bench.stack import Stack, assign_cores
from llmbus.bench.stats import PointResult, RequestRecord, describe_point, summarize
from llmbus.bench.verdicts import compute_ratios, diagnostics, http_notes, pairwise, peer_notes, point_notes
from llmbus.config import Config
from llmbus.nats_server import NatsServer, free_port


def test_options_keep_the_old_flags_and_add_the_new_ones() -> None:
    argv = ["--concurrency", "8,1,8", "--http-url", "http://127.0.0.1:9/v1/", "--nats-url", "nats://127.0.0.1:9"]
    argv += ["--worker-arg=--quantize"]
    argv += ["--worker-arg=int8", "--peer-url", "http://h:1/", "--peer-model", "m", "--skip-baselines"]
    opts = parse_options(argv)
    assert opts.concurrency == [1, 8]
    assert opts.http and opts.http_url == "http://127.0.0.1:9"
    assert opts.peer_url == "http://h:1" and opts.peer_model == "m"
    assert opts.worker_args == ["--quantize", "int8"]
    assert opts.skip_baselines and opts.ceiling == "hf"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peer-url", "http://h:1"], "--peer-model"),
        (["--peer-model", "m"], "--peer-url"),
        (["--peer-url", "h:1", "--peer-model", "m"], "http://"),
        (["--cores-per-worker", "1"], "--pin"),
        (["--pin", "--nats-url", "nats://127.0.0.1:1"], "--nats-url"),
        (["--pin", "--workers", str(len(os.sched_getaffinity(0)) + 1)], "do not fit"),
        (["--concurrency", "0"], "positive integers"),
        (["--ceiling", "runner"], "invalid choice"),
        (["--http-url", "http://127.0.0.1:9"], "--http-url needs --nats-url"),
        (["--baseline-time-cap", "-1"], "--baseline-time-cap must be a positive"),
        (["--point-time-cap", "0"], "--point-time-cap must be a positive"),
        (["--request-timeout", "nan"], "--request-timeout must be a positive"),
    ],
)
def test_inconsistent_options_are_refused_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_options(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_pinned_workers_get_disjoint_cores() -> None:
    assert assign_cores([3, 1, 0, 2], 2) == [[0, 1], [2, 3]]
    assert assign_cores([0, 1], 1, per_worker=1) == [[0]]
    assert assign_cores([0, 1, 2], 3) == [[0], [1], [2]]
    with pytest.raises(BenchError, match="do not fit"):
        assign_cores([0, 1], 3)
    with pytest.raises(BenchError, match="do not fit"):
        assign_cores([0, 1], 1, per_worker=3)


def test_engine_counters_are_subtracted_per_worker_and_a_late_worker_is_named() -> None:
    """A worker that answers `$SRV.STATS` after the point but not before must not add its whole history."""
    before = {"a": EngineCounters(decode_steps=10, decode_tokens=40), "b": EngineCounters(decode_steps=5)}
    after = {"a": EngineCounters(decode_steps=14, decode_tokens=56), "c": EngineCounters(decode_steps=900)}
    during = counters_during(before, after)
    assert (during.counters.decode_steps, during.counters.decode_tokens) == (4, 16)
    assert during.missing == ["b", "c"]
    p = point(8, 100.0)
    p.engine_workers_missing = during.missing
    assert any("nats@8: the engine counters are incomplete: worker(s) b, c" in n for n in point_notes([p]))
    assert "counters incomplete (2 worker(s) missing)" in describe_point(p)
    replies = [{"id": "x", "metadata": {"subject_prefix": "llm"}}, {"id": "y", "metadata": {"subject_prefix": "o"}}]
    assert [r["id"] for r in on_prefix([*replies, {"id": "z"}], "llm")] == ["x", "z"]


def sse(record: RequestRecord, events: list[tuple[float, str]]) -> list[bool]:
    return [apply_event(record, data.encode(), now) for now, data in events]


def test_openai_stream_reader_times_content_deltas_and_takes_usage() -> None:
    record = RequestRecord(sent=0.0)
    ends = sse(
        record,
        [
            (1.0, '{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'),
            (1.1, '{"choices":[{"index":0,"delta":{"content":"Hel"}}]}'),
            (1.3, '{"choices":[{"index":0,"delta":{"content":"lo"}}]}'),
            (1.4, '{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}'),
            (1.5, '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}'),
            (1.6, "[DONE]"),
        ],
    )
    assert ends == [False, False, False, False, False, True]
    assert record.token_times == [1.1, 1.3]
    assert record.first == 1.1 and record.end == 1.5
    assert record.completion_tokens == 3 and record.finish_reason == "length" and record.ok


def test_openai_stream_without_usage_counts_deltas_and_errors_end_the_stream() -> None:
    counted = RequestRecord(sent=0.0)
    sse(counted, [(1.0, '{"choices":[{"delta":{"content":"a"}}]}'), (2.0, '{"choices":[{"delta":{"content":"b"}}]}')])
    sse(counted, [(3.0, '{"choices":[{"delta":{},"finish_reason":"stop"}]}'), (3.1, "[DONE]")])
    assert counted.usage_tokens is None and counted.completion_tokens == 2 and counted.end == 3.0

    failed = RequestRecord(sent=0.0)
    assert sse(failed, [(1.0, '{"error":{"message":"overloaded","code":503}}')]) == [True]
    assert failed.error == "overloaded" and not failed.ok
    garbage = RequestRecord(sent=0.0)
    assert sse(garbage, [(1.0, "<html>")]) == [True]
    assert garbage.error is not None and "not JSON" in garbage.error
    for shape in ('{"choices":[null]}', '{"choices":{"a":1}}'):  # a peer's odd JSON is its error, not the bench's
        odd = RequestRecord(sent=0.0)
        assert sse(odd, [(1.0, shape)]) == [True]
        assert odd.error is not None and "`choices` is not a list of objects" in odd.error
    text_delta = RequestRecord(sent=0.0)
    assert sse(text_delta, [(1.0, '{"choices":[{"delta":"x"}]}')]) == [False]
    assert text_delta.error is None and text_delta.token_times == []


def test_event_stream_splitter_joins_reads_and_takes_crlf_comments_and_multiline_data() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'{"a":1}']
    assert splitter.feed(b":2}\r") == []
    assert splitter.feed(b"\n\r\n: keep-alive\n\nevent: x\ndata: one\ndata: two\n\ndata: [DONE]\n\n") == [
        b'{"b":2}',
        b"one\ntwo",
        b"[DONE]",
    ]
    assert splitter.pending == b""


def test_point_statistics_from_arrival_times() -> None:
    a = RequestRecord(sent=0.0, token_times=[0.5, 0.6, 0.8], end=0.9, usage_tokens=3, finish_reason="stop")
    b = RequestRecord(sent=1.0, token_times=[1.2, 1.3], end=1.4, usage_tokens=2, finish_reason="length")
    lost = RequestRecord(sent=0.0, error="504 no reply")
    point = summarize(2, [a, b, lost], wall=2.0, capped=False, via="http")
    assert (point.requests, point.errors, point.error_samples) == (2, 1, ["504 no reply"])
    assert point.completion_tokens == 5 and point.tokens_per_s == 2.5
    assert math.isclose(point.ttft_p50_s, 0.35) and math.isclose(point.itl_p50_s, 0.1)
    assert math.isclose(point.e2e_p95_s, 0.9 - 0.05 * 0.5)
    assert point.finish_reasons == {"stop": 1, "length": 1} and point.token_count_source == "usage"
    counted = summarize(1, [RequestRecord(sent=0.0, token_times=[0.1], end=0.2)], 1.0, False, "peer")
    assert counted.token_count_source == "deltas" and counted.completion_tokens == 1


def point(concurrency: int, tokens_per_s: float, via: str = "nats") -> PointResult:
    record = RequestRecord(sent=0.0, token_times=[0.1, 0.2], end=0.4, usage_tokens=2)
    p = summarize(concurrency, [record], 1.0, False, via)
    p.tokens_per_s = tokens_per_s
    return p


def test_ratios_use_64_clients_when_measured_and_say_na_when_not() -> None:
    nats = [point(1, 100.0), point(64, 1500.0), point(128, 2000.0)]
    http = [point(1, 99.0, "http"), point(64, 1440.0, "http")]
    ratios = {r.name: r for r in compute_ratios(nats, None, http)}
    assert set(ratios) == set(bench.TARGETS)
    assert math.isclose(ratios["http_over_nats"].value, 0.96) and ratios["http_over_nats"].status == "PASS"
    assert "@64" in ratios["http_over_nats"].description
    assert ratios["throughput_vs_ceiling"].value is None and ratios["throughput_vs_ceiling"].status == "N/A"
    assert ratios["throughput_vs_ceiling"].aim == 2.0
    without_http = {r.name: r for r in compute_ratios(nats, None)}
    assert without_http["http_over_nats"].status == "N/A"
    assert [row["concurrency"] for row in pairwise(http, nats)] == [1, 64]


def test_a_sweep_of_one_client_alone_has_no_64_client_ratios() -> None:
    """`--concurrency 1`: the "at 64" ratios are N/A, not the 1-client point a second time under other targets."""
    ratios = {r.name: r for r in compute_ratios([point(1, 100.0)], None, [point(1, 99.0, "http")])}
    for name in ("throughput_vs_ceiling", "throughput_vs_naive", "http_over_nats"):
        assert ratios[name].value is None and ratios[name].status == "N/A", name
        assert "@64" in ratios[name].description and "@1" not in ratios[name].description
    assert ratios["ttft_vs_e2e"].value is not None  # the 1-client ratios are still measured
    wide = {r.name: r for r in compute_ratios([point(1, 100.0), point(8, 700.0)], None, [point(8, 690.0, "http")])}
    assert "@8" in wide["http_over_nats"].description and wide["http_over_nats"].status == "PASS"


def test_a_ratio_whose_points_had_errors_cannot_pass() -> None:
    """Failed NATS requests lower the denominator of http_over_nats; one TTFT of eight is no p50."""
    nats, http = [point(1, 100.0), point(64, 1000.0)], [point(64, 1200.0, "http")]
    nats[1].errors, nats[1].error_samples = 3, ["504 timeout"]
    nats[0].errors, nats[0].requests = 7, 1
    ratios = {r.name: r for r in compute_ratios(nats, None, http)}
    assert ratios["http_over_nats"].value == 1.2 and ratios["http_over_nats"].status == "ERRORS"
    assert ratios["http_over_nats"].inputs_with_errors == ["nats@64"]
    assert ratios["ttft_vs_e2e"].status == "ERRORS" and ratios["ttft_vs_e2e"].inputs_with_errors == ["nats@1"]
    assert ratios["throughput_vs_ceiling"].status == "N/A"  # not measured stays N/A
    notes = point_notes([*nats, *http])
    assert any("nats@64: 3 of 4 requests failed (first: 504 timeout)" in note for note in notes)
    assert any("nats@1: 7 of 8 requests failed" in note for note in notes)
    assert not any("http@64" in note for note in notes)
    nats[1].errors, nats[1].requests = 0, 0  # nothing answered, nothing failed: no figure either
    assert {r.name: r for r in compute_ratios(nats, None, http)}["http_over_nats"].status != "PASS"


def test_notes_name_the_http_clients_cost_and_a_peer_without_usage() -> None:
    nats, http = point(8, 300.0), point(8, 280.0, "http")
    nats.client_cpu_s, http.client_cpu_s = 0.05, 0.25
    assert "0.20 more cores" in http_notes([http], [nats])[0]
    http.client_cpu_s = 0.06
    assert http_notes([http], [nats]) == []
    counted = summarize(8, [RequestRecord(sent=0.0, token_times=[0.1, 0.2], end=0.3)], 1.0, False, "peer")
    assert any("count of content deltas" in note for note in peer_notes([counted], [nats]))
    assert peer_notes([point(8, 200.0, "peer")], [nats]) == []


def test_a_worker_whose_compiled_step_failed_is_named_in_the_point_and_the_notes() -> None:
    """A failed compiled step leaves the worker serving eagerly (on an H100, 10x slower): the figures must say so
    rather than pass for the compiled engine's."""
    after = EngineCounters(decode_steps=10, compile_failed=1)
    assert after.minus(EngineCounters(decode_steps=4)).compile_failed == 1  # a state: kept, not subtracted
    fine, failed = point(1, 35.0), point(64, 1382.0)
    failed.engine_compile_failed = 1
    assert "FAILED" not in describe_point(fine)
    assert "compiled decode step FAILED on 1 worker(s)" in describe_point(failed)
    notes = diagnostics([fine, failed], None, 0.0)
    assert any("compiled decode step failed (by the end of concurrency 64)" in note for note in notes)
    assert not any("compiled decode step failed" in note for note in diagnostics([fine], None, 0.0))


def test_report_urls_carry_no_credentials() -> None:
    assert redact_url("http://user:secret@host:8080/v1") == "http://user:***@host:8080/v1"
    assert redact_url("nats://a:b@h1:4222,nats://h2:4222") == "nats://a:***@h1:4222,nats://h2:4222"
    assert redact_url(None) is None
    assert redact_url("alice:s3cret@h1:4222") == "alice:***@h1:4222"  # nats-py's scheme-less form
    assert redact_url("http://tok3n@[::1") == "<unparseable URL>"  # a URL that does not parse shows nothing


def test_the_report_shows_no_secret_of_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench.json` holds the options; the connection's secrets (from flags or LLMBUS_*) only as set or not."""
    monkeypatch.setenv("LLMBUS_NATS_PASSWORD", "pw-from-the-env")
    monkeypatch.setenv("LLMBUS_API_KEYS", "bridge-key-1")
    opts = parse_options(["--nats-url", "nats://alice:url-secret@h1:4222", "--nats-token", "tok-from-a-flag"])
    settings = connection_settings(opts.connection)
    text = json.dumps(settings)
    for secret in ("pw-from-the-env", "bridge-key-1", "url-secret", "tok-from-a-flag"):
        assert secret not in text
    assert settings["nats_password"] == "***" and settings["nats_token"] == "***" and settings["nats_creds"] is None
    assert settings["nats_url"] == "nats://alice:***@h1:4222" and "api_keys" not in settings
    assert "bridge-key-1" not in repr(opts.connection)


async def test_peer_probe_sends_the_key_from_the_environment(
    keyed_bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyed bridge with no worker behind it: without the key the probe gets 401, with it the bridge lets the
    request through and answers that no worker listens."""
    target = OpenAITarget("the peer", keyed_bridge.url, "any-model")
    problem = await probe(target, timeout=10.0)
    assert problem is not None and "HTTP 401" in problem
    monkeypatch.setenv("LLMBUS_BENCH_PEER_API_KEY", API_KEY)
    opts = parse_options(["--peer-url", keyed_bridge.url, "--peer-model", "any-model"])
    problem = await probe(OpenAITarget("the peer", opts.peer_url or "", "any-model", opts.peer_api_key), 10.0)
    assert problem is not None and "HTTP 503" in problem


def test_an_unreachable_peer_fails_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--peer-url", f"http://127.0.0.1:{free_port()}", "--peer-model", "m", "--out", str(tmp_path)]
    assert bench.main(argv) == 1
    assert "the peer did not answer" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


async def test_the_compile_wait_needs_every_worker_to_answer(
    fresh_nats_server: NatsServer, smollm: LoadedModel
) -> None:
    """No answer is not "done compiling": a worker whose loop is busy loading its compiled step misses `$SRV.STATS`
    for a few seconds, and the bench must wait for it rather than measure a worker still starting."""
    running = await start_worker(Config(nats_url=fresh_nats_server.url, compile=False), smollm)
    stack = Stack(parse_options(["--nats-url", fresh_nats_server.url]), url=fresh_nats_server.url)
    bus = await BusClient.from_config(Config(nats_url=fresh_nats_server.url))
    try:
        assert await wait_for_compiled(bus, stack, 1, timeout=60.0) >= 0.0
        with pytest.raises(BenchError, match="1 of 2 workers answered"):
            await wait_for_compiled(bus, stack, 2, timeout=1.0)
    finally:
        await bus.close()
        await running.shutdown()
