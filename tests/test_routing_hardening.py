"""Routing on a shared bus, hardened: a request that names no model reaches the default even when its INFO reply
is slow; two model names never share a subject token through the hashed form; a drain serves a request that was
waiting for its route; and many names nobody serves cost one thorough look at the bus, not one each."""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus_gateway.client import BusClient
from bus_gateway.discovery import DISCOVERY_SETTLE, DISCOVERY_WINDOW, BusModels
from helpers.faults import HeldLook
from helpers.workers import endpoints_drained, tiny_worker
from inference_worker import routing
from inference_worker.routing import Forward, Local, ModelDirectory
from inference_worker.worker import Worker
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import SERVICE_NAME, ChatRequest
from schemas.subjects import ERROR_CODE, MODEL_TOKEN_PATTERN, model_token

HASHED = "Qwen/Qwen2.5-0.5B-Instruct"
LOOKALIKE = "Qwen_Qwen2_5-0_5B-Instruct-4b05be1d"  # a plain name spelled as HASHED's token


def ask(chat_id: str, model: str | None = None) -> bytes:
    return msgspec.json.encode(ChatRequest(chat_id=chat_id, user_prompt="hi", max_tokens=2, model=model))


def worker_on(server: NatsServer, **options: object) -> AbstractAsyncContextManager[Worker]:
    """An in-process worker of the tiny model (the test reaches its directory and its drain)."""
    return tiny_worker(server.url, max_tokens_cap=8, **options)


class CountedLooks:
    """Counts a worker's looks at the bus (`ModelDirectory.gather`), thorough and quick."""

    def __init__(self, directory: ModelDirectory) -> None:
        self.thorough = self.quick = 0
        self._look = directory.gather
        directory.gather = self._counted

    async def _counted(self, thorough: bool) -> BusModels:
        if thorough:
            self.thorough += 1
        else:
            self.quick += 1
        return await self._look(thorough)


# --- a request that names no model, and a default whose INFO reply is late ---------------------------------------


async def test_the_only_model_is_taken_only_after_a_thorough_look() -> None:
    """A quick look saw no model but this worker's (the default's reply came after it stopped): a request that names
    no model is not served here on that view; the thorough look finds the default, and the request goes there."""
    slow_default = BusModels({"alpha": 1, "beta": 1}, {"alpha"})
    looks: list[bool] = []

    async def gather(thorough: bool) -> BusModels:
        looks.append(thorough)
        return slow_default if thorough else BusModels({"beta": 1})

    directory = ModelDirectory(gather, "beta", own_is_default=False)
    await directory.refresh()  # a routine quick look
    assert directory.known_route(None) is None  # "beta is the only model" is not trusted from it
    assert await directory.route(None) == Forward("alpha") and looks == [False, True]
    assert directory.known_route(None) == Forward("alpha")

    alone = ModelDirectory(lambda thorough: asyncio.sleep(0, BusModels({"beta": 1})), "beta", own_is_default=False)
    assert await alone.route(None) == Local()  # a thorough look saw no other model: beta is the only one
    assert alone.known_route(None) == Local()


async def test_a_worker_alone_on_the_bus_trusts_quick_looks_for_a_while_after_a_thorough_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a thorough look saw this worker's model alone and no default, quick looks that see the same are
    trusted for TRUST_QUICK_S: a lone worker does not stall its model-less requests on a full look every TTL."""
    looks: list[bool] = []

    async def gather(thorough: bool) -> BusModels:
        looks.append(thorough)
        return BusModels({"beta": 1})

    alone = ModelDirectory(gather, "beta", own_is_default=False, min_refresh=0.0)
    assert await alone.route(None) == Local() and looks == [True]
    await alone.refresh()  # the next routine look, a quick one
    assert alone.known_route(None) == Local() and looks == [True, False]
    monkeypatch.setattr(routing, "TRUST_QUICK_S", 0.0)
    assert alone.known_route(None) is None  # trusted no longer: the next request looks thoroughly again
    assert await alone.route(None) == Local() and looks == [True, False, True]


async def stand_in_default(nc: NATS, model: str, info_delay: float) -> None:
    """A worker of `model`, run with --default-model, whose `$SRV.INFO` reply comes `info_delay` s late (across a
    gateway, or from a busy event loop); it answers chats on its model's subject with its name."""

    async def info(msg: Msg) -> None:
        await asyncio.sleep(info_delay)
        metadata = {"model": model, "default_model": "true", "subject_prefix": "llm", "durable": "false"}
        await msg.respond(json.dumps({"name": SERVICE_NAME, "id": "STANDIN", "metadata": metadata}).encode())

    async def chat(msg: Msg) -> None:
        request = json.loads(msg.data)
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        answer = {"chat_id": request["chat_id"], "response": "x", "finish_reason": "stop", "usage": usage}
        await msg.respond(json.dumps({**answer, "model": model}).encode())

    await nc.subscribe(f"$SRV.INFO.{SERVICE_NAME}", cb=info)
    await nc.subscribe(f"llm.model.{model_token(model)}.chat", queue="llm-workers", cb=chat)
    await flushed(nc)


