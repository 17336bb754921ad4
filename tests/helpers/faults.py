"""Helpers for the fault tests: worker subprocesses, `$SRV.STATS`, a steady bounded load, and the fault figures.

Every fault test records requests sent / answered / errored / lost and its recovery time: printed (run pytest
with `-s` to see them) and merged into `bench-results/reliability.json` (ignored by git).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from torch import nn

from bus_gateway.client import BusClient, BusError
from bus_gateway.discovery import BusModels
from inference_worker import model_runner
from llmbus.nats_server import env_without_proxy
from schemas import ChatRequest

if TYPE_CHECKING:
    from inference_worker.worker import Worker

RESULTS_FILE = Path(__file__).resolve().parents[2] / "bench-results" / "reliability.json"
READY_TIMEOUT_S = 180.0
PROMPT = "Name a colour."


# --- figures -----------------------------------------------------------------------------------------------


@dataclass
class FaultFigures:
    """What one fault test saw. `lost`: requests with no final answer at all (must be 0)."""

    test: str
    sent: int = 0
    answered: int = 0
    errored: int = 0
    lost: int = 0
    duplicates: int = 0
    recovery_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def record(self) -> None:
        line = (
            f"[fault] {self.test}: sent={self.sent} answered={self.answered} errored={self.errored} "
            f"lost={self.lost} duplicates={self.duplicates} recovery_s={_fmt(self.recovery_s)} {self.notes or ''}"
        )
        print(line, file=sys.stderr, flush=True)
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        try:
            results = json.loads(RESULTS_FILE.read_text())
        except (OSError, ValueError):
            results = {}
        results[self.test] = asdict(self) | {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        RESULTS_FILE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- requests ----------------------------------------------------------------------------------------------


def chat(chat_id: str, max_tokens: int = 4, **fields: Any) -> ChatRequest:
    return ChatRequest(chat_id=chat_id, user_prompt=fields.pop("user_prompt", PROMPT), max_tokens=max_tokens, **fields)


async def gather_stats(nc: NATS, window: float = 1.0) -> list[dict[str, Any]]:
    """Every worker's `$SRV.STATS` reply, gathered for at most `window` seconds."""
    return await BusClient(nc).stats(window)


async def stats_of(nc: NATS, wanted: Callable[[dict[str, Any]], bool], count: int, timeout: float = 60) -> list[dict]:
    """The `$SRV.STATS` replies that `wanted` accepts, once `count` of them came in one gather. A gather ends a
    moment after the last reply, so a worker slow to answer (a loaded machine) can be missed: gather again."""
    deadline = time.monotonic() + timeout
    while True:
        replies = [r for r in await gather_stats(nc, 2.0) if wanted(r)]
        if len(replies) >= count or time.monotonic() > deadline:
            return replies


def serving(subject_prefix: str) -> Callable[[dict[str, Any]], bool]:
    """Accepts the STATS reply of a worker whose first endpoint is under `subject_prefix`."""
    return lambda stats: stats["endpoints"][0]["subject"].startswith(subject_prefix)


def engine_data(stats: dict[str, Any]) -> dict[str, Any]:
    """The worker's custom stats (the same `data` on each endpoint)."""
    return stats["endpoints"][0]["data"]


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll `check` until it holds (a deadline-bounded poll of state we cannot subscribe to); returns seconds taken."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - start


# --- worker subprocesses -------------------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    kept = ("LLMBUS_CACHE_DIR", "LLMBUS_COMPILE")  # LLMBUS_COMPILE=false (conftest): these workers serve eagerly
    # No OTEL_* from the shell running pytest: a test that wants span export sets its own.
    env = {k: v for k, v in env_without_proxy().items() if not k.startswith(("LLMBUS_", "OTEL_")) or k in kept}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "LLMBUS_THREADS": "1"}


