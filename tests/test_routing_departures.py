"""A worker leaving the bus says so on `llm.worker.left`: its peers look at the bus again before forwarding another
request for its model. Without it, a request on `llm.chat` for a model whose last worker had just left was forwarded
to a subject nobody served, and NATS dropped it without a no-responders status: the client waited out its timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import msgspec
from nats.aio.client import Client as NATS

from helpers.security_fixtures import SecureServer
from helpers.tiny_model import tiny_model
from inference_worker.routing import Forward
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.connection import connect
from llmbus.nats_server import NatsServer
from schemas import ChatRequest, Subjects, WorkerLeft
from schemas.subjects import ERROR_CODE

NEVER_STALE = 3600.0  # a view of the bus that does not expire during the test: only a departure can refresh it


def ask(chat_id: str, model: str) -> bytes:
    return msgspec.json.encode(ChatRequest(chat_id=chat_id, user_prompt="hi", max_tokens=2, model=model))


@asynccontextmanager
async def worker(config: Config, name: str) -> AsyncIterator[Worker]:
    """An in-process worker of the tiny model named `name` (the test reaches its directory and its drain)."""
    config = replace(config, served_model_name=name, max_tokens_cap=8, threads=1)
    running = Worker(config, await connect(config, f"test-{name}"), tiny_model())
    running.directory.ttl = NEVER_STALE
    await running.start()
    try:
        yield running
    finally:
        if not running.draining:
            await running.close()
        await running.nc.close()


def departures_heard(worker: Worker) -> tuple[list[str], asyncio.Event]:
    """The models `worker` heard leave, and an event set at each."""
    heard: list[str] = []
    event = asyncio.Event()
    forget: Callable[[str], None] = worker.directory.forget

    def recorded(model: str) -> None:
        forget(model)
        heard.append(model)
        event.set()

    worker.departures.on_left = recorded  # type: ignore[union-attr]
    return heard, event


def plain(server: NatsServer) -> Config:
    return Config(nats_url=server.url, compile=False)


async def test_a_request_for_a_model_whose_last_worker_left_is_a_404_at_once(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """alpha knows beta (a view that would not expire for an hour); beta drains. A request naming beta on llm.chat
    reaches alpha, the only worker left, which forwarded it to beta's empty subject before: now it is a 404."""
    async with worker(plain(fresh_nats_server), "alpha") as alpha, worker(plain(fresh_nats_server), "beta") as beta:
        assert await alpha.directory.route("beta") == Forward("beta")
        heard, left = departures_heard(alpha)
        await beta.drain(60)
        await asyncio.wait_for(left.wait(), 30)
        assert heard == ["beta"]
        answer = await fresh_nc.request("llm.chat", ask("late", "beta"), timeout=30)
    assert (answer.headers or {}).get(ERROR_CODE) == "404"
    assert "alpha" in json.loads(answer.data)["error"]  # the models still on the bus


async def test_a_model_with_workers_left_is_still_forwarded_after_one_leaves(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    config = plain(fresh_nats_server)
    async with worker(config, "alpha") as alpha, worker(config, "beta") as first, worker(config, "beta"):
        assert await alpha.directory.route("beta") == Forward("beta")
        heard, left = departures_heard(alpha)
        await first.drain(60)
        await asyncio.wait_for(left.wait(), 30)
        assert heard == ["beta"] and await alpha.directory.route("beta") == Forward("beta")
        answers = [await fresh_nc.request("llm.chat", ask(f"{i}", "beta"), timeout=60) for i in range(4)]
    assert {json.loads(a.data).get("model") for a in answers} == {"beta"}


async def test_a_worker_ignores_undecodable_departures_and_its_own(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    async with worker(plain(fresh_nats_server), "alpha") as alpha:
        heard, left = departures_heard(alpha)
        subject = Subjects().worker_left
        await fresh_nc.publish(subject, b"{not json")
        await fresh_nc.publish(subject, msgspec.json.encode(WorkerLeft(model="alpha", id=alpha.service.id)))
        await fresh_nc.publish(subject, msgspec.json.encode(WorkerLeft(model="gamma", id="another")))
        await asyncio.wait_for(left.wait(), 30)
        assert heard == ["gamma"]
        answer = await fresh_nc.request("llm.chat", ask("still", "alpha"), timeout=60)
    assert json.loads(answer.data)["model"] == "alpha"


async def test_the_worker_role_may_announce_and_hear_departures(secure_bus: SecureServer) -> None:
    """Under the grants `llmbus nats-permissions --role worker` prints (TLS, a password login): without them the
    server would refuse the announcement, or never deliver it."""
    config = secure_bus.config("tiny-worker", subject_prefix="tiny", compile=False)
    async with worker(config, "alpha") as alpha, worker(config, "beta") as beta:
        heard, left = departures_heard(alpha)
        await beta.drain(60)
        await asyncio.wait_for(left.wait(), 30)
    assert heard == ["beta"]