async def test_a_request_naming_no_model_reaches_a_default_whose_info_reply_is_late(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """`alpha` is the default and answers INFO after a quick look stopped waiting (its settle) but within the
    discovery window. `beta` used to see only itself, take itself for the only model, and answer for 5 s."""
    late = DISCOVERY_SETTLE + (DISCOVERY_WINDOW - DISCOVERY_SETTLE) / 3  # nearer the settle: the window has room
    side = await nats.connect(fresh_nats_server.url)
    try:
        await stand_in_default(side, "alpha", late)
        async with worker_on(fresh_nats_server, served_model_name="beta"):
            replies = [await fresh_nc.request("llm.chat", ask(f"c{i}"), timeout=60) for i in range(4)]
        assert [json.loads(r.data).get("model") for r in replies] == ["alpha"] * 4
    finally:
        await side.close()


# --- subject tokens ----------------------------------------------------------------------------------------------


def test_a_plain_name_spelled_as_a_hashed_token_gets_a_token_of_its_own() -> None:
    assert model_token(HASHED) == LOOKALIKE  # hashed tokens are unchanged
    lookalike = model_token(LOOKALIKE)
    assert lookalike != model_token(HASHED) and lookalike.startswith(f"{LOOKALIKE}-")
    assert MODEL_TOKEN_PATTERN.fullmatch(lookalike)
    for plain in ("SmolLM2-135M-Instruct", "alpha", "a" * 64, "model-DEADBEEF", "model-4b05be1"):
        assert model_token(plain) == plain  # plain names keep their token


async def test_two_workers_whose_names_once_shared_a_token_each_answer_their_own(
    fresh_nats_server: NatsServer,
) -> None:
    async with (
        worker_on(fresh_nats_server, served_model_name=HASHED),
        worker_on(fresh_nats_server, served_model_name=LOOKALIKE),
        await BusClient.connect(fresh_nats_server.url) as bus,
    ):
        for name in (HASHED, LOOKALIKE):
            subject = bus.subjects.model_chat(name)
            replies = [await bus.nc.request(subject, ask(f"{i}"), timeout=60) for i in range(12)]
            assert {json.loads(r.data).get("model") for r in replies} == {name}, subject


# --- a drain, and a request waiting for its route ----------------------------------------------------------------


async def test_a_drain_serves_a_request_that_was_waiting_for_its_route(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """Delivered on llm.chat before the drain, it waits for a thorough look at the bus (held here); the drain begins
    and stops accepting meanwhile. It was refused 503 shutting_down once routed; drain() serves what it was given."""
    async with worker_on(fresh_nats_server, drain_timeout=60) as worker:
        look, drained = HeldLook(worker), endpoints_drained(worker)
        waiting = asyncio.create_task(fresh_nc.request("llm.chat", ask("routed"), timeout=60))
        await look.looking.wait()
        draining = asyncio.create_task(worker.drain(60))
        await drained.wait()
        assert not worker.accepting and worker.routing
        look.release.set()
        answer = await waiting
        await draining
    assert ERROR_CODE not in (answer.headers or {}) and json.loads(answer.data)["chat_id"] == "routed"


# --- one thorough look for many unknown names --------------------------------------------------------------------


async def test_a_batch_naming_20_unknown_models_takes_one_thorough_look(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    async with worker_on(fresh_nats_server) as worker:
        looks = CountedLooks(worker.directory)
        queries = [ChatRequest(chat_id=f"q{i}", user_prompt="hi", max_tokens=2, model=f"nope-{i}") for i in range(20)]
        body = msgspec.json.encode({"queries": queries})
        reply = await fresh_nc.request("llm.chat.batched", body, timeout=60)
    assert {r["code"] for r in json.loads(reply.data)["responses"]} == {404}
    assert looks.thorough == 1 and looks.quick <= 1, (looks.thorough, looks.quick)


def counted_routes(directory: ModelDirectory, wanted: int) -> asyncio.Event:
    """Set once `wanted` requests began waiting for their route."""
    began, route, calls = asyncio.Event(), directory.route, [0]

    async def counted(requested: str | None) -> object:
        calls[0] += 1
        if calls[0] == wanted:
            began.set()
        return await route(requested)

    directory.route = counted  # type: ignore[method-assign]
    return began


async def test_requests_waiting_for_a_look_at_once_share_it(fresh_nats_server: NatsServer, fresh_nc: NATS) -> None:
    """10 requests naming models nobody serves, all waiting while a thorough look runs (held until all 10 wait):
    that one look answers them all, where each took its own, one after another under the directory's lock."""
    async with worker_on(fresh_nats_server) as worker:
        look = HeldLook(worker)
        looks, began = CountedLooks(worker.directory), counted_routes(worker.directory, 10)
        calls = [fresh_nc.request("llm.chat", ask(f"u{i}", model=f"typo-{i}"), timeout=60) for i in range(10)]
        replies = asyncio.gather(*calls)
        await began.wait()
        look.release.set()
        codes = {r.headers[ERROR_CODE] for r in await replies}
    assert codes == {"404"} and looks.thorough == 1, looks.thorough
