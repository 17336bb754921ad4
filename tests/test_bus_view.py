"""bus_view: worker rows and bus totals from `$SRV.INFO`/`$SRV.STATS` replies (pure; replies as workers send them)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from bus_gateway.bus_view import BusSampler, BusView, Sample, bus_view, format_duration
from bus_gateway.worker_rows import uptime_seconds, worker_rows

NOW = datetime(2026, 11, 26, 1, 30, 0, tzinfo=UTC)
METADATA = {
    "model": "SmolLM2-135M-Instruct",
    "device": "cpu",
    "dtype": "bfloat16",
    "max_batch_size": "64",
    "host": "vm",
    "pid": "7605",
}


def engine_data(**changes: Any) -> dict[str, Any]:
    data = {
        "running": 2,
        "waiting": 1,
        "tokens_generated": 800,
        "requests_finished": 10,
        "requests_cancelled": 3,
        "pending": 3,
        "errors_by_code": {},
    }
    return {**data, **changes}


def info_reply(worker_id: str, **metadata: str) -> dict[str, Any]:
    return {
        "type": "io.nats.micro.v1.info_response",
        "id": worker_id,
        "name": "llm-inference",
        "endpoints": [{"name": "chat", "subject": "llm.chat"}],
        "metadata": {**METADATA, **metadata},
    }


def stats_reply(worker_id: str, data: dict[str, Any], started: str = "2026-11-26T01:20:00.000Z") -> dict[str, Any]:
    """As nats-py's micro service sends it: every endpoint carries the same worker-wide `data`."""
    return {
        "type": "io.nats.micro.v1.stats_response",
        "id": worker_id,
        "name": "llm-inference",
        "started": started,
        "endpoints": [
            {"name": "chat", "num_requests": 12, "num_errors": 2, "data": data},
            {"name": "chat_batched", "num_requests": 3, "num_errors": 1, "data": copy.deepcopy(data)},
        ],
        "metadata": dict(METADATA),
    }


def test_a_worker_row_reads_info_metadata_and_stats_data() -> None:
    [row] = worker_rows([info_reply("w1")], [stats_reply("w1", engine_data())], NOW)
    assert (row.id, row.host, row.pid, row.model, row.device, row.dtype) == (
        "w1",
        "vm",
        7605,
        "SmolLM2-135M-Instruct",
        "cpu",
        "bfloat16",
    )
    assert (row.running, row.waiting, row.tokens_generated, row.cancelled) == (2, 1, 800, 3)
    assert (row.requests, row.errors) == (15, 3)  # summed over endpoints; the shared `data` is counted once
    assert row.uptime_s == 600.0
    assert row.draining is False  # no flag: not draining
    assert row.tokens_per_s is None  # one sample only


def test_draining_is_read_from_stats_data() -> None:
    [row] = worker_rows([], [stats_reply("w1", engine_data(draining=True, compile="failed"))], NOW)
    assert row.draining is True and row.state == "draining"  # draining comes first
    [row] = worker_rows([], [stats_reply("w1", engine_data(draining="yes"))], NOW)
    assert row.draining is False  # only a JSON true counts


def test_the_compile_state_is_read_and_failed_ones_are_counted() -> None:
    stats = [
        stats_reply("w1", engine_data(compile="failed")),
        stats_reply("w2", engine_data(compile="ready")),
        stats_reply("w3", engine_data()),  # a worker that does not report it
    ]
    view, _ = bus_view([], stats, NOW, 1.0, None)
    assert [row.compile for row in view.workers] == ["failed", "ready", ""]
    assert [row.state for row in view.workers] == ["degraded", "serving", "serving"]
    assert view.totals.compile_failed == 1


def test_missing_and_odd_fields_read_as_empty_not_errors() -> None:
    odd_stats = {"id": "w2", "started": "not a time", "endpoints": [{"num_requests": "7", "data": None}, "junk"]}
    infos = [{"id": "w3", "metadata": {"pid": "abc", "model": 5}}, {"no": "id"}, "not even a dict"]
    rows = worker_rows(infos, [odd_stats, {"id": ""}], NOW)  # type: ignore[list-item]
    assert [row.id for row in rows] == ["w2", "w3"]
    w2, w3 = rows
    assert (w2.requests, w2.running, w2.uptime_s, w2.host, w2.pid) == (7, 0, None, "", None)
    assert (w3.model, w3.pid, w3.requests, w3.uptime_s) == ("", None, None, None)  # no STATS answer: unknown


def test_stats_metadata_stands_in_for_a_missing_info_reply() -> None:
    [row] = worker_rows([], [stats_reply("w1", engine_data())], NOW)
    assert (row.model, row.host, row.pid) == ("SmolLM2-135M-Instruct", "vm", 7605)


def test_rows_are_sorted_by_host_then_pid() -> None:
    infos = [
        info_reply("a", host="b-host", pid="1"),
        info_reply("b", host="a-host", pid="20"),
        info_reply("c", host="a-host", pid="3"),
    ]
    assert [row.id for row in worker_rows(infos, [], NOW)] == ["c", "b", "a"]


