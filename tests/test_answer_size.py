"""Core answers over the NATS max payload, from a review: a durable job's answer was checked against the server's
max payload, a core request's never. A chat whose answer was over it got no answer and waited out its timeout (nats-py
refused the publish after the request was counted); a batch got a retryable 500; and an answer whose payload fit but
whose headers pushed it over (a msgpack answer's Content-Type, a stream chunk's headers) made the server drop the
worker's connection. Now each gets a 413 that names the size and the limit (on a stream: the end message, then the
sentinel), counted as a 413, and the worker stays connected.

A follow-up review: a batch whose answer became that 413 while some queries succeeded, and a durable job whose answer
became a 413, were not counted as a 413 (the job counted as a success); and a worker's `$SRV.STATS` answer (several KB)
over the max payload was dropped silently (nats-py refused it), its asker waiting out its timeout. Now both count as
a 413, and STATS is answered with an ADR-32 413 error and a warning, once.

Real tiny-model workers on a real nats-server with `max_payload: 4096`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus_gateway.client import BusError
from bus_gateway.jobs import JobClient
from helpers.faults import chat
from helpers.tiny_model import tiny_model
from helpers.workers import tiny_worker
from inference_worker.model_loader import LoadedModel
from inference_worker.worker import Worker
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer, write_config
from schemas import BatchItemDone, BatchResult, ChatResponse, ErrorBody, Subjects, content_type, decode
from schemas.subjects import (
    CONTENT_TYPE,
    ERROR,
    ERROR_CODE,
    ERROR_NAME,
    MSGPACK,
    REQUEST_ID,
    STREAM,
    STREAM_CHUNK,
    STREAM_END,
    message_size,
)

pytestmark = pytest.mark.timeout(300)

LIMIT = 4096  # the server's max payload
WAIT = 300  # seconds: without a 413, a request waits this long and fails (700 tokens took over 60 s under load)
TOO_LARGE = re.compile(rf"answer of (\d+) bytes exceeds the NATS max payload of {LIMIT} bytes")
STATS_TOO_LARGE = re.compile(rf"\$SRV\.STATS {TOO_LARGE.pattern}")


@pytest.fixture(scope="module")
def never_ends() -> LoadedModel:
    return tiny_model(eos_token_ids=frozenset())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(config_file=write_config(tmp_path / "nats.conf", {"max_payload": LIMIT})) as running:
        yield running


@pytest.fixture
async def client(server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(server.url)
    yield conn
    await conn.close()


def answered_size(reply: Msg) -> int:
    """The size of the answer that a 413 went out in place of, as the 413 names it (with the limit)."""
    headers = reply.headers or {}
    assert headers.get(ERROR_CODE) == "413" and headers.get(ERROR_NAME) == "too_large", headers
    named = TOO_LARGE.fullmatch(headers[ERROR])
    assert named is not None, headers[ERROR]
    assert decode(reply.data, ErrorBody, content_type(headers)) == ErrorBody(headers[ERROR], 413)
    return int(named[1])


def invalid(chat_id: str) -> dict[str, Any]:
    """A query that fails alone (an unknown field): its error, with its chat id, is in the batch's answer."""
    return {"chat_id": chat_id, "bogus": 1}


async def counted(worker: Worker) -> tuple[dict[str, int], dict[str, Any], list[str]]:
    """Once the worker drained (its outbox published and counted every answer): its errors by code (the same in
    `errors_by_code` and `llmbus_request_failure_total`), its successes, and each endpoint error of `$SRV.STATS`
    (`last_error`, once per error)."""
    await worker.drain(WAIT)
    errors = [e.last_error for e in worker.service.endpoints for _ in range(e.num_errors)]
    summary = worker.metrics.summary()
    assert summary["request_failure_total"] == worker.outbox.errors_by_code
    return dict(worker.outbox.errors_by_code), summary["request_success_total"], errors


async def test_a_chat_whose_answer_is_over_the_max_payload_gets_a_413_at_once(
    server: NatsServer, client: NATS, never_ends: LoadedModel
) -> None:
    """nats-py refused to publish the answer (its payload alone is over), and the client waited out its timeout."""
    async with tiny_worker(server.url, never_ends, max_tokens_cap=700) as worker:
        body = msgspec.json.encode(chat("long", max_tokens=700))  # about 4.8 KB of text
        reply = await client.request(Subjects().chat, body, timeout=WAIT)
        assert answered_size(reply) > LIMIT
        errors, successes, endpoint_errors = await counted(worker)
    assert errors == {"413": 1} and successes == {}  # a 413, not a success
    assert [e.split(":")[0] for e in endpoint_errors] == ["413"]


