"""The one way every llmbus part connects to NATS: worker, bridge, bench, `llmbus status` and the Python clients.

`nats_options(config)` turns the `nats_*` settings of a `Config` into nats-py `connect()` keyword arguments:
servers, credentials (a `.creds` file, an nkey seed file, user and password, or a token), TLS (a CA, and a client
certificate and key for mutual TLS) and the reply inbox prefix. It checks them first and names what is wrong
(`ConnectionSettingsError`). `connect(config, name)` opens a connection that reconnects forever, so a restarted
server or a dropped link heals by itself, and logs connection trouble in one line without secrets (a URL's
`user:pass@` is never printed: see `llmbus.urls`). A password or token in a URL cannot hold `/`, `?` or `#`: nats-py
reads the URL as written and decodes no %-escapes, so such a secret goes in `nats_password` or `nats_token`.

Two nats-py behaviours are closed here:
- Given TLS settings (or a `tls://` URL), nats-py connects **in plaintext, silently**, to a server that does not
  offer TLS, and would send the credentials in the clear. `connect` (and `open_connection`, which `BusClient.connect`
  uses) refuses such a server before any credential leaves the process (`PlaintextServerError`).
- A first connection that fails for a reason a retry cannot fix (authorization violation, a TLS certificate that
  does not verify, a plaintext server) fails at once with `NatsConnectError` instead of retrying forever.
  Connection refused and timeouts are still retried: the server may be starting.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from llmbus.config import Config
from llmbus.permissions import SUBJECT
from llmbus.urls import URL_ENDS, redact_url, redact_urls, servers_of, split_login

log = logging.getLogger("llmbus.nats")

ErrorCallback = Callable[[Exception], Awaitable[None]]

CREDS_JWT = "-----BEGIN NATS USER JWT-----"
CREDS_SEED = "-----BEGIN USER NKEY SEED-----"
PERMANENT_SERVER_ERRORS = ("authorization violation", "authentication expired", "authentication revoked")
KEEPALIVE = {"allow_reconnect": True, "reconnect_time_wait": 0.5, "ping_interval": 10, "max_outstanding_pings": 3}


class ConnectionSettingsError(ValueError):
    """Connection settings that cannot work (a missing file, a creds file without a JWT, TLS half-configured)."""


class NatsConnectError(RuntimeError):
    """A first connection that failed for a reason retrying cannot fix; the message names it, without secrets."""


class PlaintextServerError(nats.errors.Error):
    """TLS was asked for, but the server does not offer it: refused before any credential is sent."""

    def __str__(self) -> str:
        return "nats: the server does not offer TLS, but TLS settings were given: refusing to connect in plaintext"


class TlsRequiredClient(NATS):
    """nats-py's client, refusing to send CONNECT (which carries the credentials) over a connection without TLS."""

    def _connect_command(self) -> bytes:
        scheme = self._current_server.uri.scheme if self._current_server is not None else ""
        if scheme == "wss":  # TLS of the WebSocket transport, which the server's INFO does not speak of
            return super()._connect_command()
        if scheme == "ws" or not self._server_info.get("tls_required"):
            raise PlaintextServerError()
        return super()._connect_command()


def check_url_logins(url: str) -> None:
    """nats-py cannot read a password or token with `/`, `?` or `#` in a URL, and decodes no %-escapes."""
    for server in servers_of(url):
        if any(mark in split_login(server)[1] for mark in URL_ENDS):
            raise ConnectionSettingsError(
                f"nats_url {redact_url(server)}: a password or token in a URL cannot hold `/`, `?` or `#`, and"
                " %-escapes are not decoded: leave it out of the URL and give it as nats_password (--nats-password,"
                " LLMBUS_NATS_PASSWORD, with nats_user) or nats_token (--nats-token, LLMBUS_NATS_TOKEN)"
            )


def servers_want_tls(servers: list[str], tls: object = None) -> bool:
    """A TLS context given, or a `tls://` server URL: then a server without TLS is refused."""
    return tls is not None or any(server.strip().lower().startswith("tls://") for server in servers)


