"""`BusClient.connect` (the README's way for a Python client) never logs in over plaintext when TLS is asked for
(a `tls` context or a `tls://` URL): nats-py alone would, silently, to a server that offers no TLS, and send the
password in the clear. Against a real nats-server without TLS, and a real one with mutual TLS."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus_gateway.client import BusClient
from helpers.nats_auth import SecureServer
from llmbus.connection import NatsConnectError, tls_context
from llmbus.nats_server import NatsServer, write_config

PASSWORD = "s3cret-plain"


@pytest.fixture
def plaintext_server(tmp_path: Path) -> Iterator[NatsServer]:
    """No TLS at all; one user, so that a login that got through would connect."""
    users = [{"user": "alice", "password": PASSWORD}]
    with NatsServer(config_file=write_config(tmp_path / "nats.conf", {"authorization": {"users": users}})) as server:
        yield server


@pytest.mark.parametrize("scheme", ["tls", "nats"])
async def test_a_tls_context_never_logs_in_to_a_plaintext_server(plaintext_server: NatsServer, scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{plaintext_server.port}"
    login = {"user": "alice", "password": PASSWORD}
    with pytest.raises(NatsConnectError) as refused:
        await asyncio.wait_for(BusClient.connect(url, tls=ssl.create_default_context(), **login), 10)  # not retried
    assert "does not offer TLS" in str(refused.value) and PASSWORD not in str(refused.value)
    if scheme == "nats":  # without TLS asked for, the same login connects: the refusal is TLS's, not the login's
        client = await BusClient.connect(url, **login)
        assert client.connected
        await client.close()


async def test_a_tls_url_reaches_a_tls_server_and_never_a_plaintext_one(
    plaintext_server: NatsServer, secure_bus: SecureServer
) -> None:
    with pytest.raises(NatsConnectError, match="does not offer TLS"):
        url = f"tls://127.0.0.1:{plaintext_server.port}"
        await asyncio.wait_for(BusClient.connect(url, user="alice", password=PASSWORD), 10)
    config = secure_bus.config("alice")
    login = {"user": config.nats_user, "password": config.nats_password, "inbox_prefix": config.nats_inbox_prefix}
    client = await BusClient.connect(config.nats_url, tls=tls_context(config), **login)
    try:
        assert client.connected and client.nc._server_info.get("tls_required") is True
    finally:
        await client.close()
