"""Admission from the waiting queue (issue 11): tenants take turns, lower priority first within a tenant, and aging so
that nothing starves. Checked in admissions and engine steps, never in seconds."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import nats
import pytest

from bus_gateway.auth import tenant_of_key
from bus_gateway.client import BusClient
from helpers.bridge import running_bridge
from helpers.tiny_model import chat_prompt, tiny_model
from helpers.workers import start_worker
from inference_worker.admission import WaitingQueue
from inference_worker.engine import EngineConfig, LLMEngine, TokenDelta
from inference_worker.model_loader import LoadedModel
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence
from llmbus.config import Config
from llmbus.nats_server import NatsServer


def seq(request_id: str, tenant: str = "", priority: int = 0) -> Sequence:
    return Sequence(request_id, [1, 2, 3], SamplingParams(max_tokens=2), tenant=tenant, priority=priority)


def drain(queue: WaitingQueue) -> list[str]:
    return [queue.popleft().request_id for _ in range(len(queue))]


def test_tenants_take_turns_whatever_the_order_of_arrival() -> None:
    queue = WaitingQueue()
    for i in range(5):
        queue.append(seq(f"a{i}", "a"))
    queue.append(seq("b0", "b"))
    queue.append(seq("c0", "c"))
    assert drain(queue) == ["a0", "b0", "c0", "a1", "a2", "a3", "a4"]


def test_lower_priority_goes_first_within_a_tenant_and_ties_keep_arrival_order() -> None:
    queue = WaitingQueue()
    for request_id, priority in [("low", 5), ("mid-1", 0), ("high", -3), ("mid-2", 0)]:
        queue.append(seq(request_id, priority=priority))
    assert drain(queue) == ["high", "mid-1", "mid-2", "low"]


def test_aging_lets_a_low_priority_request_through_a_stream_of_urgent_ones() -> None:
    queue = WaitingQueue(aging=4)
    queue.append(seq("patient", priority=2))
    admitted = []
    for i in range(40):  # a new urgent request arrives before each admission
        queue.append(seq(f"urgent-{i}", priority=0))
        admitted.append(queue.popleft().request_id)
        if admitted[-1] == "patient":
            break
    # priority 2 against 0: two steps of aging, 4 admissions each, and it goes ahead of the newest urgent request
    assert admitted[-1] == "patient" and len(admitted) == 9


def test_counts_by_tenant_and_priority_follow_the_queue() -> None:
    queue = WaitingQueue()
    first = seq("a0", "a", 1)
    queue.append(first)
    queue.append(seq("a1", "a", 0))
    queue.append(seq("b0", "b", 1))
    assert dict(queue.by_tenant) == {"a": 2, "b": 1} and dict(queue.by_priority) == {1: 2, 0: 1}
    queue.remove(first)
    queue.popleft()
    assert dict(queue.by_tenant) == {"b": 1} and dict(queue.by_priority) == {1: 1} and len(queue) == 1


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model()


def test_a_flood_from_one_tenant_does_not_hold_back_another_tenant(tiny: LoadedModel) -> None:
    """Tenant A floods 200 requests, then tenant B sends one: B is admitted at the next admission round and gets
    its first token while most of A's backlog still waits."""
    engine = LLMEngine(tiny, EngineConfig(max_batch_size=8, prefill_budget=4096, prefix_cache=False))
    prompt = chat_prompt(tiny, "Tell me something.")
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    for i in range(200):
        engine.add_request(Sequence(f"a{i}", list(prompt), params, stream=True, tenant="a"))
    engine.step(lambda events: None)  # A fills the batch
    engine.add_request(Sequence("b", list(prompt), params, stream=True, tenant="b"))
    steps = 0
    first_token_of_b = False
    while not first_token_of_b:
        events: list = []
        engine.step(events.extend)
        steps += 1
        first_token_of_b = any(isinstance(e, TokenDelta) and e.request_id == "b" for e in events)
    a_waiting = sum(1 for s in engine.scheduler.waiting if s.tenant == "a")
    assert a_waiting > 150, a_waiting
    assert steps <= 17  # B waits only for one of A's rows to free (16 tokens), then it is the next admitted


async def test_the_bridge_tags_each_api_key_as_a_tenant_and_stats_count_the_waiting(
    nats_server: NatsServer,
) -> None:
    """The engine holds its first prefill until four requests wait (max_wait_ms): the three sent first sit in the
    waiting queue, and STATS counts them by tenant (one per API key, named from a hash of the key) and priority."""
    config = Config(nats_url=nats_server.url, subject_prefix="tenants", max_batch_size=4, max_wait_ms=600_000)
    worker = await start_worker(config, tiny_model())
    keys = ["sk-tenant-a", "sk-tenant-b"]
    try:
        async with running_bridge(replace(config, api_keys=keys)) as bridge, bridge.client() as http:

            def post(key: str, chat_id: str, priority: int = 0) -> asyncio.Future:
                body = {"chat_id": chat_id, "user_prompt": "Hi", "max_tokens": 2, "priority": priority}
                return asyncio.ensure_future(http.post("/chat", json=body, headers={"Authorization": f"Bearer {key}"}))

            calls = [post(keys[0], "a1"), post(keys[1], "b1", priority=3), post(keys[0], "a2", priority=-2)]
            data = await wait_for_figure(nats_server, "waiting", 3)
            assert data["waiting_by_tenant"] == {tenant_of_key(keys[0]): 2, tenant_of_key(keys[1]): 1}
            assert data["waiting_by_priority"] == {"-2": 1, "0": 1, "3": 1}
            calls.append(post(keys[1], "b2"))  # the fourth: the engine starts
            answers = await asyncio.gather(*calls)
            assert [a.status_code for a in answers] == [200, 200, 200, 200]
    finally:
        await worker.shutdown()


async def wait_for_figure(server: NatsServer, name: str, value: int) -> dict:
    nc = await nats.connect(server.url)
    try:
        while True:  # a bounded poll of state we cannot subscribe to (the test's timeout bounds it)
            for stats in await BusClient(nc).stats(1.0):
                data = stats["endpoints"][0]["data"]
                if stats["metadata"].get("subject_prefix") == "tenants" and data[name] == value:
                    return data
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def test_a_keys_tenant_is_stable_and_no_fast_hash_of_the_key() -> None:
    """Bus headers and `$SRV.STATS` show the tenant: a plain SHA-256 of the key made it a fast test of guesses."""
    import hashlib

    tenant = tenant_of_key("short")
    assert tenant == tenant_of_key("short") != tenant_of_key("shorT")  # the same on every bridge, one per key
    assert tenant.removeprefix("key-") not in hashlib.sha256(b"short").hexdigest()
    assert len(tenant) == len("key-") + 12 and "short" not in tenant
