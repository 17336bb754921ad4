"""Metrics end to end on the real SmolLM2: HTTP clients through the bridge, a worker with its metrics endpoint; the
worker's counters agree with the usage the clients saw, and the bridge counts what it served."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from helpers.bridge import Bridge, running_bridge, sse_json
from helpers.scrape import scrape
from helpers.workers import start_worker
from inference_worker.model_loader import LoadedModel
from llmbus.config import Config
from llmbus.nats_server import NatsServer, free_port

pytestmark = pytest.mark.model
PREFIX = "obs"


@pytest.fixture(scope="module")
async def metered_stack(nats_server: NatsServer, smollm: LoadedModel) -> AsyncIterator[tuple[Bridge, str]]:
    """A SmolLM2 worker with metrics and a bridge, both on subjects of their own (`obs.chat`)."""
    port = free_port()
    config = Config(nats_url=nats_server.url, subject_prefix=PREFIX, metrics_port=port, max_tokens_cap=64)
    worker = await start_worker(config, smollm)
    try:
        async with running_bridge(Config(nats_url=nats_server.url, subject_prefix=PREFIX)) as bridge:
            yield bridge, f"http://127.0.0.1:{port}/metrics"
    finally:
        await worker.shutdown()


async def test_worker_counters_agree_with_the_usage_http_clients_saw(
    metered_stack: tuple[Bridge, str],
) -> None:
    bridge, worker_url = metered_stack
    completions, prompts = [], []
    async with bridge.client() as http:
        for n in range(2):
            body = {"chat_id": f"c{n}", "user_prompt": f"Name {n + 2} colours.", "max_tokens": 12}
            usage = (await http.post("/chat", json=body)).json()["usage"]
            completions.append(usage["completion_tokens"])
            prompts.append(usage["prompt_tokens"])
        body = {"chat_id": "s", "user_prompt": "Count to five.", "max_tokens": 10, "stream": True}
        async with http.stream("POST", "/chat", json=body) as streamed:
            done = sse_json([line async for line in streamed.aiter_lines()])[-1]
        completions.append(done["usage"]["completion_tokens"])
        prompts.append(done["usage"]["prompt_tokens"])
        openai = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        usage = (await http.post("/v1/chat/completions", json=openai)).json()["usage"]
        completions.append(usage["completion_tokens"])
        prompts.append(usage["prompt_tokens"])
        refused = await http.post("/chat", json={"chat_id": "x", "user_prompt": "Hi", "max_tokens": 65})
        assert refused.status_code == 400  # over this worker's max_tokens_cap
        worker = await scrape(worker_url)
        served = await scrape(bridge.url + "/metrics")

    assert worker.value("llmbus_time_to_first_token_seconds_count") == 4
    assert worker.value("llmbus_generation_tokens_total") == sum(completions) > 0
    assert worker.value("llmbus_prompt_tokens_total") == sum(prompts)
    assert worker.value("llmbus_request_success_total") == 4
    assert worker.value("llmbus_request_failure_total", code="400") == 1
    assert {labels["model"] for _, labels, _ in worker.llmbus()} == {"SmolLM2-135M-Instruct"}
    assert served.value("llmbus_http_requests_total", method="POST", route="/chat", status="200") == 3
    assert served.value("llmbus_http_requests_total", route="/v1/chat/completions", status="200") == 1
    assert served.value("llmbus_http_requests_total", route="/chat", status="400") == 1
    assert served.value("llmbus_bus_errors_total", code="400") == 1
    assert served.value("llmbus_http_request_duration_seconds_count", route="/chat") == 4
