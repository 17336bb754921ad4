"""Checks before the long phases (the baselines take minutes), so that a wrong URL, model, key or login fails in
seconds with one line: the peer answers a first request, `--nats-url` accepts a connection with the bench's
settings, and `--http-url` answers `GET /readyz`. Also how main names a failure."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import aiohttp
import nats.errors

from llmbus import connection
from llmbus.bench.http_load import OpenAITarget, probe
from llmbus.bench.options import BenchError, BenchOptions
from llmbus.connection import ConnectionSettingsError, NatsConnectError, describe_failure
from llmbus.nats_server import NatsServerError
from llmbus.urls import redact_urls

FAILURES = (
    BenchError,
    NatsServerError,
    NatsConnectError,
    ConnectionSettingsError,
    nats.errors.Error,
    OSError,  # TimeoutError and ssl.SSLError among them
)  # what ends a run with one line, not a traceback
PROBE_TIMEOUT_S = 10.0
READY_STATUSES = (200, 503)  # 503: the bridge is up but no worker answers yet (the sweep waits for them)


def describe(exc: BaseException) -> str:
    text = describe_failure(exc) if isinstance(exc, nats.errors.Error | ssl.SSLError) else str(exc)
    return text or type(exc).__name__


def check_peer(opts: BenchOptions) -> str | None:
    """One short request to the peer, so a wrong URL, model or key fails in seconds."""
    if not (opts.peer_url and opts.peer_model):
        return None
    target = OpenAITarget("the peer", opts.peer_url, opts.peer_model, opts.peer_api_key)
    problem = asyncio.run(probe(target, min(opts.request_timeout, 120.0)))
    return f"the peer did not answer a first request: {problem}" if problem else None


def check_bus(opts: BenchOptions) -> str | None:
    """With `--nats-url`: connect with the bench's connection settings and close again."""
    if not opts.nats_url:
        return None
    config = dataclasses.replace(opts.connection, nats_url=opts.nats_url, subject_prefix=opts.subject_prefix)

    async def connect() -> None:
        failures: list[Exception] = []

        async def quietly(exc: Exception) -> None:  # said once below, not once per try
            failures.append(exc)

        try:
            nc = await connection.connect(config, "llmbus-bench", reconnect_forever=False, on_error=quietly)
        except nats.errors.NoServersError:
            if failures:
                raise failures[-1] from None
            raise
        await nc.close()

    try:
        asyncio.run(connect())
    except FAILURES as exc:
        return f"cannot connect to NATS at {redact_urls(opts.nats_url)}: {describe(exc)}"
    return None


def check_bridge(opts: BenchOptions) -> str | None:
    """With `--http-url`: one `GET /readyz`; an answer other than ready or not-ready-yet is no llmbus bridge."""
    if not opts.http_url:
        return None
    return asyncio.run(_readyz(opts.http_url))


async def _readyz(url: str) -> str | None:
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as client, client.get(url + "/readyz") as response:
            if response.status in READY_STATUSES:
                return None
            return f"the HTTP bridge at {url} answered GET /readyz with HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"the HTTP bridge at {url} did not answer GET /readyz: {type(exc).__name__} {exc}".rstrip()
