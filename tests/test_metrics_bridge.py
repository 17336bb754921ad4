"""The bridge's `GET /metrics`: HTTP requests by route and status, latency, in-flight, and bus errors by code
(a real bridge on a real nats-server where no worker runs, and one with a worker that never answers)."""

from __future__ import annotations

import asyncio

import httpx

from helpers.bridge import API_KEY, Bridge, silent_responder
from helpers.scrape import Scrape, scrape
from llmbus.nats_server import NatsServer

IN_FLIGHT = "llmbus_http_requests_in_flight"


async def metrics_of(bridge: Bridge) -> Scrape:
    return await scrape(bridge.url + "/metrics")


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def test_requests_by_route_and_status_and_bus_errors_by_code(
    lonely_bridge: Bridge, lonely_http: httpx.AsyncClient
) -> None:
    before = await metrics_of(lonely_bridge)
    no_worker = await lonely_http.post("/chat", json={"chat_id": "a", "user_prompt": "hi"})
    assert no_worker.status_code == 503
    invalid = await lonely_http.post("/chat", content=b"{not json")
    assert invalid.status_code == 400
    assert (await lonely_http.get("/no/such/page")).status_code == 404
    assert (await lonely_http.get("/v1/models/some-model")).status_code in (404, 503)
    await lonely_http.request("PROPFIND", "/chat")  # a method the HTTP parser knows and the bridge does not serve
    after = await metrics_of(lonely_bridge)

    requests = "llmbus_http_requests_total"
    assert grew(before, after, requests, method="POST", route="/chat", status="503") == 1
    assert grew(before, after, requests, method="POST", route="/chat", status="400") == 1
    assert grew(before, after, requests, method="GET", route="unmatched", status="404") == 1
    assert grew(before, after, requests, route="/v1/models/{model}") == 1  # the template, not the path
    assert grew(before, after, requests, method="other") == 1
    assert grew(before, after, requests, method="GET", route="/metrics", status="200") == 1  # the first scrape
    assert grew(before, after, "llmbus_http_request_duration_seconds_count", method="POST", route="/chat") == 2
    assert grew(before, after, "llmbus_bus_errors_total", code="503") == 1  # the invalid body never reached the bus
    assert grew(before, after, "llmbus_bus_errors_total") == 1
    assert "some-model" not in after.text and "/no/such/page" not in after.text


async def test_in_flight_counts_a_request_a_worker_holds(lonely_bridge: Bridge, lonely_nats: NatsServer) -> None:
    async with silent_responder(lonely_nats.url, "llm.chat"), lonely_bridge.client() as http:
        before = await metrics_of(lonely_bridge)
        assert before.value(IN_FLIGHT) == 1  # the scrape itself
        hung = asyncio.create_task(http.post("/chat", json={"chat_id": "h", "user_prompt": "hi", "timeout": 3}))
        for _ in range(200):  # until the bridge holds the request (bounded: 10 s)
            if (await metrics_of(lonely_bridge)).value(IN_FLIGHT) == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the held request never showed as in flight")
        assert (await hung).status_code == 504
        after = await metrics_of(lonely_bridge)
    assert after.value(IN_FLIGHT) == 1
    assert grew(before, after, "llmbus_bus_errors_total", code="504") == 1
    assert grew(before, after, "llmbus_http_requests_total", route="/chat", status="504") == 1


async def test_metrics_need_no_api_key_and_show_none(keyed_bridge: Bridge) -> None:
    """Like the health endpoints, /metrics is open: it holds counts, never prompts or keys."""
    async with keyed_bridge.client() as http:
        assert (await http.post("/chat", json={"chat_id": "k", "user_prompt": "Hi"})).status_code == 401
        metrics = await http.get("/metrics")
    assert metrics.status_code == 200 and API_KEY not in metrics.text
    assert 'route="/chat",status="401"' in metrics.text
