"""A worker leaving the bus says so on `llm.worker.left`: its peers look at the bus again before forwarding another
request for its model. Without it, a request on `llm.chat` for a model whose last worker had just left was forwarded
to a subject nobody served, and NATS dropped it without a no-responders status: the client waited out its timeout.

Anyone who may publish on `llm.worker.left` can claim departures: a departure of a model the view does not list
costs no look, one of a listed model makes only that model look again, and never more than once per `min_refresh`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS

from bus_gateway.discovery import BusModels
from helpers.security_fixtures import SecureServer
from helpers.workers import model_worker
from inference_worker.routing import Forward, Local
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer
from schemas import ChatRequest, Subjects, WireError, WorkerLeft
from schemas.subjects import ERROR_CODE


def ask(chat_id: str, model: str) -> bytes:
    return msgspec.json.encode(ChatRequest(chat_id=chat_id, user_prompt="hi", max_tokens=2, model=model))


def departures_heard(worker: Worker, count: int = 1) -> tuple[list[str], asyncio.Event]:
    """The models `worker` heard leave, and an event set once it heard `count` (and at each after)."""
    heard: list[str] = []
    event = asyncio.Event()
    forget: Callable[[str], None] = worker.directory.forget

    def recorded(model: str) -> None:
        forget(model)
        heard.append(model)
        if len(heard) >= count:
            event.set()

    worker.departures.on_left = recorded  # type: ignore[union-attr]
    return heard, event


def plain(server: NatsServer) -> Config:
    return Config(nats_url=server.url, compile=False)


class Looks:
    """A worker's looks at the bus (`ModelDirectory.gather`): when each began and ended. With `hold`, the next look
    waits for `release` once it has gathered (`gathered` is set then): it saw the bus as it was before the test went
    on."""

    def __init__(self, worker: Worker, hold: bool = False) -> None:
        self.spans: list[tuple[float, float]] = []
        self.hold = hold
        self.gathered, self.release = asyncio.Event(), asyncio.Event()
        self._look = worker.directory.gather
        worker.directory.gather = self._counted

    async def _counted(self, thorough: bool) -> BusModels:
        began = time.monotonic()
        models = await self._look(thorough)
        if self.hold:
            self.hold = False
            self.gathered.set()
            await self.release.wait()
        self.spans.append((began, time.monotonic()))
        return models


async def depart(nc: NATS, departures: list[WorkerLeft]) -> None:
    for left in departures:
        await nc.publish(Subjects().worker_left, msgspec.json.encode(left))
    await flushed(nc)


def strangers(round_: int, count: int = 10) -> list[WorkerLeft]:
    """Departures nobody announced: models no worker serves, under ids no worker has."""
    return [WorkerLeft(model="x", id="y"), *(WorkerLeft(model=f"x{round_}-{i}", id=f"y{i}") for i in range(count))]


async def test_a_request_for_a_model_whose_last_worker_left_is_a_404_at_once(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """alpha knows beta (a view that would not expire for an hour); beta drains. A request naming beta on llm.chat
    reaches alpha, the only worker left, which forwarded it to beta's empty subject before: now it is a 404."""
    async with (
        model_worker(plain(fresh_nats_server), "alpha") as alpha,
        model_worker(plain(fresh_nats_server), "beta") as beta,
    ):
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
    async with (
        model_worker(config, "alpha") as alpha,
        model_worker(config, "beta") as first,
        model_worker(config, "beta"),
    ):
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
    async with model_worker(plain(fresh_nats_server), "alpha") as alpha:
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
    async with model_worker(config, "alpha") as alpha, model_worker(config, "beta") as beta:
        heard, left = departures_heard(alpha)
        await beta.drain(60)
        await asyncio.wait_for(left.wait(), 30)
    assert heard == ["beta"]


# --- departures claimed by anyone who may publish on llm.worker.left ---------------------------------------------


