"""Running the bridge: the listening socket, uvicorn, the bridge's bus connection and its lifetime until `stop`
(`run_gateway`, which `llmbus gateway` and `llmbus up` run). The app itself is app.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import uvicorn
from litestar import Litestar

from bus_gateway.app import create_app, https_options
from bus_gateway.client import BusClient
from llmbus.config import Config
from llmbus.connection import connect
from schemas import Subjects

log = logging.getLogger("llmbus.gateway")

STREAM_GRACE = 3.0  # seconds open streams may keep going after a stop, before they are ended
SHUTDOWN_GRACE = 10.0  # uvicorn's limit for everything to finish; what remains is then cancelled


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the caller owns signals and sets `stop`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen before serving, so a busy port is a clear error and `ready` means connections are accepted."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        message = f"HTTP port {port} on {host} is not available ({exc.strerror}): pick another with --http-port"
        raise OSError(exc.errno, message) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def connect_bus(config: Config) -> BusClient:
    """The bridge's bus client, on a connection that reconnects forever (a NATS restart heals by itself)."""
    nc = await connect(config, "llmbus-gateway", connect_timeout=2.0)
    return BusClient(nc, Subjects(config.subject_prefix), timeout=config.request_timeout, owns_connection=True)


async def run_gateway(config: Config, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Serve the bridge on `config.http_host:config.http_port` until `stop` is set, then shut down cleanly."""
    tls = https_options(config)
    sock = bind_socket(config.http_host, config.http_port)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        connecting = asyncio.ensure_future(connect_bus(config))  # waits for NATS to come up, logging each try
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            return
        stopping.cancel()
        bus = connecting.result()
    except BaseException:
        stopping.cancel()
        sock.close()
        raise

    def signal_ready(_: Litestar) -> None:
        if ready is not None:
            ready.set()

    try:
        await _serve(create_app(bus, config, on_startup=[signal_ready]), sock, bus, stop, tls)
    finally:
        sock.close()
        await bus.close()


async def _serve(
    app: Litestar, sock: socket.socket, bus: BusClient, stop: asyncio.Event, tls: dict[str, Any] | None = None
) -> None:
    """Serve until `stop`; then stop accepting, let requests finish for STREAM_GRACE seconds, end the streams
    still open (cancelled on the workers; a `/chat` client gets the last chunk, `finish_reason: "cancelled"`, an
    OpenAI client an error event and no `[DONE]`: `app.state["stopping"]` is set first), and wait for uvicorn."""
    uv_config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,  # uvicorn's loggers propagate to the embedding process's logging setup
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        **(tls or {}),
    )
    server = _Server(uv_config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await asyncio.wait({serving}, timeout=STREAM_GRACE)
        if not serving.done():
            app.state["stopping"] = True  # the streams cut off now say so (the OpenAI ones end with an error)
            if await bus.cancel_streams():
                log.info("bridge stopping: ended the streams still open")
    finally:
        server.should_exit = True
        stopping.cancel()
        try:
            await serving
        except SystemExit as exc:  # uvicorn exits this way when the app's startup fails
            raise RuntimeError(f"the HTTP bridge failed to start (uvicorn exit code {exc.code})") from None
