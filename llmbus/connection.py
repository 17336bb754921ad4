"""The one way every llmbus part connects to NATS: worker, bridge, bench, `llmbus status` and the Python clients.

`nats_options(config)` turns the `nats_*` settings of a `Config` into nats-py `connect()` keyword arguments:
servers, credentials (a `.creds` file, an nkey seed file, user and password, or a token), TLS (a CA, and a client
certificate and key for mutual TLS) and the reply inbox prefix. `connect(config, name)` opens a connection that
reconnects forever, so a restarted server or a dropped link heals by itself, and logs connection trouble in one
line without secrets (a URL's `user:pass@` is never printed: see `redact_url`).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client as NATS

from llmbus.config import Config

log = logging.getLogger("llmbus.nats")

ErrorCallback = Callable[[Exception], Awaitable[None]]


class ConnectionSettingsError(ValueError):
    """Connection settings that cannot work (a missing file, a creds file without a JWT, TLS half-configured)."""


def servers_of(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


def redact_url(url: str) -> str:
    """A server URL fit for logs: `nats://user:***@host:4222` (a password or token in the URL is never shown)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***" if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))


def tls_context(config: Config) -> ssl.SSLContext | None:
    """A client TLS context when any TLS setting is given: the CA to trust, and a client certificate for mTLS."""
    if not (config.nats_tls_ca or config.nats_tls_cert or config.nats_tls_key):
        return None
    if bool(config.nats_tls_cert) != bool(config.nats_tls_key):
        raise ConnectionSettingsError("mutual TLS needs both nats_tls_cert and nats_tls_key")
    try:
        context = ssl.create_default_context(cafile=config.nats_tls_ca)
        if config.nats_tls_cert:
            context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionSettingsError(f"cannot load the NATS TLS files: {exc}") from None
    return context


def check_creds_file(path: str) -> None:
    """nats-py loops forever on a creds file without a user JWT block, so check it first."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()  # noqa: SIM115 - read and close at once
    except OSError as exc:
        raise ConnectionSettingsError(f"cannot read the NATS credentials file {path}: {exc.strerror}") from None
    if "-----BEGIN NATS USER JWT-----" not in text or "-----BEGIN USER NKEY SEED-----" not in text:
        raise ConnectionSettingsError(
            f"{path} is not a NATS credentials file: it needs a BEGIN NATS USER JWT block and a BEGIN USER NKEY SEED"
            " block (`nsc generate creds` writes one)"
        )


def nats_options(config: Config) -> dict[str, Any]:
    """The nats-py `connect()` keyword arguments for the connection settings of `config` (no callbacks)."""
    options: dict[str, Any] = {"servers": servers_of(config.nats_url)}
    if config.nats_creds:
        check_creds_file(config.nats_creds)
        options["user_credentials"] = config.nats_creds
    if config.nats_nkey_seed:
        options["nkeys_seed"] = config.nats_nkey_seed
    if config.nats_user:
        options["user"] = config.nats_user
    if config.nats_password:
        options["password"] = config.nats_password
    if config.nats_token:
        options["token"] = config.nats_token
    if (tls := tls_context(config)) is not None:
        options["tls"] = tls
    if config.nats_inbox_prefix:
        options["inbox_prefix"] = config.nats_inbox_prefix
    return options


async def connect(
    config: Config,
    name: str,
    *,
    reconnect_forever: bool = True,
    connect_timeout: float = 5.0,
    on_error: ErrorCallback | None = None,
) -> NATS:
    """A NATS connection for one llmbus part. With `reconnect_forever` (workers, the bridge) it rides out server
    restarts; subscriptions come back by themselves and publishes wait in nats-py's reconnect buffer meanwhile."""
    nc: NATS | None = None

    async def error_cb(exc: Exception) -> None:
        if on_error is not None:
            await on_error(exc)
        else:
            log.warning("NATS connection (%s): %s", name, exc)

    async def disconnected_cb() -> None:
        if nc is not None and not (nc.is_closed or nc.is_draining):
            log.warning("%s: disconnected from NATS; reconnecting", name)

    async def reconnected_cb() -> None:
        where = redact_url(nc.connected_url.geturl()) if nc is not None and nc.connected_url else "?"
        log.warning("%s: reconnected to NATS at %s", name, where)

    nc = await nats.connect(
        **nats_options(config),
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1 if reconnect_forever else 3,
        reconnect_time_wait=0.5,
        connect_timeout=connect_timeout,
        ping_interval=10,
        max_outstanding_pings=3,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
    )
    return nc


def connected_to(nc: NATS) -> str:
    """Where `nc` is connected, for logs and /healthz: scheme, host and port only."""
    url = nc.connected_url
    if url is None:
        return "?"
    host = url.hostname or "?"
    return f"{url.scheme}://{host}:{url.port}" if url.port else f"{url.scheme}://{host}"
