"""The processes under test: an embedded nats-server, `--workers N` `llmbus worker` processes (with `--pin`, each
pinned to whole physical cores of its own: every hyper-thread of them, none shared with another worker), and with
`--http` an `llmbus gateway` process (the HTTP bridge in a process of its own, so that its Python work never
competes with a worker's engine for the GIL). With `--nats-url` the bench uses that server and the workers on it
instead. The bridge logs in to NATS with the bench's own settings, given in its environment (`gateway_env`).
`stop()` stops them all, nats-server last and even when stopping another raised; the workers and the bridge also
get SIGTERM from the kernel should the bench die first."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmbus.bench.cores import Topology, group_cores, physical_cores, pin_problem, read_topology
from llmbus.bench.options import BenchError, BenchOptions, progress
from llmbus.config import CONNECTION_FIELDS, ENV_PREFIX, Config
from llmbus.nats_server import NatsServer, dies_with_this_process, free_port

BRIDGE_ENV_DROPPED = ("LLMBUS_API_KEYS", "LLMBUS_API_KEY_FILE")  # the bench's own bridge is open, on loopback


def assign_cores(
    available: Iterable[int], workers: int, per_worker: int = 0, topology: Topology | None = None
) -> list[list[int]]:
    """One group of logical CPUs per worker, made of `per_worker` whole physical cores (0: an equal share of the
    cores in `available`), disjoint, in core order; `topology` maps each CPU to its physical core (None: each CPU
    is a core of its own). BenchError when the whole cores do not go round."""
    cores = physical_cores(available, topology)
    problem = pin_problem(cores, workers, per_worker)
    if problem is not None:
        raise BenchError(problem)
    return group_cores(cores, workers, per_worker)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all of its threads together; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child_setup(cores: list[int] | None) -> Callable[[], None] | None:
    """What a worker or bridge child does before exec: ask for SIGTERM when the bench dies, even by SIGKILL
    (`nats_server.dies_with_this_process`: only from the main thread), and take its cores (every thread it starts
    inherits them)."""
    dies_with_bench = dies_with_this_process()
    if cores is None:
        return dies_with_bench

    def setup() -> None:
        if dies_with_bench is not None:
            dies_with_bench()
        os.sched_setaffinity(0, cores)

    return setup


def gateway_env(env: Mapping[str, str], connection: Config) -> dict[str, str]:
    """The bench-started bridge's environment: the bench's own, less the API keys (the bridge is open, on
    loopback), with the bench's NATS connection settings as `LLMBUS_NATS_*` (flags would show secrets in `ps`)."""
    child = {k: v for k, v in env.items() if k not in BRIDGE_ENV_DROPPED}
    for name in ("nats_url", *CONNECTION_FIELDS):
        key, value = ENV_PREFIX + name.upper(), getattr(connection, name)
        if value is None:
            child.pop(key, None)
        else:
            child[key] = str(value)
    return child


@dataclass
class WorkerProcess:
    index: int
    proc: subprocess.Popen
    command: list[str]
    threads: int
    cores: list[int] | None
    log_path: Path

    def describe(self) -> dict[str, object]:
        try:
            affinity: list[int] | None = sorted(os.sched_getaffinity(self.proc.pid))
        except OSError:
            affinity = None
        return {
            "index": self.index,
            "pid": self.proc.pid,
            "threads": self.threads,
            "pinned_cores": self.cores,
            "affinity": affinity,
            "command": ["llmbus", *self.command[3:]],  # [python, -m, llmbus.cli, worker, ...]
            "log": str(self.log_path),
        }


