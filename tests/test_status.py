"""`llmbus status [--watch]` as a user runs it (a subprocess) against real workers, in 80 columns; and `llmbus up`'s
metrics endpoints. Fake `$SRV` responders (helpers.fake_srv) on a real nats-server play what no real worker does: a
login that may not read `$SRV.STATS`, and a hostile service answering with terminal escape sequences."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
import pytest
from rich.console import Console

from bus_gateway.bus_view import bus_view
from helpers.fake_srv import FakeWorker, FakeWorkers
from helpers.scrape import scrape
from helpers.workers import RunningWorker
from llmbus.config import Config
from llmbus.nats_server import NatsServer, env_without_proxy, free_port, write_config
from llmbus.permissions import grants, server_permissions
from llmbus.status import render, run_status

LLMBUS = [sys.executable, "-m", "llmbus.cli"]
COLUMNS = 80


def llmbus_env() -> dict[str, str]:
    env = {k: v for k, v in env_without_proxy().items() if not k.startswith("LLMBUS_") or k == "LLMBUS_CACHE_DIR"}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "80"}


async def llmbus(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *LLMBUS, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=llmbus_env()
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def fits(text: str) -> None:
    for line in text.splitlines():
        assert len(line) <= COLUMNS, f"{len(line)} columns: {line!r}"


def stats_reply(worker_id: str, host: str, pid: int, model: str, tokens: int, **data: object) -> dict:
    metadata = {"host": host, "pid": str(pid), "model": model, "device": "cuda:0", "dtype": "bfloat16"}
    body = {"running": 12, "waiting": 3, "tokens_generated": tokens, "draining": False, **data}
    endpoint = {"name": "chat", "num_requests": 1204, "num_errors": 3, "data": body}
    return {"id": worker_id, "metadata": metadata, "started": "2026-11-26T01:20:00Z", "endpoints": [endpoint]}


def test_the_table_fits_80_columns_with_long_names() -> None:
    now = datetime(2026, 11, 26, 3, 25, tzinfo=UTC)
    first = [stats_reply("a", "a-very-long-hostname.example.internal", 123456, "SmolLM2-135M-Instruct-but-longer", 0)]
    second = [
        stats_reply("a", "a-very-long-hostname.example.internal", 123456, "SmolLM2-135M-Instruct-but-longer", 620),
        stats_reply("b", "gpu-1", 7, "Qwen2.5-0.5B-Instruct", 0, draining=True),
    ]
    _, sample = bus_view([], first, now, 10.0, None)
    view, _ = bus_view([], second, now, 12.0, sample)
    out = io.StringIO()
    Console(file=out, width=COLUMNS, color_system=None).print(render(view, "nats://127.0.0.1:4222"))
    text = out.getvalue()
    fits(text)
    assert "llmbus status  nats://127.0.0.1:4222  2026-11-26 03:25:00 UTC" in text
    assert "a-ve…:123456 " in text and "gpu-1:7 " in text and "SmolLM2-135M-Instruct…" in text
    assert "cuda:0/bf16" in text and "310.0" in text and "draining" in text and "serving" in text
    assert "2 workers (1 draining) · 24 running · 6 waiting · 310.0 tok/s\n" in text
    assert "2,408 requests · 6 errors · 0 cancelled · models: Qwen2.5-0.5B-Instruct, SmolLM…\n" in text


def test_names_from_the_bus_are_shown_as_text_never_as_markup() -> None:
    """Any service may answer `$SRV`: a model or host name with rich markup in it is printed as it is."""
    now = datetime(2026, 11, 26, 3, 25, tzinfo=UTC)
    view, _ = bus_view([], [stats_reply("a", "[bold]h", 7, "x[/]", 0)], now, 10.0, None)
    out = io.StringIO()
    Console(file=out, width=COLUMNS, color_system=None).print(render(view, "nats://127.0.0.1:4222"))
    assert "[bold]h:7" in out.getvalue() and "x[/]" in out.getvalue()


def test_the_state_column_names_degraded_and_warming_workers() -> None:
    """A worker whose compiled decode step failed decodes eagerly (on a GPU about 10x slower): the table says so."""
    now = datetime(2026, 11, 26, 3, 25, tzinfo=UTC)
    stats = [
        stats_reply("a", "gpu-1", 1, "m", 0, compile="failed"),
        stats_reply("b", "gpu-2", 2, "m", 0, compile="compiling"),
        stats_reply("c", "gpu-3", 3, "m", 0, compile="ready"),
        stats_reply("d", "gpu-4", 4, "m", 0, compile="failed", draining=True),
    ]
    view, _ = bus_view([], stats, now, 1.0, None)
    out = io.StringIO()
    Console(file=out, width=COLUMNS, color_system=None).print(render(view, "nats://h:4222"))
    states = {line.split()[0]: line.split()[-1] for line in out.getvalue().splitlines() if line.startswith("gpu-")}
    assert states == {"gpu-1:1": "degraded", "gpu-2:2": "warming", "gpu-3:3": "serving", "gpu-4:4": "draining"}
    assert "4 workers (1 draining, 2 degraded) ·" in out.getvalue()


def test_an_empty_bus_says_so() -> None:
    view, _ = bus_view([], [], datetime(2026, 11, 26, tzinfo=UTC), 1.0, None)
    out = io.StringIO()
    Console(file=out, width=COLUMNS, color_system=None).print(render(view, "nats://h:4222"))
    assert "no worker answers $SRV.STATS.llm-inference" in out.getvalue()


@pytest.mark.model
async def test_status_shows_the_workers_on_the_bus(worker: RunningWorker, nats_server: NatsServer) -> None:
    code, out, err = await llmbus("status", "--nats-url", nats_server.url)
    assert code == 0, err
    fits(out)
    rows = [line for line in out.splitlines() if f"{socket.gethostname()}:{os.getpid()}" in line]
    assert any("SmolLM2-135M-" in row and "cpu/" in row and "serving" in row for row in rows), out
    assert re.search(r"\d+ workers? · \d+ running · \d+ waiting · [\d.,-]+ tok/s", out), out


def default_ctrl_c() -> None:
    """In the child: Ctrl-C as a terminal gives it. A process inherits an ignored SIGINT, and Python then never
    raises KeyboardInterrupt; by the time this test runs in the full suite, something in the test process ignores
    SIGINT, and `status --watch` never heard its Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.model