async def test_a_flood_of_departures_of_models_not_on_the_bus_costs_no_look(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """A loop publishing departures of models alpha's view does not list, between alpha's requests: each request
    took a look at the bus first (a `$SRV.INFO` to every worker), one after another; now none does."""
    async with model_worker(plain(fresh_nats_server), "alpha") as alpha, model_worker(plain(fresh_nats_server), "beta"):
        assert await alpha.directory.route("beta") == Forward("beta")
        looks = Looks(alpha)
        for round_ in range(20):
            _, flooded = departures_heard(alpha, 11)
            await depart(fresh_nc, strangers(round_))
            await asyncio.wait_for(flooded.wait(), 30)
            assert await alpha.directory.route("beta") == Forward("beta")
            assert await alpha.directory.route("alpha") == Local()
        answer = await fresh_nc.request("llm.chat", ask("after", "beta"), timeout=60)
    assert json.loads(answer.data)["model"] == "beta"
    assert looks.spans == [], len(looks.spans)


async def test_departures_of_models_not_on_the_bus_heard_during_a_look_cost_no_other(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """A flood heard while a look is under way: the look may find a model the view did not list, but it found none
    new (beta was listed), so the next request is routed on it, where it took another look."""
    async with model_worker(plain(fresh_nats_server), "alpha") as alpha, model_worker(plain(fresh_nats_server), "beta"):
        assert await alpha.directory.route("beta") == Forward("beta")
        looks = Looks(alpha, hold=True)
        looking = asyncio.create_task(alpha.directory.refresh(thorough=True))
        await asyncio.wait_for(looks.gathered.wait(), 30)
        _, flooded = departures_heard(alpha, 11)
        await depart(fresh_nc, strangers(0))
        await asyncio.wait_for(flooded.wait(), 30)
        looks.release.set()
        await looking
        assert await alpha.directory.route("beta") == Forward("beta")
    assert len(looks.spans) == 1, looks.spans


async def test_departures_of_workers_a_model_does_not_have_look_at_most_once_per_min_refresh(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """Departures that name beta (on the bus) under ids no worker has: beta's requests look at the bus again, but
    no sooner than `min_refresh` after the last look ended, where each took one at once; beta is still
    forwarded."""
    async with model_worker(plain(fresh_nats_server), "alpha") as alpha, model_worker(plain(fresh_nats_server), "beta"):
        assert await alpha.directory.route("beta") == Forward("beta")
        looks = Looks(alpha)
        for i in range(5):
            heard, left = departures_heard(alpha)
            await depart(fresh_nc, [WorkerLeft(model="beta", id=f"nobody-{i}")])
            await asyncio.wait_for(left.wait(), 30)
            assert heard == ["beta"] and await alpha.directory.route("beta") == Forward("beta")
    assert len(looks.spans) == 5, looks.spans
    gaps = [began - ended for (_, ended), (began, _) in zip(looks.spans, looks.spans[1:], strict=False)]
    assert min(gaps) >= alpha.directory.min_refresh - 0.01, gaps


async def test_a_departure_of_one_model_costs_no_look_for_another(fresh_nats_server: NatsServer) -> None:
    """gamma's last worker leaves: a request for beta is forwarded on the view held, a request for gamma looks at
    the bus and is a 404."""
    config = plain(fresh_nats_server)
    async with (
        model_worker(config, "alpha") as alpha,
        model_worker(config, "beta"),
        model_worker(config, "gamma") as gamma,
    ):
        assert await alpha.directory.route("beta") == Forward("beta")
        assert await alpha.directory.route("gamma") == Forward("gamma")
        looks = Looks(alpha)
        heard, left = departures_heard(alpha)
        await gamma.drain(60)
        await asyncio.wait_for(left.wait(), 30)
        assert heard == ["gamma"]
        assert await alpha.directory.route("beta") == Forward("beta")
        assert looks.spans == []
        where = await alpha.directory.route("gamma")
    assert isinstance(where, WireError) and where.name == "model_not_found" and looks.spans


async def test_a_model_a_look_found_as_its_last_worker_left_is_looked_at_again(
    fresh_nats_server: NatsServer,
) -> None:
    """alpha's view does not list beta yet; a look under way finds beta's worker, which leaves before the look
    ends: beta's departure counts (the look may have seen it), and the next request for beta is a 404."""
    async with (
        model_worker(plain(fresh_nats_server), "alpha") as alpha,
        model_worker(plain(fresh_nats_server), "beta") as beta,
    ):
        looks = Looks(alpha, hold=True)
        looking = asyncio.create_task(alpha.directory.refresh())
        await asyncio.wait_for(looks.gathered.wait(), 30)
        heard, left = departures_heard(alpha)
        await beta.drain(60)
        await asyncio.wait_for(left.wait(), 30)
        looks.release.set()
        await looking
        assert heard == ["beta"] and "beta" in alpha.directory.models.workers
        where = await alpha.directory.route("beta")
    assert isinstance(where, WireError) and where.name == "model_not_found", where