@pytest.mark.parametrize("partial", [True, False], ids=["partial_success", "every_query_failed"])
async def test_a_batch_whose_answer_is_over_the_max_payload_gets_a_413_not_a_500(
    server: NatsServer, client: NATS, partial: bool
) -> None:
    """60 queries that fail alone (about 100 bytes of answer each), with one answered or not: the coordinator's
    publish raised, and the client got a retryable 500 internal error. Then, with one answered, the 413 counted in
    the endpoint's errors but not by code (`errors_by_code`, `llmbus_request_failure_total`): now once, either way."""
    queries: list[Any] = [invalid(f"q{i}") for i in range(60)]
    if partial:
        queries.append(chat("ok", max_tokens=1))
    async with tiny_worker(server.url) as worker:
        body = msgspec.json.encode({"queries": queries})
        reply = await client.request(Subjects().chat_batched, body, timeout=WAIT)
        assert answered_size(reply) > LIMIT
        errors, _, endpoint_errors = await counted(worker)
    assert [e.split(":")[0] for e in endpoint_errors] == ["413"]
    assert errors == {"413": 1}  # not the 400 that every query failed with, nor nothing when one succeeded


async def test_an_answer_over_the_max_payload_only_with_its_headers_leaves_the_worker_connected(
    server: NatsServer, client: NATS
) -> None:
    """A msgpack batch answer whose payload fits but whose Content-Type header pushes it over: nats-py published it,
    and the server closed the worker's connection (maximum payload violation); the client got nothing. Its size is
    set exactly from a first answer: the chat ids of the queries that fail alone are in it, once each."""

    async def ask(id_length: list[int]) -> Msg:
        queries: list[Any] = [invalid(f"{i:02d}".ljust(n, "x")) for i, n in enumerate(id_length)]
        body = msgspec.msgpack.encode({"queries": [*queries, chat("ok", max_tokens=1)]})
        return await client.request(Subjects().chat_batched, body, headers={CONTENT_TYPE: MSGPACK}, timeout=WAIT)

    async with tiny_worker(server.url) as worker:
        short = [40] * 20
        first = await ask(short)
        assert first.headers == {CONTENT_TYPE: MSGPACK} and ERROR_CODE not in first.headers
        header = message_size(first.data, first.headers) - len(first.data)
        payload = LIMIT - header // 2  # fits alone, not with its header
        grow, rest = divmod(payload - len(first.data), len(short))
        longer = [n + grow + (i < rest) for i, n in enumerate(short)]
        assert max(longer) <= 255  # each id a msgpack str8, as in the first answer

        over = await ask(longer)
        assert answered_size(over) == payload + header

        assert worker.nc.is_connected
        again = await ask(short)
        assert again.data == first.data
        errors, _, endpoint_errors = await counted(worker)
    assert [e.split(":")[0] for e in endpoint_errors] == ["413"]
    assert errors == {"413": 1}  # its other queries succeeded: it was not counted by code


