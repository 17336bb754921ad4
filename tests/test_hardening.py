"""Defects a close review found in the worker (issue 8), each proven fixed against a real nats-server: a cancel that
overtakes its request, a dead engine thread, user text in headers, tokenizing on the event loop, a drain that dropped
finished work, statistics that measured the handler instead of the request, and streams that stock tools can read."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading

import nats
import pytest
from nats.aio.client import Client as NATS

from bus_gateway.client import BusClient
from helpers.faults import HeldLook, poisoned_engines
from helpers.tiny_model import tiny_model
from helpers.workers import RunningWorker, start_worker
from inference_worker.model_loader import LoadedModel
from inference_worker.thread_share import fair_threads, workers_on_host
from inference_worker.worker import EngineDied, Worker, run_worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer

ERROR_CODE = "Nats-Service-Error-Code"
ERROR = "Nats-Service-Error"
pytestmark = pytest.mark.timeout(300)


async def stream_messages(sub: nats.aio.subscription.Subscription, timeout: float = 240) -> list:
    """Every message of one stream, through the empty sentinel that ends it."""
    messages = []
    while True:
        msg = await sub.next_msg(timeout=timeout)
        messages.append(msg)
        if not msg.data and not msg.headers:
            return messages


@pytest.mark.model
async def test_a_cancel_that_overtakes_its_request_drops_it(worker: RunningWorker, nc: NATS) -> None:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    before = (await BusClient(nc).stats(expect=1))[0]["endpoints"][0]["data"]["tokens_generated"]
    await nc.publish("llm.cancel.early-1", b"", headers={"Llmbus-Reply-To": inbox})
    request = {"chat_id": "early", "user_prompt": "Write a long story.", "max_tokens": 64}
    await nc.publish("llm.chat", json.dumps(request).encode(), reply=inbox, headers={"Llmbus-Request-Id": "early-1"})
    answer = await sub.next_msg(timeout=60)  # not run: a 499 that says to use a new id (a retry reusing it, too)
    assert answer.headers[ERROR_CODE] == "499" and answer.headers["Llmbus-Error"] == "cancelled"
    assert "'early-1' was cancelled in the last 60 s" in json.loads(answer.data)["error"]
    assert "new request id" in json.loads(answer.data)["error"]
    after = (await BusClient(nc).stats(expect=1))[0]["endpoints"][0]["data"]["tokens_generated"]
    assert after == before  # nothing was generated for it
    # the tombstone is used up: the same id from the same inbox is served normally now
    request["max_tokens"] = 2
    await nc.publish("llm.chat", json.dumps(request).encode(), reply=inbox, headers={"Llmbus-Request-Id": "early-1"})
    assert json.loads((await sub.next_msg(timeout=240)).data)["usage"]["completion_tokens"] == 2


@pytest.mark.model
async def test_streams_end_with_an_empty_sentinel_after_the_end_message(worker: RunningWorker, nc: NATS) -> None:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    request = {"chat_id": "sentinel", "user_prompt": "Say hi.", "max_tokens": 4, "stream": True}
    await nc.publish("llm.chat", json.dumps(request).encode(), reply=inbox)
    messages = await stream_messages(sub)
    accepted, *_, end, sentinel = messages
    assert json.loads(accepted.data) == {"chat_id": "sentinel", "delta": "", "index": 0}
    assert end.headers["Llmbus-Stream"] == "end" and json.loads(end.data)["done"] is True
    assert sentinel.data == b"" and not sentinel.headers
    bad = {"chat_id": "sentinel", "user_prompt": "Hi", "max_tokens": 100000, "stream": True}
    await nc.publish("llm.chat", json.dumps(bad).encode(), reply=inbox)
    error, sentinel = await stream_messages(sub)
    assert error.headers[ERROR_CODE] == "400" and error.headers["Llmbus-Stream"] == "end"


@pytest.mark.model
async def test_user_text_never_reaches_a_header_raw(worker: RunningWorker, nc: NATS) -> None:
    evil = "x\r\nNats-Service-Error-Code: 200\r\n" + "y" * 1_000_000
    payload = json.dumps({"chat_id": "evil", "user_prompt": "hi", evil: 1}).encode()
    msg = await nc.request("llm.chat", payload, timeout=60)
    assert msg.headers[ERROR_CODE] == "400"
    text = msg.headers["Nats-Service-Error"]
    assert "\r" not in text and "\n" not in text and len(text) <= 512 and "unknown field" in text
    assert len(msg.data) < 8192  # the body is bounded too, so the reply never exceeds the max payload
    assert json.loads(msg.data)["code"] == 400


async def test_templating_and_tokenizing_run_off_the_event_loop(nats_server: NatsServer, nc: NATS) -> None:
    threads: set[str] = set()

    class Recording(LoadedModel):
        def encode_chat_with_prefix(self, turns: list[dict[str, str]]) -> tuple[list[int], int]:
            threads.add(threading.current_thread().name)
            return super().encode_chat_with_prefix(turns)

    tiny = tiny_model()
    loaded = Recording(**{f.name: getattr(tiny, f.name) for f in dataclasses.fields(tiny)})
    running = await start_worker(Config(nats_url=nats_server.url, subject_prefix="offloop"), loaded)
    try:
        queries = [{"chat_id": f"q{i}", "user_prompt": f"Question {i}", "max_tokens": 2} for i in range(32)]
        msg = await nc.request("offloop.chat.batched", json.dumps({"queries": queries}).encode(), timeout=240)
        assert len(json.loads(msg.data)["responses"]) == 32
    finally:
        await running.shutdown()
    assert threads == {"llmbus-engine"}


async def test_a_dead_engine_fails_its_requests_leaves_the_bus_and_stops_the_worker(
    nats_server: NatsServer, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(nats_url=nats_server.url, subject_prefix="doomed", threads=1, compile=False)
    stop, ready = asyncio.Event(), asyncio.Event()
    armed = poisoned_engines(monkeypatch)
    task = asyncio.create_task(run_worker(config, stop, ready, loaded=tiny_model()))
    await asyncio.wait_for(ready.wait(), 120)
    ok = await nc.request("doomed.chat", b'{"chat_id": "ok", "user_prompt": "hi", "max_tokens": 2}', timeout=120)
    assert ERROR_CODE not in (ok.headers or {})
    armed.set()
    failed = await nc.request("doomed.chat", b'{"chat_id": "x", "user_prompt": "hi", "max_tokens": 2}', timeout=120)
    assert failed.headers[ERROR_CODE] == "500"
    with pytest.raises(EngineDied):
        await asyncio.wait_for(task, 120)  # run_worker raises, so `llmbus worker` exits non-zero
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("doomed.chat", b'{"chat_id": "y", "user_prompt": "hi"}', timeout=10)
    assert not [r for r in await BusClient(nc).ping(1.0) if r["metadata"].get("model") == "tiny"]


async def test_a_drain_publishes_finished_work_before_failing_what_is_left(nats_server: NatsServer) -> None:
    config = Config(nats_url=nats_server.url, subject_prefix="flush", drain_timeout=0.0, max_batch_size=8)
    running = await start_worker(config, tiny_model())
    nc = await nats.connect(nats_server.url)
    try:
        subs = []
        for i in range(8):
            sub = await nc.subscribe(nc.new_inbox())
            request = {"chat_id": f"f{i}", "user_prompt": "hi", "max_tokens": 1, "stream": True}
            await nc.publish("flush.chat", json.dumps(request).encode(), reply=sub.subject)
            subs.append(sub)
        for sub in subs:  # every request is in the engine
            assert json.loads((await sub.next_msg(timeout=120)).data)["index"] == 0
        await running.shutdown()  # a drain that times out at once
        finals = [(await stream_messages(sub))[-2] for sub in subs]
    finally:
        await nc.close()
    assert all(ERROR_CODE not in (msg.headers or {}) for msg in finals)
    assert all(json.loads(msg.data)["finish_reason"] == "length" for msg in finals)


async def test_stats_measure_whole_requests_and_a_draining_worker_is_not_ready(
    nats_server: NatsServer, nc: NATS
) -> None:
    config = Config(nats_url=nats_server.url, subject_prefix="measured", max_tokens_cap=64, compile=False)
    loaded = tiny_model()
    worker = Worker(config, await nats.connect(nats_server.url), loaded)
    await worker.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await nc.request("measured.chat", b'{"chat_id": "a", "user_prompt": "hi", "max_tokens": 48}', timeout=120)
        latency_ns = (loop.time() - started) * 1e9
        bad = await nc.request("measured.chat", b'{"chat_id": "b", "user_prompt": "hi", "max_tokens": 999}', timeout=60)
        assert bad.headers[ERROR_CODE] == "400"
        own = f"$SRV.STATS.llm-inference.{worker.service.id}"
        stats = json.loads((await nc.request(own, b"", timeout=10)).data)
        chat = next(e for e in stats["endpoints"] if e["name"] == "chat")
        assert chat["num_requests"] == 2 and chat["num_errors"] == 1 and chat["last_error"].startswith("400")
        # the time to the final answer of a whole 48-token request, not of a handler that only enqueued it
        assert chat["processing_time"] >= 0.5 * latency_ns
        assert chat["data"]["errors_by_code"] == {"400": 1} and chat["data"]["draining"] is False
        await worker.service.leave_discovery()  # what drain() does first
        worker.draining = True
        client = BusClient(nc)
        assert worker.service.id not in {p["id"] for p in await client.ping(1.0)}
        assert worker.service.id not in {i["id"] for i in await client.info(1.0)}
        stats = json.loads((await nc.request(own, b"", timeout=10)).data)
        assert stats["endpoints"][0]["data"]["draining"] is True
    finally:
        await worker.close()
        await worker.nc.close()


def test_a_worker_counts_itself_among_the_workers_on_its_host_even_while_draining() -> None:
    """A draining worker no longer answers PING; if it stopped counting itself it would take every core again."""
    here = {"host": "vm"}
    others = [{"id": "b", "metadata": here}, {"id": "c", "metadata": {"host": "elsewhere"}}]
    assert workers_on_host(others, "vm", own_id="a") == 2  # draining: its own reply is missing
    assert workers_on_host([{"id": "a", "metadata": here}, *others], "vm", own_id="a") == 2
    assert fair_threads(2, 2) == 1 and fair_threads(2, 3) == 1 and fair_threads(16, 3) == 5


async def test_a_request_waiting_for_a_look_at_the_bus_delays_no_other_request(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """A request naming a model nobody serves is routed only after a thorough look at the bus (the whole discovery
    window). That look runs in a task of its own, so the requests behind it on `llm.chat` are served meanwhile;
    a worker that stops before the look ends answers it 503. Here the look is held until the test lets it go (the
    worker is the default model, so the requests that name none need no look)."""
    config = Config(
        nats_url=fresh_nats_server.url, subject_prefix="looked", max_tokens_cap=8, compile=False, default_model=True
    )
    worker = Worker(config, await nats.connect(fresh_nats_server.url), tiny_model())
    await worker.start()
    look = HeldLook(worker)
    typo = b'{"chat_id": "t", "user_prompt": "hi", "model": "no-such-model", "max_tokens": 2}'
    fine = b'{"chat_id": "f", "user_prompt": "hi", "max_tokens": 2}'
    try:
        unknown = asyncio.create_task(fresh_nc.request("looked.chat", typo, timeout=120))
        await look.looking.wait()
        answered = await fresh_nc.request("looked.chat", fine, timeout=60)
        assert ERROR_CODE not in (answered.headers or {}) and json.loads(answered.data)["chat_id"] == "f"
        assert not unknown.done() and len(worker.routing) == 1
        look.release.set()
        refused = await unknown
        assert refused.headers[ERROR_CODE] == "404" and "no-such-model" in refused.headers[ERROR]

        look.release.clear()
        look.looking.clear()
        stopped_before_the_look_ended = asyncio.create_task(fresh_nc.request("looked.chat", typo, timeout=120))
        await look.looking.wait()
        await worker.close()
        answer = await stopped_before_the_look_ended
        assert answer.headers[ERROR_CODE] == "503" and not worker.routing
    finally:
        look.release.set()
        await worker.close()
        await worker.nc.close()
