"""`llmbus` as a user runs it: a real subprocess, a real nats-server, real HTTP and NATS traffic on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest

from helpers.processes import process_exits
from llmbus.nats_server import NatsServer, env_without_proxy, free_port, port_is_free
from schemas.export import JSON_DIR, MESSAGES
from schemas.subjects import ERROR, ERROR_CODE, SERVICE_NAME

LLMBUS = [sys.executable, "-m", "llmbus.cli"]
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 120.0


def llmbus_env() -> dict[str, str]:
    """The caller's environment without proxies or LLMBUS_* settings (the model cache location is kept)."""
    env = {k: v for k, v in env_without_proxy().items() if not k.startswith("LLMBUS_") or k == "LLMBUS_CACHE_DIR"}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class LlmbusProcess:
    proc: asyncio.subprocess.Process
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace")[-4000:]
        return "stdout:\n" + "\n".join(self.stdout_lines) + "\nstderr (tail):\n" + stderr

    async def wait_for_line(self, wanted: str, timeout: float) -> None:
        """Read stdout line by line until `wanted` appears, the process exits, or the deadline passes."""
        assert self.proc.stdout is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while wanted not in self.stdout_lines:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                pytest.fail(f"no {wanted!r} line within {timeout:.0f}s\n{self.output()}")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not line:
                code = await self.proc.wait()
                pytest.fail(f"llmbus exited with {code} before printing {wanted!r}\n{self.output()}")
            self.stdout_lines.append(line.decode(errors="replace").rstrip())

    async def stop(self, sig: signal.Signals, whole_group: bool = False) -> int:
        """Signal llmbus alone, or its whole process group as a terminal's Ctrl-C does; return its exit code."""
        if whole_group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            stdout, _ = await asyncio.wait_for(self.proc.communicate(), STOP_TIMEOUT_S)
        except TimeoutError:
            pytest.fail(f"llmbus did not exit within {STOP_TIMEOUT_S:.0f}s of {sig.name}\n{self.output()}")
        self.stdout_lines += stdout.decode(errors="replace").splitlines()
        return self.proc.returncode


@asynccontextmanager
async def running_llmbus(*args: str, tmp_path: Path) -> AsyncIterator[LlmbusProcess]:
    """Starts `llmbus ARGS` in its own process group; whatever is left of that group is killed afterwards."""
    stderr_path = tmp_path / "llmbus.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *LLMBUS,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            stdin=asyncio.subprocess.DEVNULL,
            env=llmbus_env(),
            start_new_session=True,
        )
    try:
        yield LlmbusProcess(proc, stderr_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def nothing_listens_on(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def http_get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        return await client.get(url)


@pytest.mark.model
async def test_up_serves_http_and_nats_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), free_port()
    async with running_llmbus(
        "up", "--nats-port", str(nats_port), "--http-port", str(http_port), tmp_path=tmp_path
    ) as llmbus:
        await llmbus.wait_for_line("llmbus: ready", READY_TIMEOUT_S)
        assert f"llmbus: NATS  nats://127.0.0.1:{nats_port}" in llmbus.stdout_lines
        settled = re.findall(r"garbage collector: (\d+) objects frozen", llmbus.stderr_path.read_text())
        assert len(settled) == 1 and int(settled[0]) > 100_000, llmbus.output()  # once, before `ready`
        assert f"llmbus: HTTP  http://127.0.0.1:{http_port}" in llmbus.stdout_lines

        health = await http_get(f"http://127.0.0.1:{http_port}/healthz")
        assert health.status_code == 200, health.text

        nc = await nats.connect(f"nats://127.0.0.1:{nats_port}", connect_timeout=5, max_reconnect_attempts=0)
        try:
            request = b'{"chat_id": "cli-e2e-1", "user_prompt": "What is the capital of France?", "max_tokens": 24}'
            reply = await nc.request("llm.chat", request, timeout=REQUEST_TIMEOUT_S)
        finally:
            await nc.close()
        headers = reply.headers or {}
        assert ERROR not in headers, f"{headers.get(ERROR_CODE)} {headers.get(ERROR)}"
        answer = json.loads(reply.data)
        assert answer["chat_id"] == "cli-e2e-1"
        assert "Paris" in answer["response"], answer

        assert await llmbus.stop(signal.SIGTERM) == 0, llmbus.output()
    assert "llmbus: stopping" in llmbus.stdout_lines
    assert nothing_listens_on(nats_port), "the embedded nats-server outlived llmbus"


@pytest.mark.model
@pytest.mark.parametrize(("stop_signal", "whole_group"), [(signal.SIGINT, True), (signal.SIGHUP, False)])
async def test_up_stops_cleanly_on_ctrl_c_to_its_process_group_and_on_a_closed_terminal(
    tmp_path: Path, stop_signal: signal.Signals, whole_group: bool
) -> None:
    """Ctrl-C reaches nats-server too; it must outlive the worker's drain, so llmbus alone decides when it stops.
    A closed terminal sends SIGHUP to llmbus only (nats-server runs in a session of its own): llmbus stops it."""
    nats_port = free_port()
    async with running_llmbus(
        "up", "--nats-port", str(nats_port), "--http-port", str(free_port()), tmp_path=tmp_path
    ) as llmbus:
        await llmbus.wait_for_line("llmbus: ready", READY_TIMEOUT_S)
        assert await llmbus.stop(stop_signal, whole_group=whole_group) == 0, llmbus.output()
    assert nothing_listens_on(nats_port), "the embedded nats-server outlived llmbus"


async def test_a_killed_up_leaves_no_nats_server_behind(tmp_path: Path) -> None:
    """SIGKILL gives llmbus no chance to stop its nats-server: the server dies with it (PR_SET_PDEATHSIG), so the
    next `llmbus up` finds the port free. The stack runs the bridge alone, as `up` runs it, so no model loads."""
    nats_port, http_port = free_port(), free_port()
    stack = (
        "import asyncio; from llmbus.config import Config; from llmbus.stack import run_stack; "
        f"asyncio.run(run_stack(Config(nats_port={nats_port}, http_port={http_port}), ['gateway'], True))"
    )
    stderr_path = tmp_path / "stack.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", stack, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=llmbus_env()
        )
    llmbus = LlmbusProcess(proc, stderr_path)
    try:
        await llmbus.wait_for_line("llmbus: ready", READY_TIMEOUT_S)
        assert not nothing_listens_on(nats_port)
        server_pids = subprocess.run(["pgrep", "-f", f"nats-server.* -p {nats_port}"], capture_output=True, text=True)
        (server_pid,) = map(int, server_pids.stdout.split())
        proc.kill()
        await proc.wait()
        assert await asyncio.to_thread(process_exits, server_pid), "the embedded nats-server outlived llmbus"
    finally:
        if proc.returncode is None:
            proc.kill()
    assert port_is_free(nats_port), "the next `llmbus up` could not listen on the port"