def wants_tls(config: Config) -> bool:
    """TLS settings given, or a `tls://` server URL: then a server without TLS is refused."""
    if config.nats_tls_ca or config.nats_tls_cert or config.nats_tls_key:
        return True
    return servers_want_tls(servers_of(config.nats_url))


def tls_context(config: Config) -> ssl.SSLContext | None:
    """A client TLS context when any TLS setting is given: the CA to trust, and a client certificate for mTLS."""
    if not (config.nats_tls_ca or config.nats_tls_cert or config.nats_tls_key):
        return None
    if bool(config.nats_tls_cert) != bool(config.nats_tls_key):
        raise ConnectionSettingsError("mutual TLS needs both nats_tls_cert and nats_tls_key")
    for setting in ("nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
        if (path := getattr(config, setting)) is not None:
            _check_readable(path, setting)
    try:
        context = ssl.create_default_context(cafile=config.nats_tls_ca)
        if config.nats_tls_cert:
            context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionSettingsError(f"cannot load the NATS TLS files: {exc.__class__.__name__}: {exc}") from None
    return context


def _check_readable(path: str, setting: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConnectionSettingsError(f"{setting}: cannot read {path}: {exc.strerror}") from None


def check_creds_file(path: str) -> None:
    """nats-py loops forever on a creds file without a user JWT block, so check it first."""
    text = _check_readable(path, "nats_creds")
    if CREDS_JWT not in text or CREDS_SEED not in text:
        raise ConnectionSettingsError(
            f"{path} is not a NATS credentials file: it needs a BEGIN NATS USER JWT block and a BEGIN USER NKEY SEED"
            " block (`nsc generate creds` writes one)"
        )


def check_seed_file(path: str) -> None:
    """The file must hold one user nkey seed (`SU...`), as `nk -gen user` writes it."""
    text = _check_readable(path, "nats_nkey_seed")
    if not any(line.strip().startswith("SU") for line in text.splitlines()):
        raise ConnectionSettingsError(f"{path} holds no NATS user nkey seed (a line starting with SU)")


def check_settings(config: Config) -> None:
    """Settings that cannot work together, named before anything connects."""
    logins = [name for name in ("nats_creds", "nats_nkey_seed", "nats_token") if getattr(config, name)]
    if config.nats_user or config.nats_password:
        logins.append("nats_user/nats_password")
    if len(logins) > 1:
        raise ConnectionSettingsError(f"choose one way to log in to NATS, not {' and '.join(logins)}")
    if bool(config.nats_user) != bool(config.nats_password):
        missing = "nats_password" if config.nats_user else "nats_user"
        raise ConnectionSettingsError(f"a NATS user and password go together: {missing} is missing")
    if config.nats_inbox_prefix is not None and not SUBJECT.fullmatch(config.nats_inbox_prefix):
        raise ConnectionSettingsError(
            f"invalid nats_inbox_prefix {config.nats_inbox_prefix!r}: use dotted tokens of A-Z a-z 0-9 _ -,"
            " such as _INBOX.alice"
        )
    if not servers_of(config.nats_url):
        raise ConnectionSettingsError("nats_url names no server")
    check_url_logins(config.nats_url)


def nats_options(config: Config) -> dict[str, Any]:
    """The nats-py `connect()` keyword arguments for the connection settings of `config` (no callbacks)."""
    check_settings(config)
    options: dict[str, Any] = {"servers": servers_of(config.nats_url)}
    if config.nats_creds:
        check_creds_file(config.nats_creds)
        options["user_credentials"] = config.nats_creds
    if config.nats_nkey_seed:
        check_seed_file(config.nats_nkey_seed)
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


def is_permanent(exc: BaseException) -> bool:
    """A connection failure that the same settings will meet again: retrying cannot help."""
    if isinstance(exc, PlaintextServerError | ssl.SSLError):
        return True
    text = str(exc).lower()
    return isinstance(exc, nats.errors.Error) and any(reason in text for reason in PERMANENT_SERVER_ERRORS)


def refused_plaintext(exc: BaseException) -> bool:
    return isinstance(exc, PlaintextServerError)


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's TLS certificate does not verify against nats_tls_ca ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}): check the client certificate and the CA"
    return str(exc).removeprefix("nats: ").strip("'")


async def connect(
    config: Config,
    name: str,
    *,
    reconnect_forever: bool = True,
    connect_timeout: float = 5.0,
    on_error: ErrorCallback | None = None,
) -> NATS:
    """A NATS connection for one llmbus part. With `reconnect_forever` (workers, the bridge) it rides out server
    restarts; subscriptions come back by themselves and publishes wait in nats-py's reconnect buffer meanwhile.
    Raises ConnectionSettingsError for settings that cannot work, NatsConnectError for a refused first login."""
    options = nats_options(config)
    connected: list[NATS] = []  # the connection, once the first connect succeeded

    async def disconnected_cb() -> None:
        if connected and not (connected[0].is_closed or connected[0].is_draining):
            log.warning("%s: disconnected from NATS; reconnecting", name)

    async def reconnected_cb() -> None:
        log.warning("%s: reconnected to NATS at %s", name, connected_to(connected[0]))

    options |= KEEPALIVE | {
        "max_reconnect_attempts": -1 if reconnect_forever else 3,
        "connect_timeout": connect_timeout,
    }
    callbacks = {"disconnected_cb": disconnected_cb, "reconnected_cb": reconnected_cb}
    nc = await open_connection(
        options.pop("servers"), name, secure=wants_tls(config), on_error=on_error, **options, **callbacks
    )
    connected.append(nc)
    return nc


async def open_connection(
    servers: list[str],
    name: str,
    *,
    secure: bool,
    fatal: Callable[[BaseException], bool] = is_permanent,
    on_error: ErrorCallback | None = None,
    **options: Any,
) -> NATS:
    """nats-py's `connect(servers=..., **options)` on a client that, when `secure`, refuses a server without TLS
    before any credential is sent. A first connect failing for a `fatal` reason ends at once (`NatsConnectError`)
    instead of being retried; every other error goes to `on_error` (default: one log line without secrets)."""
    nc = TlsRequiredClient() if secure else NATS()
    connected_once = False
    where = redact_urls(",".join(servers))

    async def error_cb(exc: Exception) -> None:
        if not connected_once and fatal(exc):
            raise NatsConnectError(f"cannot connect to NATS at {where} as {name}: {describe_failure(exc)}")
        if on_error is not None:
            await on_error(exc)
        else:
            log.warning("NATS connection (%s): %s", name, describe_failure(exc))

    try:
        await nc.connect(servers=servers, name=name, error_cb=error_cb, **options)
    except BaseException:
        await _abandon(nc)
        raise
    connected_once = True
    return nc


async def _abandon(nc: NATS) -> None:
    """Drop a connection whose first connect failed, without a flush or a reconnect."""
    transport = nc._transport
    if transport is not None:
        transport.close()
    nc._status = NATS.CLOSED


def connected_to(nc: NATS) -> str:
    """Where `nc` is connected, for logs and /healthz: scheme, host and port only."""
    url = nc.connected_url
    if url is None:
        return "?"
    host = url.hostname or "?"
    return f"{url.scheme}://{host}:{url.port}" if url.port else f"{url.scheme}://{host}"


async def flushed(nc: NATS, timeout: float = 10) -> None:
    """Return once the server has processed every command `nc` queued so far: its subscriptions (SUB) included.

    nats.py's `flush()` alone does not promise that: `subscribe` and `publish` only queue their command for the
    connection's flusher task, while `flush()` writes its PING to the socket at once, ahead of what is still queued.
    Its PONG then proves nothing about a subscription made just before (a worker told the test it served while the
    server had not seen its SUB yet: a request sent at once got a no-responders 503, over TLS, where the server reads
    each write as its own record). The flusher writes the queued commands while the first PING is answered, so the
    second PING follows them, and its PONG comes after the server processed them."""
    await nc.flush(timeout)
    await nc.flush(timeout)
