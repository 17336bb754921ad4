"""How long a queue-group member whose host is lost keeps getting requests, under given nats-server ping settings.

    python scripts/lost_host.py [--ping-interval 2] [--ping-max 2] [--cap 60]

A host lost without closing its TCP connections (power cut, kernel panic, a partition) sends no FIN: nats-server
keeps its subscriptions until the connection misses `ping_max` PINGs sent every `ping_interval` (defaults: 2
minutes and 2), and meanwhile the queue group gives that member its share of the requests, which are lost. Here two
members answer one subject in a queue group; one is connected through a loopback TCP relay that is then frozen (it
stops forwarding both ways and keeps both sockets open, as a lost host does). A request is sent every 100 ms with
a 0.5 s timeout, and the script prints how many were lost and when the last loss came after the freeze.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import nats
import nats.errors

from llmbus.nats_server import NatsServer, free_port, write_config

SUBJECT = "lost.host.demo"


class FreezableRelay:
    """A TCP relay from a loopback port to the server; `freeze` stops it forwarding without closing anything."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.held: list[asyncio.StreamWriter] = []  # kept open once frozen: a collected writer would close its socket

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.held += [client_writer, server_writer]
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self.frozen.is_set():
            read = asyncio.ensure_future(reader.read(65536))
            frozen = asyncio.ensure_future(self.frozen.wait())
            done, _ = await asyncio.wait({read, frozen}, return_when=asyncio.FIRST_COMPLETED)
            if read not in done:
                read.cancel()
                return  # frozen: the sockets stay open, nothing moves
            frozen.cancel()
            data = read.result()
            if not data:
                return
            writer.write(data)
            await writer.drain()


async def member(url: str, name: str) -> nats.NATS:
    nc = await nats.connect(url, name=name, allow_reconnect=False)

    async def answer(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(name.encode())

    await nc.subscribe(SUBJECT, queue="demo", cb=answer)
    await nc.flush()
    return nc


async def measure(port: int, cap: float) -> None:
    relay = FreezableRelay(port)
    relay_port = await relay.start()
    live = await member(f"nats://127.0.0.1:{port}", "live")
    doomed = await member(f"nats://127.0.0.1:{relay_port}", "doomed")
    client = await nats.connect(f"nats://127.0.0.1:{port}")
    answered: dict[str, int] = {"live": 0, "doomed": 0}
    for _ in range(20):  # both members answer before the freeze
        answered[(await client.request(SUBJECT, b"", timeout=2)).data.decode()] += 1
    relay.frozen.set()
    frozen_at = time.monotonic()
    lost, last_lost, sent = 0, None, 0
    while time.monotonic() - frozen_at < cap:
        sent += 1
        try:
            await client.request(SUBJECT, b"", timeout=0.5)
        except nats.errors.TimeoutError:
            lost, last_lost = lost + 1, time.monotonic() - frozen_at
        if last_lost is not None and time.monotonic() - frozen_at > last_lost + 5:
            break  # five seconds without a loss: the server has dropped the frozen member
        await asyncio.sleep(0.1)
    print(f"before the freeze: {answered}")
    when = "none" if last_lost is None else f"{last_lost:.1f} s after the freeze"
    print(f"after the freeze: {sent} requests, {lost} lost, the last loss {when}")
    await client.close()
    await live.close()
    del doomed  # its connection is frozen: closing it would wait on the relay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ping-interval", type=float, default=2.0, help="nats-server ping_interval, seconds (0: its defaults)"
    )
    parser.add_argument("--ping-max", type=int, default=2, help="nats-server ping_max")
    parser.add_argument("--cap", type=float, default=60.0, help="stop after this many seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pings = {"ping_interval": f"{args.ping_interval:g}s", "ping_max": args.ping_max}
        config = write_config(Path(tmp) / "server.conf", pings if args.ping_interval > 0 else {})
        port = free_port()
        print(f"nats-server {pings if args.ping_interval > 0 else 'ping defaults (2 minutes, 2)'}")
        with NatsServer(port=port, config_file=config, jetstream=False):
            asyncio.run(measure(port, args.cap))


if __name__ == "__main__":
    main()
