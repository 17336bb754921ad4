"""`llmbus up --secure` as a user runs it: a real subprocess that prints where the client credentials are; a client
with those credentials chats (core and durable), one without them is refused."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import httpx
import pytest

from bus_gateway.client import BusClient
from bus_gateway.jobs import JobClient
from llmbus.config import Config
from llmbus.connection import NatsConnectError, connect
from llmbus.nats_server import env_without_proxy, free_port
from schemas import ChatRequest

pytestmark = pytest.mark.model

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0
CREDENTIALS_LINE = re.compile(r"^llmbus: client credentials  (\S+)")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in env_without_proxy().items() if not k.startswith("LLMBUS_") or k == "LLMBUS_CACHE_DIR"}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | extra


async def read_until_ready(proc: asyncio.subprocess.Process, lines: list[str]) -> None:
    assert proc.stdout is not None
    async with asyncio.timeout(READY_TIMEOUT_S):
        while (line := await proc.stdout.readline()) and line.decode().strip() != "llmbus: ready":
            lines.append(line.decode().rstrip())
    assert proc.returncode is None, "\n".join(lines)


def env_file_settings(path: Path) -> dict[str, str]:
    """The settings of an env file, its values unquoted as sh would (tests/test_permissions_secure_env.py sources
    such files in a real shell)."""
    return dict(shlex.split(line)[0].split("=", 1) for line in path.read_text().splitlines() if "=" in line)


async def test_up_secure_prints_the_client_credentials_that_work(tmp_path: Path) -> None:
    secure_dir, stderr_path = tmp_path / "secure", tmp_path / "stderr"
    nats_port, http_port = free_port(), free_port()
    argv = ["up", "--secure", "--secure-dir", str(secure_dir), "--nats-port", str(nats_port)]
    argv += ["--http-port", str(http_port), "--max-batch-size", "4", "--max-seq-len", "512", "--durable"]
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmbus.cli", *argv,
            stdout=asyncio.subprocess.PIPE, stderr=stderr, env=clean_env(), start_new_session=True,
        )  # fmt: skip
    lines: list[str] = []
    try:
        await read_until_ready(proc, lines)
        assert f"llmbus: NATS  tls://127.0.0.1:{nats_port}" in "\n".join(lines)
        env_file = Path(next(m.group(1) for line in lines if (m := CREDENTIALS_LINE.match(line))))
        assert env_file == secure_dir / "client.env"
        client_config = Config.load(env=env_file_settings(env_file))
        async with await BusClient.from_config(client_config) as client:
            answer = await client.chat(
                ChatRequest(chat_id="s", user_prompt="What is the capital of France?", max_tokens=8)
            )
        assert "Paris" in answer.response
        nc = await connect(client_config, "test-jobs", reconnect_forever=False)
        jobs = JobClient(nc, timeout=120)
        try:  # durable mode: the worker created LLM_JOBS with only its grants; the client has the job subjects
            job_answer = await jobs.chat(ChatRequest(chat_id="j", user_prompt="Name a colour.", max_tokens=4))
        finally:
            await jobs.close()
            await nc.close()
        assert job_answer.response
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            assert (await http.get(f"http://127.0.0.1:{http_port}/readyz")).status_code == 200
        without_seed = Config.load(env=env_file_settings(env_file), nats_nkey_seed=None)
        with pytest.raises(NatsConnectError, match="Authorization Violation"):
            await connect(without_seed, "test-no-credentials")
        plain = Config(nats_url=f"nats://127.0.0.1:{nats_port}")
        with pytest.raises(NatsConnectError):
            await connect(plain, "test-plain")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S) == 0
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    seed = (secure_dir / "client.nk").read_text().strip()
    assert seed not in stderr_path.read_text() and seed not in "\n".join(lines)