@dataclass
class WorkerProcess:
    """`python -m llmbus.cli worker` as an operator runs it; stderr goes to a file for the failure message.
    `part="gateway"` runs the HTTP bridge instead; `env` adds variables to `subprocess_env()`."""

    proc: asyncio.subprocess.Process
    log_path: Path
    name: str

    @classmethod
    async def start(
        cls,
        nats_url: str,
        log_dir: Path,
        name: str,
        *flags: str,
        part: str = "worker",
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        log_path = log_dir / f"{name}.log"
        command = [sys.executable, "-m", "llmbus.cli", part, "--nats-url", nats_url, "--log-level", "INFO"]
        with open(log_path, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *command,
                *flags,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=subprocess_env() | (env or {}),
                cwd=Path(__file__).resolve().parents[2],
            )
        return cls(proc, log_path, name)

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Read stdout until `llmbus: ready` (the stack prints it once the worker serves)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name} not ready within {timeout:.0f}s\n{self.log_tail()}")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                continue
            if not line:
                code = await self.proc.wait()
                raise AssertionError(f"{self.name} exited with {code} before it was ready\n{self.log_tail()}")
            if line.decode().strip() == "llmbus: ready":
                return

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return f"--- {self.name} log tail ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        return ""

    async def ensure_stopped(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


async def start_workers(nats_url: str, log_dir: Path, names: list[str], *flags: str) -> list[WorkerProcess]:
    workers = [await WorkerProcess.start(nats_url, log_dir, name, *flags) for name in names]
    try:
        await asyncio.gather(*(w.wait_ready() for w in workers))
    except BaseException:
        await asyncio.gather(*(w.ensure_stopped() for w in workers))
        raise
    return workers


# --- steady load ---------------------------------------------------------------------------------------------


@dataclass
class SteadyLoad:
    """`concurrency` clients in a closed loop through `BusClient` (retrying 503 with backoff) until stopped or
    `max_requests` were sent. Each call ends in exactly one outcome: an answer, an error answer, or lost (no answer)."""

    client: BusClient
    concurrency: int = 2
    max_requests: int = 60
    max_tokens: int = 4
    timeout: float = 60.0
    figures: FaultFigures = field(default_factory=lambda: FaultFigures("load"))
    errors: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _answered_event: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client_loop(i)) for i in range(self.concurrency)]

    async def stop(self) -> FaultFigures:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.figures

    async def next_answer(self, timeout: float = 60.0) -> None:
        """Wait for the next successful answer (proof that the load flows)."""
        self._answered_event.clear()
        await asyncio.wait_for(self._answered_event.wait(), timeout)

    async def _client_loop(self, index: int) -> None:
        n = 0
        while not self._stop.is_set() and self.figures.sent < self.max_requests:
            self.figures.sent += 1
            n += 1
            try:
                await self.client.chat(chat(f"load-{index}-{n}", self.max_tokens), timeout=self.timeout)
            except BusError as exc:
                if exc.name == "timeout":
                    self.figures.lost += 1
                else:
                    self.figures.errored += 1
                self.errors.append(repr(exc))
                continue
            self.figures.answered += 1
            self._answered_event.set()


@dataclass
class LinkEvents:
    """Set when a client connection drops / comes back (nats.py callbacks)."""

    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    restored: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_disconnected(self) -> None:
        self.restored.clear()
        self.dropped.set()

    async def on_reconnected(self) -> None:
        self.dropped.clear()
        self.restored.set()


async def connect_client(url: str, link: LinkEvents | None = None) -> NATS:
    """A client connection that rides out a server restart (reconnects forever)."""
    link = link or LinkEvents()
    return await nats.connect(
        url,
        name="fault-client",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        error_cb=_quiet,
        disconnected_cb=link.on_disconnected,
        reconnected_cb=link.on_reconnected,
    )


async def _quiet(exc: Exception) -> None:
    return None


class HeldLook:
    """Holds a worker's thorough looks at the bus (`ModelDirectory.gather`, the whole discovery window) until the
    test sets `release`; `looking` is set when one starts."""

    def __init__(self, worker: Worker) -> None:
        self.looking, self.release = asyncio.Event(), asyncio.Event()
        self._look = worker.directory.gather
        worker.directory.gather = self._held

    async def _held(self, thorough: bool) -> BusModels:
        if thorough:
            self.looking.set()
            await self.release.wait()
        return await self._look(thorough)


class Poison(Exception):
    """An error that even fails to describe itself, so the engine's own recovery (fail_all) fails too and the engine
    thread dies."""

    def __repr__(self) -> str:
        raise RuntimeError("poisoned repr")

    __str__ = __repr__


def poisoned_engines(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Engines built from now on die at their next forward once the returned event is set."""
    armed = threading.Event()
    family_decoder = model_runner.family_decoder

    def poisoned_decoder(*args: Any, **kwargs: Any) -> nn.Module:
        decoder = family_decoder(*args, **kwargs)
        forward = decoder.forward

        def poisoned(*args: Any, **kwargs: Any) -> Any:
            if armed.is_set():
                raise Poison()
            return forward(*args, **kwargs)

        decoder.forward = poisoned  # type: ignore[method-assign]
        return decoder

    monkeypatch.setattr(model_runner, "family_decoder", poisoned_decoder)
    return armed