async def test_status_watch_redraws_until_ctrl_c(
    worker: RunningWorker, nats_server: NatsServer, tmp_path: Path
) -> None:
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:  # a file, not a pipe nobody reads: a full pipe would block the process
        proc = await asyncio.create_subprocess_exec(
            *LLMBUS, "status", "--watch", "--interval", "0.5", "--nats-url", nats_server.url,
            stdout=asyncio.subprocess.PIPE, stderr=stderr, env=llmbus_env(), preexec_fn=default_ctrl_c,
        )  # fmt: skip
    frames = 0
    try:
        while frames < 3:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, stderr_path.read_text()
            frames += line.startswith("llmbus status")
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, stderr_path.read_text()
    except TimeoutError:
        proc.kill()
        stalled = "did not exit 30 s after Ctrl-C" if frames == 3 else f"printed nothing for 60 s after {frames} frames"
        raise AssertionError(f"llmbus status --watch {stalled}; stderr:\n{stderr_path.read_text()}") from None


async def test_status_without_a_server_fails_with_a_clear_message() -> None:
    code, _, err = await llmbus("status", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert code == 1
    assert "llmbus: error: cannot read the bus at nats://127.0.0.1:" in err


async def test_status_of_an_empty_bus_exits_1(nats_server: NatsServer) -> None:
    with NatsServer() as empty:
        code, out, _ = await llmbus("status", "--nats-url", empty.url)
    assert code == 1 and "no worker answers" in out


@pytest.mark.model
async def test_up_serves_metrics_and_status_sees_it(tmp_path: object) -> None:
    nats_port, http_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        *LLMBUS, "up", "--nats-port", str(nats_port), "--http-port", str(http_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=llmbus_env(), start_new_session=True,
    )  # fmt: skip
    try:
        lines = []
        while "llmbus: ready" not in lines:
            line = (await asyncio.wait_for(proc.stdout.readline(), 300)).decode()
            assert line, f"llmbus up exited: {lines}"
            lines.append(line.rstrip())
        worker_metrics = next(line for line in lines if line.endswith("/metrics (worker)"))
        url = re.search(r"http://127\.0\.0\.1:\d+/metrics", worker_metrics).group(0)
        assert f"llmbus: metrics  http://127.0.0.1:{http_port}/metrics (bridge)" in lines

        worker = await scrape(url)
        assert worker.value("llmbus_num_requests_running") == 0
        assert {labels["model"] for _, labels, _ in worker.llmbus()} == {"SmolLM2-135M-Instruct"}
        bridge = await scrape(f"http://127.0.0.1:{http_port}/metrics")
        assert "llmbus_http_requests_in_flight" in bridge.text

        code, out, err = await llmbus("status", "--nats-url", f"nats://127.0.0.1:{nats_port}")
        assert code == 0, err
        fits(out)
        assert f"{socket.gethostname()}:{proc.pid}" in out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 90) == 0


