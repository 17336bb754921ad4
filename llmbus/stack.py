"""Run llmbus parts in one asyncio process until SIGINT/SIGTERM: an embedded nats-server, workers, the HTTP bridge.

`llmbus up` runs all three on loopback; `llmbus worker` and `llmbus gateway` run one part against an existing server.
Every part follows one contract: `run(config, stop, ready)` serves until `stop` is set, then drains and returns.
`llmbus up --secure` starts the embedded server with TLS and one login per role (llmbus.secure_stack); each part
then connects with its own role's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

from llmbus import process_gc
from llmbus.config import ENV_PREFIX, Config
from llmbus.nats_server import NatsServer, NatsServerError, free_port, port_is_free
from llmbus.urls import redact_urls

Part = Literal["worker", "gateway"]
PartRunner = Callable[[Config, asyncio.Event, asyncio.Event | None], Awaitable[None]]

SHUTDOWN_MARGIN_S = 15.0
STARTING_GRACE_S = 5.0
NATS_POLL_INTERVAL_S = 0.5
NATS_URL_VARIABLE = f"{ENV_PREFIX}NATS_URL"

log = logging.getLogger("llmbus.stack")


class StackError(RuntimeError):
    pass


def announce(line: str) -> None:
    print(f"llmbus: {line}", flush=True)


def fail(message: str) -> None:
    print(f"llmbus: error: {message}", file=sys.stderr, flush=True)


def part_runner(part: Part) -> PartRunner:
    """Imported on demand, so that a gateway-only process never loads torch."""
    try:
        if part == "worker":
            from inference_worker.worker import run_worker

            return run_worker
        from bus_gateway.serve import run_gateway

        return run_gateway
    except ImportError as exc:
        raise StackError(f"cannot load the {part}: {exc}") from exc


def describe_ready(part: Part, config: Config) -> list[str]:
    if part == "gateway":
        scheme = "https" if config.http_tls_cert else "http"
        base = f"{scheme}://{config.http_host}:{config.http_port}"
        return [f"HTTP  {base}", f"metrics  {base}/metrics (bridge)"]
    prefix = config.subject_prefix
    lines = [f"worker  {prefix}.chat, {prefix}.chat.batched (queue group {config.queue_group})"]
    if config.metrics_port:
        lines.append(f"metrics  http://{config.metrics_host}:{config.metrics_port}/metrics (worker)")
    return lines


def with_metrics_port(config: Config, default: int | None) -> Config:
    """`llmbus up`: the worker's metrics on `default` unless --metrics-port was given; when that port is taken (a
    second stack on this machine), on a free one instead."""
    if config.metrics_port is not None or not default:
        return config
    port = default if port_is_free(default, config.metrics_host) else free_port()
    return dataclasses.replace(config, metrics_port=port)


def with_zero_ports_picked(config: Config) -> Config:
    """Port 0 (HTTP, metrics) asks for any free port: it is picked here, so the ready lines name the one used."""
    picked = {
        name: free_port(getattr(config, host))
        for name, host in (("http_port", "http_host"), ("metrics_port", "metrics_host"))
        if getattr(config, name) == 0
    }
    return dataclasses.replace(config, **picked) if picked else config


async def run_stack(
    config: Config,
    parts: Sequence[Part],
    embedded_nats: bool = False,
    nats_store_dir: str | None = None,
    *,
    default_metrics_port: int | None = None,
) -> int:
    """Serve `parts` until a signal arrives; with `embedded_nats`, start nats-server on config.nats_port first.
    `default_metrics_port`: the worker's metrics port when config.metrics_port is unset (`llmbus up`).

    Returns the process exit code: 0 after a clean stop, 1 when something failed to start or stopped on its own.
    """
    config = with_metrics_port(config, default_metrics_port) if "worker" in parts else config
    config = with_zero_ports_picked(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled_signals = install_signal_handlers(loop, stop)
    server: NatsServer | None = None
    configs: dict[Part, Config] = {part: config for part in parts}
    try:
        if config.secure and not embedded_nats:
            raise StackError(secure_with_nats_url(config, os.environ))
        if "gateway" in parts:
            check_http_port_is_free(config)
        if embedded_nats:
            server, configs = await start_embedded_nats(config, parts, nats_store_dir)
        if stop.is_set():
            return 0
        return await serve_parts(configs, stop, server)
    except (NatsServerError, StackError) as exc:
        fail(str(exc))
        return 1
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        for sig in handled_signals:
            loop.remove_signal_handler(sig)


async def start_embedded_nats(
    config: Config, parts: Sequence[Part], store_dir: str | None
) -> tuple[NatsServer, dict[Part, Config]]:
    """Start nats-server on config.nats_port; with `secure`, with TLS and a login per role. Returns the server and
    each part's config (its URL, and with `secure` its role's credentials). The server starts on this thread, the
    main one, which blocks the loop while it starts (nothing else runs yet): so it dies with this process, even one
    killed with SIGKILL, and no server is left holding the port."""
    if not config.secure:
        server = NatsServer(port=config.nats_port, store_dir=store_dir)
        server.start()
        announce(f"NATS  {server.url}")
        return server, {part: dataclasses.replace(config, nats_url=server.url) for part in parts}
    from llmbus.secure_stack import SecureDirError, prepare

    port = config.nats_port or free_port()
    try:
        setup = await asyncio.to_thread(prepare, config, "127.0.0.1", port)
    except SecureDirError as exc:  # a damaged or foreign file of the secure directory: named, with the fix
        raise StackError(str(exc)) from exc
    server = NatsServer(port=port, store_dir=store_dir, config_file=str(setup.server_config), tls=True)
    server.start()
    announce(f"NATS  {server.url} (TLS, a login per role; CA {setup.ca})")
    announce(f"client credentials  {setup.env_file('client')} (load with: {setup.load_command('client')})")
    return server, {part: setup.config_for(part, config) for part in parts}


def secure_with_nats_url(config: Config, env: Mapping[str, str]) -> str:
    """Why --secure cannot run with a NATS URL to join, naming where that URL came from: the LLMBUS_NATS_URL a
    sourced `<role>.env` file sets (which --nats-url would override), or --nats-url."""
    if env.get(NATS_URL_VARIABLE) == config.nats_url:
        return (
            f"--secure starts its own nats-server, but {NATS_URL_VARIABLE} is set in the environment"
            f" ({redact_urls(config.nats_url)}, e.g. by a sourced client.env): unset {NATS_URL_VARIABLE} to start"
            " a secure stack, or leave out --secure to join that server"
        )
    return f"--secure starts its own nats-server: it cannot be combined with --nats-url {redact_urls(config.nats_url)}"


def check_http_port_is_free(config: Config) -> None:
    if not port_is_free(config.http_port, config.http_host):
        raise StackError(
            f"HTTP port {config.http_port} on {config.http_host} is already in use: pick another with --http-port"
        )


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> list[signal.Signals]:
    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                announce("stopping")

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal closed; nats-server too
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):
            continue
        handled.append(sig)
    return handled


async def serve_parts(configs: Mapping[Part, Config], stop: asyncio.Event, server: NatsServer | None) -> int:
    parts = list(configs)
    runners = {part: part_runner(part) for part in parts}
    process_gc.freeze_imports()
    ready = {part: asyncio.Event() for part in parts}
    tasks = {
        part: asyncio.create_task(runner(configs[part], stop, ready[part]), name=f"llmbus-{part}")
        for part, runner in runners.items()
    }
    announcer = asyncio.create_task(announce_when_ready(ready, configs))
    stop_signal = asyncio.create_task(stop.wait())
    nats_exit = asyncio.create_task(watch_nats_server(server))
    try:
        await asyncio.wait([stop_signal, nats_exit, *tasks.values()], return_when=asyncio.FIRST_COMPLETED)
        ended_early = sorted(part for part, task in tasks.items() if task.done())
        stop.set()
        drain_timeout = max(config.drain_timeout for config in configs.values())
        clean = await stop_parts(tasks, ready, drain_timeout + SHUTDOWN_MARGIN_S)
    finally:
        for task in (announcer, stop_signal, nats_exit):
            task.cancel()
    for part in ended_early:
        if not tasks[part].cancelled() and tasks[part].exception() is None:
            fail(f"the {part} stopped on its own before a stop signal")
    if nats_exit.done() and not nats_exit.cancelled():
        fail(nats_exit.result())
    return 0 if clean and not ended_early and not nats_exit.done() else 1


async def announce_when_ready(ready: dict[Part, asyncio.Event], configs: Mapping[Part, Config]) -> None:
    """Say what each part serves as it becomes ready, then settle the garbage collector (`process_gc.py`; at the
    latest after its start limit) and say `ready`."""
    asyncio.get_running_loop().call_later(process_gc.START_LIMIT_S, process_gc.settle)
    for part, config in configs.items():
        await ready[part].wait()
        for line in describe_ready(part, config):
            announce(line)
    process_gc.settle()
    announce("ready")


async def watch_nats_server(server: NatsServer | None) -> str:
    """Returns (a message) only when an embedded nats-server exits while the parts still need it."""
    if server is None or server.proc is None:
        await asyncio.Event().wait()
    proc = server.proc
    while proc.poll() is None:
        await asyncio.sleep(NATS_POLL_INTERVAL_S)
    return f"nats-server exited unexpectedly with code {proc.returncode}{server.log_tail.describe()}"


async def stop_parts(tasks: dict[Part, asyncio.Task[None]], ready: dict[Part, asyncio.Event], timeout: float) -> bool:
    """Wait for every part to drain, cancelling one still draining after `timeout`. True when all stopped cleanly.

    A part that never became ready holds no requests (it may be stuck connecting), so it gets only a short grace.
    """
    starting = {part: task for part, task in tasks.items() if not ready[part].is_set()}
    for part in await cancel_after(starting, STARTING_GRACE_S):
        log.info("the %s was still starting and was cancelled", part)
    draining = {part: task for part, task in tasks.items() if part not in starting}
    stuck = await cancel_after(draining, timeout)
    for part in stuck:
        fail(f"the {part} did not stop within {timeout:.0f}s and was cancelled")
    clean = not stuck
    for part, task in tasks.items():
        if not task.cancelled() and task.exception() is not None:
            log.error("the %s failed", part, exc_info=task.exception())
            fail(f"the {part} failed: {task.exception()!r}")
            clean = False
    return clean


async def cancel_after(tasks: dict[Part, asyncio.Task[None]], timeout: float) -> list[Part]:
    """Wait up to `timeout` for `tasks`; cancel (and await) the ones still running, and name them."""
    if not tasks:
        return []
    _, pending = await asyncio.wait(tasks.values(), timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=SHUTDOWN_MARGIN_S)
    return [part for part, task in tasks.items() if task in pending]