async def test_a_stream_chunk_over_the_max_payload_ends_the_stream_with_a_413(
    server: NatsServer, client: NATS, never_ends: LoadedModel
) -> None:
    """A streamed batch whose second result (a long answer) fits the max payload, but not with the chunk's headers:
    the server closed the worker's connection, and the client's stream never ended. Now the 413 is the end message,
    then the sentinel, and nothing follows (the coordinator's end message and sentinel are dropped)."""
    batch_id = "b" * 100
    chunk_headers = {STREAM: STREAM_CHUNK, REQUEST_ID: batch_id}
    async with tiny_worker(server.url, never_ends, max_tokens_cap=560) as worker:
        probe = await client.request(Subjects().chat, msgspec.json.encode(chat("p", max_tokens=560)), timeout=WAIT)
        answer = msgspec.json.decode(probe.data, type=ChatResponse)

        def chunk_size(chat_id: str) -> int:
            result = BatchResult.ok(msgspec.structs.replace(answer, chat_id=chat_id))
            return len(msgspec.json.encode(BatchItemDone(index=1, result=result)))

        header = message_size(b"", chunk_headers)
        payload = LIMIT - header // 2  # the chunk fits alone, not with its headers
        chat_id = "p" * (1 + payload - chunk_size("p"))
        assert chunk_size(chat_id) == payload and len(chat_id) <= 256

        inbox = client.new_inbox()
        answers = await client.subscribe(inbox)
        queries = [invalid("bad"), chat(chat_id, max_tokens=560)]
        body = msgspec.json.encode({"queries": queries, "stream": True})
        await client.publish(Subjects().chat_batched, body, reply=inbox, headers={REQUEST_ID: batch_id})
        first = await answers.next_msg(timeout=WAIT)
        assert first.headers == chunk_headers  # the failed query's result
        end = await answers.next_msg(timeout=WAIT)
        assert answered_size(end) == payload + header
        assert end.headers[STREAM] == STREAM_END and end.headers[REQUEST_ID] == batch_id
        sentinel = await answers.next_msg(timeout=WAIT)
        assert sentinel.data == b"" and not sentinel.headers

        assert worker.nc.is_connected
        errors, _, endpoint_errors = await counted(worker)
        await worker.nc.close()  # what it published is on the server
    await flushed(client)  # and would be here by now
    assert answers.pending_msgs == 0
    assert [e.split(":")[0] for e in endpoint_errors] == ["413"]
    assert errors == {"413": 1}  # not counted by code before: the coordinator's answer was no failure


@pytest.mark.parametrize("batch", [False, True], ids=["chat", "batch"])
async def test_a_durable_job_whose_answer_is_over_the_max_payload_counts_as_a_413_not_a_success(
    server: NatsServer, client: NATS, never_ends: LoadedModel, batch: bool
) -> None:
    """`Job._final` answered the 413 in place of the answer, and the outbox counted what it replaced: a success (the
    chat), or nothing (a batch whose queries succeeded). Now a 413, once."""
    durable = tiny_worker(server.url, never_ends, durable=True, max_tokens_cap=700)
    async with durable as worker, JobClient(client) as jobs:
        with pytest.raises(BusError) as too_large:
            if batch:  # 12 answers of about 500 bytes: each query is a core chat, and fits
                await jobs.chat_batched([chat(f"q{i}", max_tokens=100) for i in range(12)], timeout=WAIT)
            else:
                await jobs.chat(chat("long", max_tokens=700), timeout=WAIT)  # about 4.8 KB of text
        assert too_large.value.code == 413 and TOO_LARGE.fullmatch(too_large.value.message)
        errors, successes, _ = await counted(worker)
    assert errors == {"413": 1}
    if batch:
        assert sum(successes.values()) == 12  # its queries, each answered on its own
    else:
        assert successes == {}  # not a success
    assert worker.jobs.snapshot()["failed"] == 1


async def test_stats_over_the_max_payload_is_answered_413_and_ping_and_info_still_answer(
    server: NatsServer, client: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's `$SRV.STATS` answer is several KB: nats-py refused to publish it, the error was swallowed, and the
    asker waited out its timeout with nothing logged. Now an ADR-32 413 error names the size and the limit (a warning
    too, once however often it is asked), PING and INFO answer as before, and the worker stays connected."""
    caplog.set_level(logging.WARNING, logger="llmbus.micro")
    async with tiny_worker(server.url) as worker:
        service = f"{worker.service.name}.{worker.service.id}"
        for _ in range(2):
            stats = await client.request(f"$SRV.STATS.{service}", b"", timeout=WAIT)
            headers = stats.headers or {}
            assert headers.get(ERROR_CODE) == "413" and headers.get(ERROR_NAME) == "too_large", headers
            named = STATS_TOO_LARGE.fullmatch(headers[ERROR])
            assert named is not None and int(named[1]) > LIMIT, headers[ERROR]
            assert stats.data == b""
        for verb in ("PING", "INFO"):
            answer = await client.request(f"$SRV.{verb}.{service}", b"", timeout=WAIT)
            assert not answer.headers and json.loads(answer.data)["id"] == worker.service.id
        assert worker.nc.is_connected
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmbus.micro" and "$SRV.STATS" in r.getMessage()]
    assert len(warnings) == 1 and named[0] in warnings[0], warnings