def test_tokens_per_s_is_the_delta_over_the_interval() -> None:
    infos = [info_reply("w1"), info_reply("w2")]
    first, sample = bus_view(
        infos, [stats_reply("w1", engine_data()), stats_reply("w2", engine_data())], NOW, 100.0, None
    )
    assert first.interval_s is None and first.totals.tokens_per_s is None
    later_stats = [
        stats_reply("w1", engine_data(tokens_generated=1000)),
        stats_reply("w2", engine_data(tokens_generated=850)),
        stats_reply("w9", engine_data(tokens_generated=5)),  # new worker: no rate yet
    ]
    second, _ = bus_view(infos, later_stats, NOW + timedelta(seconds=2), 102.0, sample)
    rates = {row.id: row.tokens_per_s for row in second.workers}
    assert rates == {"w1": 100.0, "w2": 25.0, "w9": None}
    assert second.interval_s == 2.0
    assert second.totals.tokens_per_s == 125.0


def test_a_counter_that_went_backwards_has_no_rate() -> None:
    previous = Sample(at=1.0, tokens={"w1": 5000})
    view, _ = bus_view([], [stats_reply("w1", engine_data(tokens_generated=10))], NOW, 2.0, previous)
    assert view.workers[0].tokens_per_s is None


def test_totals_add_up_the_workers() -> None:
    stats = [
        stats_reply("w1", engine_data(running=3, waiting=0, draining=True)),
        stats_reply("w2", engine_data(running=1, waiting=4)),
    ]
    infos = [info_reply("w1"), info_reply("w2", model="Other")]
    view, _ = bus_view(infos, stats, NOW, 1.0, None)
    totals = view.totals
    assert (totals.workers, totals.draining, totals.running, totals.waiting) == (2, 1, 4, 4)
    assert (totals.requests, totals.errors, totals.cancelled) == (30, 6, 6)
    assert totals.models == ["Other", "SmolLM2-135M-Instruct"]


def test_draining_and_degraded_totals_are_unknown_without_a_stats_answer() -> None:
    """No STATS answer (a login without the permission): draining and degraded are unknown, as running is, never
    0; the workers that did answer are counted, a known 0 included."""
    infos = [info_reply("w1"), info_reply("w2")]
    unanswered, _ = bus_view(infos, [], NOW, 1.0, None)
    totals = unanswered.totals
    assert (totals.workers, totals.stats_answers) == (2, 0)
    assert (totals.draining, totals.compile_failed, totals.running) == (None, None, None)
    encoded = msgspec.json.decode(msgspec.json.encode(totals))
    assert (encoded["draining"], encoded["compile_failed"]) == (None, None)  # /bus.json sends null: the page shows -
    flagged = [stats_reply("w1", engine_data(draining=True, compile="failed"))]
    one, _ = bus_view(infos, flagged, NOW, 1.0, None)
    assert (one.totals.draining, one.totals.compile_failed, one.totals.stats_answers) == (1, 1, 1)
    calm, _ = bus_view(infos, [stats_reply("w1", engine_data())], NOW, 1.0, None)
    assert (calm.totals.draining, calm.totals.compile_failed) == (0, 0)
    assert type(one.totals.draining) is int  # a count, not a bool, in the JSON


def test_the_view_is_json_for_the_web_page() -> None:
    view, _ = bus_view([info_reply("w1")], [stats_reply("w1", engine_data())], NOW, 1.0, None)
    decoded = msgspec.json.decode(msgspec.json.encode(view), type=BusView)
    assert decoded == view
    assert msgspec.json.decode(msgspec.json.encode(view))["workers"][0]["tokens_per_s"] is None


def test_the_sampler_measures_over_at_least_its_minimum_interval() -> None:
    sampler = BusSampler(min_interval=1.0)

    def observe(at: float, tokens: int) -> BusView:
        return sampler.observe([], [stats_reply("w1", engine_data(tokens_generated=tokens))], NOW, at)

    assert observe(0.0, 0).workers[0].tokens_per_s is None
    assert observe(0.4, 40).workers[0].tokens_per_s == 100.0  # nothing older yet: the first sample
    assert observe(1.0, 100).interval_s == 1.0  # against t=0
    view = observe(1.3, 160)  # t=0 is the newest sample at least 1 s old
    assert (view.interval_s, view.workers[0].tokens_per_s) == (1.3, 160 / 1.3)
    view = observe(2.5, 400)  # against t=1.3
    assert view.interval_s is not None and round(view.interval_s, 6) == 1.2
    assert len(sampler._samples) <= 3  # old samples are dropped


def test_uptime_and_durations() -> None:
    assert uptime_seconds("2026-11-26T01:29:58Z", NOW) == 2.0
    assert uptime_seconds("2026-11-26T01:29:58", NOW) == 2.0  # naive times are UTC
    assert uptime_seconds("2027-01-01T00:00:00Z", NOW) == 0.0  # clock skew never goes negative
    assert uptime_seconds(None, NOW) is None
    assert [format_duration(s) for s in (None, 42, 425, 11_520, 187_200)] == ["-", "42s", "7m05s", "3h12m", "2d04h"]
