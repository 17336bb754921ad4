"""Scale-out across a 3-node nats-server cluster on loopback: a worker on node 0, a worker on node 1, the client on
node 2. The queue group spans the routes, so requests from node 2 reach both workers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats
import pytest

from bus_gateway.client import BusClient
from helpers.faults import FaultFigures, chat, engine_data, gather_stats, stats_of, wait_until
from helpers.workers import start_worker
from inference_worker.model_loader import LoadedModel
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer, free_port

REQUESTS = 12


@pytest.fixture
def cluster() -> Iterator[list[NatsServer]]:
    route_ports = [free_port() for _ in range(3)]
    routes = [f"nats://127.0.0.1:{port}" for port in route_ports]
    nodes = [
        NatsServer(
            jetstream=False,
            server_name=f"node-{i}",
            cluster_port=route_ports[i],
            cluster_routes=[route for j, route in enumerate(routes) if j != i],
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def test_a_message_crosses_the_routes(cluster: list[NatsServer]) -> None:
    """The launcher's cluster flags work with this nats-server: a request on node 2 reaches a responder on node 0."""
    responder, requester = await nats.connect(cluster[0].url), await nats.connect(cluster[2].url)
    try:

        async def echo(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("cluster.echo", cb=echo)
        await flushed(responder)

        async def answered() -> bool:
            try:
                return (await requester.request("cluster.echo", b"ping", timeout=0.5)).data == b"ping"
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                return False

        await wait_until(answered, 15, "a route between node 0 and node 2")
    finally:
        await responder.close()
        await requester.close()


@pytest.mark.model
async def test_workers_on_two_nodes_share_requests_from_a_third(cluster: list[NatsServer], smollm: LoadedModel) -> None:
    workers = [
        await start_worker(Config(nats_url=node.url, max_tokens_cap=16, max_batch_size=8), smollm)
        for node in cluster[:2]
    ]
    nc = await nats.connect(cluster[2].url)
    try:

        async def both_visible() -> bool:
            return len(await gather_stats(nc, 0.5)) == 2

        await wait_until(both_visible, 15, "both workers visible from node 2")
        client = BusClient(nc, retries=3)
        results = await asyncio.gather(
            *(client.chat(chat(f"cluster-{i}", max_tokens=4), timeout=120) for i in range(REQUESTS)),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures
        assert sorted(r.chat_id for r in results) == sorted(f"cluster-{i}" for i in range(REQUESTS))

        stats = await stats_of(nc, lambda _: True, count=2)
        finished = {s["id"]: engine_data(s)["requests_finished"] for s in stats}
        assert len(finished) == 2
        assert sum(finished.values()) == REQUESTS
        assert all(count > 0 for count in finished.values()), f"one worker took every request: {finished}"
        FaultFigures(
            "cluster_3_nodes",
            sent=REQUESTS,
            answered=len(results),
            notes={"per_worker_requests_finished": sorted(finished.values())},
        ).record()
    finally:
        await nc.close()
        for worker in workers:
            await worker.shutdown()