@dataclass
class Stack:
    opts: BenchOptions
    server: NatsServer | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    bridge: subprocess.Popen | None = None
    url: str = ""
    http_url: str | None = None

    def start(self) -> Stack:
        self.opts.out.mkdir(parents=True, exist_ok=True)
        if self.opts.nats_url:
            self.url = self.opts.nats_url
        else:
            self.server = NatsServer().start()
            self.url = self.server.url
            progress(f"nats-server on {self.url} (pid {self.server.proc.pid if self.server.proc else '?'})")
            self.start_workers()
        if self.opts.http_url:
            self.http_url = self.opts.http_url
        elif self.opts.http:
            self.start_bridge()
        return self

    def start_workers(self) -> None:
        groups: list[list[int] | None] = [None] * self.opts.workers
        if self.opts.pin:
            available = os.sched_getaffinity(0)
            topology = read_topology(available)
            groups = list(assign_cores(available, self.opts.workers, self.opts.cores_per_worker, topology))
        for index, cores in enumerate(groups):
            threads = self.threads_for(cores)
            command = self.worker_command(threads)
            log_path = self.opts.out / f"worker-{index}.log"
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    command,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_child_setup(cores),
                )
            self.workers.append(WorkerProcess(index, proc, command, threads, cores, log_path))
            where = f", cores {cores}" if cores is not None else ""
            progress(f"worker {index} started (pid {proc.pid}, {threads} threads{where}, log {log_path})")

    def threads_for(self, cores: list[int] | None) -> int:
        """--worker-threads, else one torch thread per logical CPU of the worker's pinned cores (as an unpinned
        worker takes one per CPU of its affinity), else an equal share of the bench's CPUs."""
        if self.opts.worker_threads > 0:
            return self.opts.worker_threads
        if cores is not None:
            return len(cores)
        return max(1, len(os.sched_getaffinity(0)) // self.opts.workers)

    def worker_command(self, threads: int) -> list[str]:
        top = max(self.opts.concurrency)
        command = [sys.executable, "-m", "llmbus.cli", "worker", "--nats-url", self.url]
        command += ["--subject-prefix", self.opts.subject_prefix]
        command += ["--max-batch-size", str(top), "--max-pending", str(max(256, 2 * top))]
        command += ["--max-tokens-cap", str(max(1024, self.opts.max_tokens))]
        command += ["--threads", str(threads), "--device", self.opts.device, "--dtype", self.opts.dtype]
        command += ["--log-level", "WARNING"]
        if self.opts.model:
            command += ["--model", self.opts.model]
        return command + list(self.opts.worker_args)

    def start_bridge(self) -> None:
        port = free_port()
        command = [sys.executable, "-m", "llmbus.cli", "gateway", "--subject-prefix", self.opts.subject_prefix]
        command += ["--http-host", "127.0.0.1", "--http-port", str(port)]
        command += ["--request-timeout", str(self.opts.request_timeout), "--log-level", "WARNING"]
        env = gateway_env(os.environ, dataclasses.replace(self.opts.connection, nats_url=self.url))
        log_path = self.opts.out / "bridge.log"
        with open(log_path, "wb") as log_file:
            self.bridge = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                preexec_fn=_child_setup(None),
            )
        self.http_url = f"http://127.0.0.1:{port}"
        progress(f"HTTP bridge started on {self.http_url} (pid {self.bridge.pid}, log {log_path})")

    def worker_cpu_seconds(self) -> float | None:
        """User + system CPU seconds the worker processes used so far (None without our own workers)."""
        if not self.workers:
            return None
        return sum(process_cpu_seconds(w.proc.pid) for w in self.workers)

    def nats_server_cpu_seconds(self) -> float | None:
        proc = self.server.proc if self.server is not None else None
        return process_cpu_seconds(proc.pid) if proc is not None else None

    def bridge_cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.bridge.pid) if self.bridge is not None else None

    def check_alive(self) -> None:
        for w in self.workers:
            if w.proc.poll() is not None:
                raise BenchError(f"worker {w.index} exited with code {w.proc.returncode}; see {w.log_path}")
        if self.bridge is not None and self.bridge.poll() is not None:
            log_path = self.opts.out / "bridge.log"
            raise BenchError(f"the HTTP bridge exited with code {self.bridge.returncode}; see {log_path}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the bridge and the workers, then nats-server, which is stopped even when stopping them raised."""
        procs = ([self.bridge] if self.bridge is not None else []) + [w.proc for w in self.workers]
        try:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    progress(f"pid {proc.pid} did not stop in {timeout:.0f}s; killing it")
                    proc.kill()
                    proc.wait()
        finally:
            self.bridge = None
            server, self.server = self.server, None
            if server is not None:
                server.stop()
