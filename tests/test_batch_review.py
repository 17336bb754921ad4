"""Two defects a review found in batches: a batch its client cancelled during a drain was answered 503
shutting_down (a durable one ran again elsewhere) instead of 499 cancelled; and a batch whose every query failed
was answered with the default error of their common code (`not_found`, `shutting_down`) instead of their error
(`model_not_found`, `overloaded`), so the OpenAI layer gave a 503 server_error where it gives a 429."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from bus_gateway.bus_errors import BusError
from helpers.observability import HoldWatch
from helpers.tiny_model import tiny_model
from helpers.workers import endpoints_drained, tiny_worker
from inference_worker.batches import BatchCoordinator
from inference_worker.worker import Worker
from llmbus.nats_server import NatsServer
from schemas import Batch, ChatRequest, WireError
from schemas.errors import error_headers, error_spec
from schemas.subjects import ERROR_CODE, ERROR_NAME, REPLY_TO, REQUEST_ID

pytestmark = pytest.mark.timeout(300)

LONG = 2000  # tokens, within the context window (2048): the engine pauses after a step (`paused_after_a_step`)


async def test_a_batch_cancelled_during_a_drain_is_answered_499(fresh_nats_server: NatsServer, fresh_nc: NATS) -> None:
    """The batch's query is generating when the drain begins (the worker stops accepting, the batch still runs);
    then its client cancels it. It was answered 503 shutting_down ("retry"), as if the worker had stopped it."""
    never_ends = tiny_model(eos_token_ids=frozenset(), max_context=LONG + 512)
    async with tiny_worker(fresh_nats_server.url, never_ends, max_tokens_cap=LONG, drain_timeout=60) as worker:
        holds, drained, go_on = HoldWatch(worker), endpoints_drained(worker), paused_after_a_step(worker)
        try:
            inbox = fresh_nc.new_inbox()
            answers = await fresh_nc.subscribe(inbox)
            body = json.dumps({"queries": [{"chat_id": "long", "user_prompt": "Tell a story.", "max_tokens": LONG}]})
            await fresh_nc.publish("llm.chat.batched", body.encode(), reply=inbox, headers={REQUEST_ID: "batch-1"})
            await holds.holding.wait()  # its query is in the engine
            draining = asyncio.create_task(worker.drain(60))
            await drained.wait()
            assert not worker.accepting and worker.batches
            await fresh_nc.publish("llm.cancel.batch-1", b"", headers={REPLY_TO: inbox})
            answer = await answers.next_msg(timeout=60)
        finally:
            go_on.set()  # the engine goes on, so that the worker can stop whatever happened
        await draining
    assert answer.headers[ERROR_CODE] == "499" and answer.headers[ERROR_NAME] == "cancelled", answer.headers
    assert not worker.cancelled_batches  # the record of its cancel went with the batch


def paused_after_a_step(worker: Worker) -> threading.Event:
    """The worker's engine stops after its first step with a sequence running, until the event is set: the batch's
    query cannot finish before the test cancels it, however fast the tiny model generates (it once did, after other
    tests in the same process). The cancel's 499 comes from the batch's task, on the event loop, engine or not."""
    go_on, engine = threading.Event(), worker._thread.engine
    step = engine.step

    def paused_step(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        if engine.num_running:
            go_on.wait(timeout=120)
        return result

    engine.step = paused_step  # type: ignore[method-assign]
    return go_on


async def test_a_batch_of_unknown_models_fails_model_not_found(fresh_nats_server: NatsServer, fresh_nc: NATS) -> None:
    async with tiny_worker(fresh_nats_server.url):
        queries = [{"chat_id": name, "user_prompt": "hi", "max_tokens": 2, "model": "nope"} for name in ("a", "b")]
        reply = await fresh_nc.request("llm.chat.batched", json.dumps({"queries": queries}).encode(), timeout=60)
    assert reply.headers[ERROR_CODE] == "404" and reply.headers[ERROR_NAME] == "model_not_found", reply.headers
    responses = json.loads(reply.data)["responses"]
    assert [r["code"] for r in responses] == [404, 404]
    assert all(r["error"].endswith("is not served on this bus; models on the bus: tiny") for r in responses), responses


class Refusing:
    """A bus client whose every chat fails with the next of `names` (all 503s), and never waits to retry."""

    def __init__(self, names: list[str]) -> None:
        self.names = iter(names)

    async def chat(self, query: ChatRequest, timeout: float, **_: Any) -> None:
        raise BusError(503, "no", name=next(self.names))

    def backoff_delay(self, attempt: int) -> float:
        return 60.0  # past every query's deadline: no retry


class Answers:
    """A replier that keeps the error it was answered with."""

    def __init__(self) -> None:
        self.errors: list[WireError] = []

    async def respond_error(self, error: WireError, data: bytes = b"", headers: Any = None) -> None:
        self.errors.append(error)


async def served(model: str) -> bool:
    return True


@pytest.mark.parametrize(
    ("names", "header", "openai_status"),
    [
        (["overloaded", "overloaded"], "overloaded", 429),  # was shutting_down: a 503 server_error, not a 429
        (["overloaded", "no_responders"], "shutting_down", 503),  # no shared name: the default for 503, as before
    ],
)
async def test_a_batch_whose_queries_all_failed_alike_carries_their_error(
    names: list[str], header: str, openai_status: int
) -> None:
    coordinator = BatchCoordinator(Refusing(names), 60.0, served, lambda: "tiny")  # type: ignore[arg-type]
    queries = [ChatRequest(chat_id=f"q{i}", user_prompt="hi", model="m", timeout=5.0) for i in range(2)]
    answers = Answers()
    assert await coordinator.answer(answers, "application/json", Batch(queries), "b", None) == 503  # type: ignore[arg-type]
    [failure] = answers.errors
    assert error_headers(failure.code, failure.message, failure.name or None)[ERROR_NAME] == header
    assert error_spec(failure.code, failure.name or None).openai_status == openai_status
