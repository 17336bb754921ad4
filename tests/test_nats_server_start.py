"""Starting the embedded nats-server: it is ready when its own log says it listens, never because something else
answers on its port. Two pytest processes start hundreds of servers on ports picked by `free_port`, and `llmbus up`
picks one too: between the pick and nats-server's bind another process can take the port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import nats
import pytest

from llmbus import nats_server
from llmbus.nats_server import NatsServer, NatsServerError


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something else listens on (accepting connections, as another server would)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_port_taken_after_the_check_is_an_error_not_a_server(held_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check said free (the race), and the port accepts connections: polling it, the start used to succeed and
    hand out a URL to whatever held it."""
    monkeypatch.setattr(nats_server, "port_is_free", lambda port, host="127.0.0.1": True)
    server = NatsServer(port=held_port, jetstream=False)
    with pytest.raises(NatsServerError, match="address already in use"):
        server.start()
    assert server.proc is None


async def test_a_picked_port_taken_before_the_bind_is_picked_again(
    held_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = iter([held_port])
    free_port = nats_server.free_port
    monkeypatch.setattr(nats_server, "free_port", lambda host="127.0.0.1": next(picks, 0) or free_port(host))
    with NatsServer(jetstream=False) as server:
        assert server.port != held_port
        nc = await nats.connect(server.url)
        try:
            assert nc.connected_server_version.major >= 2
            sub = await nc.subscribe("ping")
            await nc.publish("ping", b"mine")
            assert (await sub.next_msg(timeout=10)).data == b"mine"
        finally:
            await nc.close()
