"""Many models on one bus (issue 11): a request is answered by the model it asked for, whichever subject or API it
came through; an unknown model fails fast with the list of models; the default model; batches spread over every
worker of their model, gathered in order or streamed as each query finishes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import httpx
import msgspec
import nats
import openai
import pytest

from bus_gateway.bus_errors import BusError
from bus_gateway.client import BusClient
from bus_gateway.jobs import JobClient
from helpers.bridge import Bridge, running_bridge
from helpers.faults import stats_of
from helpers.workers import RunningWorker, start_worker
from inference_worker.model_loader import LoadedModel
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import BatchDone, BatchItemDone, ChatRequest, Subjects
from schemas.subjects import model_token

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]

PREFIX = "multi"
NAMES = ("alpha", "beta/v1.5")  # the second needs the token mapping: a slash and a dot


def ask(chat_id: str, model: str | None = None, max_tokens: int = 2) -> ChatRequest:
    return ChatRequest(chat_id=chat_id, user_prompt="Say one word.", max_tokens=max_tokens, model=model)


@dataclass
class TwoModels:
    url: str
    workers: list[RunningWorker]


@pytest.fixture(scope="module")
async def two_models(smollm: LoadedModel) -> AsyncIterator[TwoModels]:
    """Two workers of `alpha` and one of `beta/v1.5`: the same weights under two names, on one durable bus."""
    with NatsServer() as server:
        base = Config(nats_url=server.url, subject_prefix=PREFIX, durable=True, max_tokens_cap=64, threads=1)
        names = ["alpha", "alpha", NAMES[1]]
        workers = [await start_worker(replace(base, served_model_name=name), smollm) for name in names]
        yield TwoModels(server.url, workers)
        for worker in workers:
            await worker.shutdown()


@pytest.fixture
async def bus(two_models: TwoModels) -> AsyncIterator[BusClient]:
    client = await BusClient.connect(two_models.url, subjects=Subjects(PREFIX))
    yield client
    await client.close()


async def test_each_request_is_answered_by_the_model_it_names(two_models: TwoModels, bus: BusClient) -> None:
    """20 requests for each name through the model-less subject: every answer comes from that name."""
    nc = bus.nc
    calls = []
    for name in NAMES:
        for i in range(20):
            body = msgspec.json.encode(ask(f"{name}-{i}", model=name))
            calls.append(nc.request(f"{PREFIX}.chat", body, timeout=300))
    replies = await asyncio.gather(*calls)
    models = [json.loads(reply.data)["model"] for reply in replies]
    assert models == [NAMES[0]] * 20 + [NAMES[1]] * 20


async def test_the_per_model_subject_works_for_raw_nats_clients(two_models: TwoModels, bus: BusClient) -> None:
    assert model_token(NAMES[1]) != NAMES[1]
    subject = f"{PREFIX}.model.{model_token(NAMES[1])}.chat"
    reply = await bus.nc.request(subject, msgspec.json.encode(ask("raw")), timeout=300)
    assert json.loads(reply.data)["model"] == NAMES[1]
    answers = await asyncio.gather(*(bus.chat(ask(f"c{i}", model=NAMES[1]), timeout=300) for i in range(5)))
    assert {a.model for a in answers} == {NAMES[1]}


async def test_an_unknown_model_fails_fast_and_names_the_models(two_models: TwoModels, bus: BusClient) -> None:
    reply = await bus.nc.request(f"{PREFIX}.chat", msgspec.json.encode(ask("x", model="gamma")), timeout=60)
    assert reply.headers["Nats-Service-Error-Code"] == "404" and reply.headers["Llmbus-Error"] == "model_not_found"
    assert "alpha" in reply.headers["Nats-Service-Error"] and NAMES[1] in reply.headers["Nats-Service-Error"]
    with pytest.raises(BusError) as caught:  # the client goes straight to gamma's subject: no responders there
        await bus.chat(ask("y", model="gamma"), timeout=60)
    assert caught.value.name == "model_not_found" and "alpha" in caught.value.message


async def test_without_a_default_a_request_that_names_no_model_is_a_clear_400(
    two_models: TwoModels, bus: BusClient
) -> None:
    with pytest.raises(BusError) as caught:
        await bus.chat(ask("which"), timeout=60)
    assert caught.value.code == 400 and "name one in `model`" in caught.value.message


async def test_a_default_model_serves_requests_that_name_none(two_models: TwoModels, smollm: LoadedModel) -> None:
    config = Config(nats_url=two_models.url, subject_prefix=PREFIX, served_model_name="gamma", default_model=True)
    gamma = await start_worker(config, smollm)
    try:
        async with await BusClient.connect(two_models.url, subjects=Subjects(PREFIX)) as bus:
            answers = await asyncio.gather(*(bus.chat(ask(f"d{i}"), timeout=300) for i in range(6)))
        assert {a.model for a in answers} == {"gamma"}
    finally:
        await gamma.shutdown()


async def test_the_openai_model_field_routes_and_models_are_listed_once_with_their_workers(
    two_models: TwoModels,
) -> None:
    async with running_bridge(Config(nats_url=two_models.url, subject_prefix=PREFIX)) as bridge:
        sdk = openai.AsyncOpenAI(base_url=f"{bridge.url}/v1", api_key="x", max_retries=0)
        listed = {m.id: m.model_extra.get("workers") for m in (await sdk.models.list()).data}
        assert listed == {"alpha": 2, NAMES[1]: 1}
        for name in NAMES:
            reply = await sdk.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
            assert reply.model == name
        with pytest.raises(openai.NotFoundError) as unknown:
            await sdk.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi"}])
        assert unknown.value.body["code"] == "model_not_found"


async def test_a_durable_job_is_answered_by_its_model(two_models: TwoModels) -> None:
    nc = await nats.connect(two_models.url)
    try:
        async with JobClient(nc, Subjects(PREFIX)) as jobs:
            direct = await jobs.chat(ask("j1", model=NAMES[1]), timeout=300)  # on beta's own job subject
            via_default = await jobs.submit(  # on the model-less job subject: forwarded to beta's job queue
                f"{PREFIX}.jobs.chat", msgspec.json.encode(ask("j2", model=NAMES[1])), timeout=300
            )
        assert direct.model == NAMES[1] and json.loads(via_default.data)["model"] == NAMES[1]
    finally:
        await nc.close()


async def test_a_batch_is_spread_over_every_worker_of_its_model(two_models: TwoModels, bus: BusClient) -> None:
    """32 queries for `alpha`, which has two workers: both serve some (each one's model_chat count rises)."""
    alpha_subject = f"{PREFIX}.model.alpha.chat"
    before = await model_chat_counts(bus, alpha_subject, workers=2)
    answer = await bus.chat_batched([ask(f"b{i}", model="alpha", max_tokens=4) for i in range(32)], timeout=300)
    assert [r.chat_id for r in answer.responses] == [f"b{i}" for i in range(32)]
    assert not answer.partial_success and {r.model for r in answer.responses} == {"alpha"}
    after = await model_chat_counts(bus, alpha_subject, workers=2)
    served = {worker: after[worker] - before.get(worker, 0) for worker in after}
    assert len(served) == 2 and all(n > 0 for n in served.values()) and sum(served.values()) == 32, served


async def test_a_streamed_batch_sends_each_result_as_it_finishes(two_models: TwoModels, bus: BusClient) -> None:
    queries = [ask(f"s{i}", model="alpha", max_tokens=2 + 6 * (i % 2)) for i in range(6)]
    queries.append(ask("bad", model="gamma"))  # no such model: its result is a 404
    messages = [m async for m in bus.stream_batch(queries, timeout=300)]
    *items, end = messages
    assert all(isinstance(m, BatchItemDone) for m in items) and isinstance(end, BatchDone)
    assert sorted(m.index for m in items) == list(range(7))
    assert (end.answered, end.failed, end.partial_success) == (6, 1, True)
    failed = next(m for m in items if m.index == 6)
    assert failed.result.code == 404


async def test_the_bridge_streams_a_batch_as_sse(two_models: TwoModels) -> None:
    async with running_bridge(Config(nats_url=two_models.url, subject_prefix=PREFIX)) as bridge:
        body = {"stream": True, "queries": [{"chat_id": f"h{i}", "user_prompt": "Hi", "max_tokens": 2, "model": "alpha"}
                                            for i in range(4)] + [{"chat_id": "bad", "user_prompt": ""}]}  # fmt: skip
        events = await sse_events(bridge, "/chat/batched", body)
    *items, end = events
    assert sorted(e["index"] for e in items) == [0, 1, 2, 3, 4]
    assert items[0]["index"] == 4 and "user_prompt" in items[0]["result"]["error"]  # the invalid one first
    assert end == {"done": True, "answered": 4, "failed": 1, "partial_success": True, "message": end["message"]}


async def sse_events(bridge: Bridge, path: str, body: dict) -> list[dict]:
    async with httpx.AsyncClient(base_url=bridge.url, timeout=300) as http, http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[5:]) async for line in r.aiter_lines() if line.startswith("data:")]


async def model_chat_counts(bus: BusClient, subject: str, workers: int) -> dict[str, int]:
    """Requests on `subject` by worker id, once all `workers` serving it answered `$SRV.STATS`."""

    def serves(stats: dict) -> bool:
        return any(endpoint["subject"] == subject for endpoint in stats["endpoints"])

    counts = {}
    for stats in await stats_of(bus.nc, serves, workers):
        for endpoint in stats["endpoints"]:
            if endpoint["subject"] == subject:
                counts[stats["id"]] = endpoint["num_requests"]
    return counts
