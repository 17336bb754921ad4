"""A worker answers only on reply subjects under its reply prefixes (`--reply-prefixes`, default `_INBOX.`).

A worker's `allow_responses` lets it publish to whatever reply subject a request names, and a client may name any:
`$JS.API.STREAM.DELETE.LLM_JOBS` made a durable worker delete the jobs stream with a stream's final empty sentinel.
Here a real nats-server (mutual TLS) gives each user the grants `llmbus nats-permissions` prints, and a client
`alice` (client grants, no JetStream rights) names that subject as the reply of chats, batches and `$SRV` requests:
nothing is published there, the stream stays, and the requests that follow, from inboxes, are answered. Each test
awaits an answer sent after the forged request on the same subject (one subscription's messages are handled in
order), then checks with a flush that nothing reached the forged reply subject.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from bus_gateway.client import BusClient
from helpers.nats_auth import RoleUser, SecureServer, TlsFiles, users_server
from helpers.tiny_model import tiny_model
from helpers.workers import RunningWorker, start_worker
from inference_worker.reply_gate import ReplyGate, reply_allowed
from inference_worker.worker import check_own_inbox
from llmbus.config import Config
from llmbus.connection import connect, flushed
from llmbus.nats_server import NatsServer
from schemas import SERVICE_NAME, ChatRequest
from schemas.subjects import JOBS_STREAM, Subjects

DELETE_JOBS = f"$JS.API.STREAM.DELETE.{JOBS_STREAM}"
USERS = [
    RoleUser("worker", "worker", durable=True, inbox_prefix="_INBOX.worker"),
    RoleUser("alice", "client", inbox_prefix="_INBOX.alice"),
    RoleUser("admin"),  # no permissions block: watches the forged subject, reads the stream and $SRV.STATS
]
LIMITS = {"max_batch_size": 8, "max_seq_len": 256, "max_tokens_cap": 16}


@pytest.fixture(scope="module")
def guarded_bus(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[SecureServer]:
    server = users_server(tmp_path_factory.mktemp("reply-bus"), tls_files, USERS, [])
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def durable_worker(guarded_bus: SecureServer) -> AsyncIterator[RunningWorker]:
    """The worker of the review: --durable, with the generated worker grants (its answers never end early)."""
    config = guarded_bus.config("worker", durable=True, default_model=True, **LIMITS)
    running = await start_worker(config, tiny_model(eos_token_ids=frozenset()))
    yield running
    await running.shutdown()


@asynccontextmanager
async def logged_in(server: SecureServer, user: str) -> AsyncIterator[NATS]:
    nc = await connect(server.config(user), f"test-{user}")
    try:
        yield nc
    finally:
        await nc.drain()


async def worker_stats(nc: NATS) -> dict[str, Any]:
    reply = await nc.request(f"$SRV.STATS.{SERVICE_NAME}", b"", timeout=10)
    return json.loads(reply.data)


def chat_body(chat_id: str, max_tokens: int, stream: bool) -> bytes:
    return json.dumps({"chat_id": chat_id, "user_prompt": "hi", "max_tokens": max_tokens, "stream": stream}).encode()


async def nothing_reached(watcher: NATS, sub: Any) -> bool:
    """After a flush (a PING/PONG round trip), nothing the server routed to `sub` is still on its way."""
    await flushed(watcher)
    return sub.pending_msgs == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_a_chat_whose_reply_subject_deletes_the_jobs_stream_is_dropped(
    guarded_bus: SecureServer, durable_worker: RunningWorker, stream: bool
) -> None:
    async with logged_in(guarded_bus, "admin") as admin, logged_in(guarded_bus, "alice") as alice:
        watch = await admin.subscribe(DELETE_JOBS)
        await flushed(admin)
        refused = (await worker_stats(admin))["endpoints"][0]["data"]["refused_replies"]
        await alice.publish("llm.chat", chat_body("forged", 1, stream), reply=DELETE_JOBS)
        answer = await BusClient(alice).chat(ChatRequest(chat_id="real", user_prompt="hi", max_tokens=8), timeout=60)
        assert answer.chat_id == "real" and answer.usage.completion_tokens == 8  # a client's inbox is answered
        assert await nothing_reached(admin, watch), "the worker published to the forged reply subject"
        assert (await admin.jetstream().stream_info(JOBS_STREAM)).config.name == JOBS_STREAM
        stats = await worker_stats(admin)
        chat = next(e for e in stats["endpoints"] if e["name"] == "chat")
        assert chat["data"]["refused_replies"] == refused + 1
        assert chat["num_errors"] >= 1 and chat["last_error"].startswith("403:")


async def test_a_batch_whose_reply_subject_is_not_an_inbox_is_dropped_and_batches_still_work(
    guarded_bus: SecureServer, durable_worker: RunningWorker
) -> None:
    """A batch's queries go to the workers with the worker's own inbox (`_INBOX.worker`) as their reply subject."""
    async with logged_in(guarded_bus, "admin") as admin, logged_in(guarded_bus, "alice") as alice:
        watch = await admin.subscribe(DELETE_JOBS)
        await flushed(admin)
        forged = {"queries": [{"chat_id": "f", "user_prompt": "hi", "max_tokens": 1}]}
        await alice.publish("llm.chat.batched", json.dumps(forged).encode(), reply=DELETE_JOBS)
        queries = [ChatRequest(chat_id=f"q{i}", user_prompt="hi", max_tokens=8) for i in range(2)]
        batch = await BusClient(alice).chat_batched(queries, timeout=60)
        assert [r.chat_id for r in batch.responses] == ["q0", "q1"]
        assert await nothing_reached(admin, watch), "the worker published to the forged reply subject"
        assert (await admin.jetstream().stream_info(JOBS_STREAM)).config.name == JOBS_STREAM


@pytest.mark.parametrize("verb", ["PING", "INFO", "STATS"])
async def test_discovery_answers_only_inboxes(
    guarded_bus: SecureServer, durable_worker: RunningWorker, verb: str
) -> None:
    subject = f"$SRV.{verb}.{SERVICE_NAME}"
    async with logged_in(guarded_bus, "admin") as admin:
        sender = admin
        async with logged_in(guarded_bus, "alice") as alice:
            if verb != "STATS":  # a client may ask PING and INFO; STATS only the gateway (here: the admin)
                sender = alice
            watch = await admin.subscribe(DELETE_JOBS)
            await flushed(admin)
            await sender.publish(subject, b"", reply=DELETE_JOBS)
            answer = await sender.request(subject, b"", timeout=10)  # same subscription: handled after the forged one
            assert json.loads(answer.data)["name"] == SERVICE_NAME
            assert await nothing_reached(admin, watch), "the worker answered a $SRV request on a foreign subject"
        assert (await admin.jetstream().stream_info(JOBS_STREAM)).config.name == JOBS_STREAM


async def test_reply_prefixes_admit_a_custom_inbox_prefix_and_nothing_else(nats_server: NatsServer) -> None:
    """A client with a custom inbox prefix is answered once the workers list it in --reply-prefixes; a client
    whose inbox is under none of them is not."""
    config = Config(nats_url=nats_server.url, subject_prefix="rp", reply_prefixes=["_INBOX.", "app.inbox."], **LIMITS)
    running = await start_worker(config, tiny_model())
    carol = await nats.connect(nats_server.url, inbox_prefix="app.inbox.carol")
    dave = await nats.connect(nats_server.url, inbox_prefix="other.dave")
    try:
        unanswered = await dave.subscribe(dave.new_inbox())
        await flushed(dave)
        await dave.publish("rp.chat", chat_body("dave", 2, False), reply=unanswered.subject)
        await flushed(dave)
        answer = await BusClient(carol, Subjects("rp")).chat(ChatRequest(chat_id="carol", user_prompt="hi"), 60)
        assert answer.chat_id == "carol"
        assert await nothing_reached(dave, unanswered), "a reply subject under no reply prefix was answered"
    finally:
        await carol.close()
        await dave.close()
        await running.shutdown()


# --- the rule itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "allowed"),
    [
        ("_INBOX.abc", True),
        ("_INBOX.alice.x7.req-1", True),
        ("$JS.API.STREAM.DELETE.LLM_JOBS", False),
        ("llm.chat", False),
        ("_INBOX.*", False),
        ("_INBOX.>", False),
        ("_INBOX.a*b", False),
        ("_INBOX.a b", False),
        ("_INBOX.a\tb", False),
        ("_INBOX..x", False),
        ("_INBOX.x.", False),
        ("_INBOXES.x", False),
        ("_INBOX." + "x" * 300, False),
        ("", False),
    ],
)
def test_a_reply_subject_is_a_literal_subject_under_a_reply_prefix(reply: str, allowed: bool) -> None:
    assert reply_allowed(reply, ("_INBOX.",)) is allowed


def test_refusals_are_counted_and_logged_sanitized_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    gate = ReplyGate(("_INBOX.",), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="llmbus.micro"):
        for _ in range(50):
            assert not gate.allows("$JS.API.STREAM.DELETE.X\nINFO forged line", "a request on llm.chat")
        now[0] += ReplyGate.LOG_EVERY_S
        assert not gate.allows("llm.chat", "a request on llm.chat")
        assert gate.allows("_INBOX.ok", "a request on llm.chat")
    assert gate.refused == 51
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "$JS.API.STREAM.DELETE.X INFO forged line" in lines[0]
    assert "49 more refused since the last warning" in lines[1]


def test_a_worker_whose_own_inbox_is_under_no_reply_prefix_does_not_start() -> None:
    check_own_inbox(Config())
    check_own_inbox(Config(nats_inbox_prefix="_INBOX.worker"))
    check_own_inbox(Config(nats_inbox_prefix="app.w", reply_prefixes=["_INBOX.", "app."]))
    with pytest.raises(ValueError, match=r"inbox prefix app\.w is not under --reply-prefixes"):
        check_own_inbox(Config(nats_inbox_prefix="app.w"))