@pytest.mark.model
async def test_up_joins_an_existing_server_with_nats_url(tmp_path: Path) -> None:
    http_port = free_port()
    with NatsServer() as server:
        async with running_llmbus(
            "up", "--nats-url", server.url, "--http-port", str(http_port), tmp_path=tmp_path
        ) as llmbus:
            await llmbus.wait_for_line("llmbus: ready", READY_TIMEOUT_S)
            assert not any(line.startswith("llmbus: NATS") for line in llmbus.stdout_lines), llmbus.stdout_lines

            nc = await nats.connect(server.url, connect_timeout=5, max_reconnect_attempts=0)
            try:
                pong = await nc.request(f"$SRV.PING.{SERVICE_NAME}", b"", timeout=10)
            finally:
                await nc.close()
            assert json.loads(pong.data)["name"] == SERVICE_NAME

            assert await llmbus.stop(signal.SIGINT, whole_group=True) == 0, llmbus.output()
        assert server.proc is not None and server.proc.poll() is None, "llmbus stopped a server it does not own"


async def test_a_bridge_on_http_port_0_names_the_port_it_serves_on(tmp_path: Path) -> None:
    """Port 0 asks for any free port; the ready line used to say `:0`, which names no port at all."""
    with NatsServer(jetstream=False) as server:
        async with running_llmbus("gateway", "--nats-url", server.url, "--http-port", "0", tmp_path=tmp_path) as bridge:
            await bridge.wait_for_line("llmbus: ready", READY_TIMEOUT_S)
            (url,) = [line.split()[-1] for line in bridge.stdout_lines if line.startswith("llmbus: HTTP")]
            assert not url.endswith(":0"), bridge.stdout_lines
            assert (await http_get(f"{url}/healthz")).status_code == 200
            assert await bridge.stop(signal.SIGTERM) == 0, bridge.output()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("busy_flag", ["--nats-port", "--http-port"])
def test_up_on_a_busy_port_fails_with_a_clear_message(busy_port: int, busy_flag: str) -> None:
    ports = {"--nats-port": str(free_port()), "--http-port": str(free_port())} | {busy_flag: str(busy_port)}
    result = subprocess.run(
        [*LLMBUS, "up", *(item for pair in ports.items() for item in pair)],
        capture_output=True,
        text=True,
        timeout=60,
        env=llmbus_env(),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert f"port {busy_port}" in result.stderr
    assert "already in use" in result.stderr
    assert busy_flag in result.stderr
    assert "llmbus: ready" not in result.stdout


def test_schema_prints_and_writes_every_message(tmp_path: Path) -> None:
    printed = subprocess.run([*LLMBUS, "schema"], capture_output=True, text=True, timeout=60, check=True)
    assert set(json.loads(printed.stdout)) == set(MESSAGES)

    subprocess.run([*LLMBUS, "schema", "--out", str(tmp_path)], capture_output=True, timeout=60, check=True)
    for path in JSON_DIR.glob("*.schema.json"):
        assert (tmp_path / path.name).read_text() == path.read_text()
    assert len(list(tmp_path.glob("*.schema.json"))) == len(MESSAGES)


@pytest.mark.parametrize(
    ("variable", "value"), [("LLMBUS_LOG_LEVEL", "trace"), ("LLMBUS_LOG_FORMAT", "logfmt"), ("LLMBUS_HTTP_PORT", "-1")]
)
def test_a_bad_setting_from_the_environment_is_a_clear_error(variable: str, value: str) -> None:
    """argparse checks a flag's choices but not a default taken from the environment: llmbus checks those."""
    result = subprocess.run(
        [*LLMBUS, "gateway"], capture_output=True, text=True, timeout=60, env=llmbus_env() | {variable: value}
    )
    assert result.returncode == 2 and "invalid setting" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run([*LLMBUS, "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_a_port_is_checked_on_the_address_family_of_its_host() -> None:
    """`--http-host ::1` binds IPv6 (`serve.bind_socket`); the free-port check must ask the same family."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        assert not port_is_free(taken, "::1")
    assert port_is_free(taken, "::1")  # closed: free again