async def status_of(config: Config) -> tuple[int, str]:
    """`llmbus status` once, in this process, printed in 80 columns without colour: its exit code and text."""
    out = io.StringIO()
    code = await run_status(config, False, 2.0, Console(file=out, width=COLUMNS, color_system=None))
    return code, out.getvalue()


DRAINING = FakeWorker("w1", {"model": "M", "host": "h", "pid": "1"}, {"running": 7, "waiting": 3, "draining": True})


async def test_a_login_that_may_not_read_stats_shows_unknown_figures_never_zeros(tmp_path: Path) -> None:
    """The client role (`up --secure`'s client.env) may publish `$SRV.INFO` but not `$SRV.STATS`: the worker shows,
    with its figures unknown (`-`), its state unknown rather than `serving` while it drains, and a note says why."""
    permissions = server_permissions(grants("client", inbox_prefix="_INBOX.client"))
    client = {"user": "client", "password": "client-pw", "permissions": permissions}
    users = [{"user": "fake", "password": "fake-pw"}, client]
    config_file = write_config(tmp_path / "nats.conf", {"authorization": {"users": users}})
    with NatsServer(config_file=config_file, jetstream=False) as server:
        nc = await nats.connect(server.url, user="fake", password="fake-pw")
        try:
            await FakeWorkers(nc, [DRAINING]).start()
            login = {"nats_url": server.url, "nats_user": "client", "nats_password": "client-pw"}
            code, text = await status_of(Config(**login, nats_inbox_prefix="_INBOX.client"))
            _, seen_by_stats = await status_of(Config(nats_url=server.url, nats_user="fake", nats_password="fake-pw"))
        finally:
            await nc.close()
    fits(text)
    [row] = [line.split() for line in text.splitlines() if line.startswith("h:1 ")]
    assert row == ["h:1", "M", "-", "-", "-", "-", "-", "unknown"], text
    assert "1 worker · - running · - waiting · - tok/s\n" in text
    assert "- requests · - errors · - cancelled · models: M\n" in text
    assert "\nno worker answered $SRV.STATS.llm-inference: this login may lack the permission\n" in text
    assert code == 0  # the worker answers INFO: it is on the bus
    assert "1 worker (1 draining) · 7 running · 3 waiting" in seen_by_stats  # the figures a STATS answer gives
    assert "did not answer" not in seen_by_stats


def test_a_worker_without_a_stats_answer_has_null_figures_in_the_json_and_is_left_out_of_the_sums() -> None:
    """/bus.json is this view: a worker only INFO answered has null figures, and the totals add the known ones."""
    now = datetime(2026, 11, 26, 3, 25, tzinfo=UTC)
    info = {"id": "b", "metadata": {"model": "M", "host": "gpu-2", "pid": "2"}}
    view, _ = bus_view([info], [stats_reply("a", "gpu-1", 1, "M", 0)], now, 1.0, None)
    rows = msgspec.to_builtins(view)["workers"]
    assert [(r["running"], r["waiting"], r["requests"], r["draining"], r["state"]) for r in rows] == [
        (12, 3, 1204, False, "serving"),
        (None, None, None, None, "unknown"),
    ]
    totals = msgspec.to_builtins(view.totals)
    assert (totals["workers"], totals["stats_answers"], totals["running"], totals["requests"]) == (2, 1, 12, 1204)
    out = io.StringIO()
    Console(file=out, width=COLUMNS, color_system=None).print(render(view, "nats://h:4222"))
    assert "\n1 of 2 workers did not answer $SRV.STATS.llm-inference (their figures: -)\n" in out.getvalue()
    only_info, _ = bus_view([info], [], now, 1.0, None)
    assert msgspec.to_builtins(only_info.totals)["running"] is None


HOSTILE = FakeWorker(
    "w2",
    {"model": "ok\x1b[2J\x1b]0;pwned\x07", "host": "h\x1b[31m\x9b", "pid": "12", "device": "cpu\x7f\u202e"},
    {"running": 1},
)


async def test_control_codes_from_the_bus_never_reach_the_terminal() -> None:
    """Any service may answer `$SRV`: an escape sequence in a model, host or device name (here one that clears the
    screen and retitles the window) is printed escaped, as text, in the rows and in the models line."""
    with NatsServer(jetstream=False) as server:
        nc = await nats.connect(server.url)
        try:
            await FakeWorkers(nc, [HOSTILE]).start()
            code, out, err = await llmbus("status", "--nats-url", server.url)
        finally:
            await nc.close()
    assert code == 0, err
    fits(out)
    assert not [ch for ch in out if ch in "\x1b\x07\x9b\x7f\u202e"], repr(out)
    assert "models: ok\\x1b[2J\\x1b]0;pwned\\x07\n" in out
    assert "h\\x1b[31…:12 " in out and " cpu\\x7f\\u2… " in out  # cut to their columns, escaped
