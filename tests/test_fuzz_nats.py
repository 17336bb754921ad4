"""Bad input at the NATS endpoints (hypothesis): random bytes, random JSON, wrong types, huge strings, invalid UTF-8,
deep nesting and huge batches at `<prefix>.chat` and `<prefix>.chat.batched`, as JSON and MessagePack.

Every case gets a reply: an error with a 4xx `Nats-Service-Error-Code` and a description, or a valid answer when the
input happens to be valid. Meanwhile a canary client keeps asking "What is the capital of France?" and must get a
correct, complete answer every time (it shares decode batches with the fuzz traffic, so its bf16 text may differ in
the last digits of its logits from a solo run: the test checks that the answer is right, not that it is bit-equal),
and the worker is still up at the end. The limits have their own errors naming them.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus_gateway.client import BusClient, BusError, with_deadline
from bus_gateway.jobs import JobClient
from helpers.faults import FaultFigures, chat, engine_data, gather_stats
from helpers.workers import RunningWorker, start_worker
from inference_worker.model_loader import LoadedModel, load_model
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import BatchResponse, ChatChunk, ChatResponse, Subjects, content_type
from schemas.subjects import CONTENT_TYPE, ERROR, ERROR_CODE, JSON, MSGPACK, REQUEST_ID

PREFIX = "fz"
SUBJECTS = Subjects(PREFIX)
MAX_TOKENS_CAP = 8
MAX_BATCH_QUERIES = 8
CONTEXT_WINDOW = 256
REPLY_TIMEOUT_S = 90.0
FUZZ_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def smollm_f32() -> LoadedModel:
    """float32, so that a request's greedy answer is the same whether or not it shares a batch with the fuzz."""
    return load_model(dtype="float32")


@pytest.fixture(scope="module")
async def fuzz_worker(nats_server: NatsServer, smollm_f32: LoadedModel) -> AsyncIterator[RunningWorker]:
    config = Config(
        nats_url=nats_server.url,
        subject_prefix=PREFIX,
        queue_group="fuzz-workers",
        max_tokens_cap=MAX_TOKENS_CAP,
        max_batch_queries=MAX_BATCH_QUERIES,
        max_seq_len=CONTEXT_WINDOW,
        max_batch_size=16,
        compile=False,  # a second SmolLM2 decoder (float32) would compile in the background during the fuzz
    )
    running = await start_worker(config, smollm_f32)
    yield running
    await running.shutdown()


@pytest.fixture
async def fuzz_nc(nats_server: NatsServer) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


# --- strategies ------------------------------------------------------------------------------------------------

printable_ascii = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=140)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40) | st.just("")
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": st.text(max_size=30)}
    ),
    max_size=4,
)
# Each field: plausible values (some valid, some just out of range) or any JSON value (a wrong type).
chat_fields = {
    "chat_id": st.text(max_size=300),
    "user_prompt": st.text(max_size=120),
    "system_prompt": st.text(max_size=40),
    "messages": messages,
    "max_tokens": st.integers(-3, 2 * MAX_TOKENS_CAP),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-2, 60),
    "seed": st.integers(-5, 2**64),
    "stop": st.none() | st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=20),
    "stream": st.booleans(),
    "timeout": st.none() | st.floats(30, 120),
    "unknown_field": json_values,
}
any_fields = {name: values | json_values for name, values in chat_fields.items()}
likely_valid = {"chat_id": st.text(min_size=1, max_size=20), "user_prompt": st.text(min_size=1, max_size=60)}
chat_objects = st.fixed_dictionaries(
    likely_valid, optional={name: values for name, values in any_fields.items() if name not in likely_valid}
) | st.fixed_dictionaries({}, optional=any_fields)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity come out as invalid JSON tokens: more bad input


def msgpack_dumps(value: Any) -> bytes:
    return msgspec.msgpack.encode(_int64(value))


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


huge_prompt = st.integers(2_000, 400_000).map(lambda n: dumps({"chat_id": "huge", "user_prompt": "word " * (n // 5)}))
invalid_utf8 = st.binary(min_size=1, max_size=16).filter(lambda b: not _is_utf8(b))
bad_utf8_bodies = invalid_utf8.map(lambda junk: b'{"chat_id":"utf8","user_prompt":"' + junk + b'"}')
deep_chat = st.integers(50, 200_000).map(lambda depth: b'{"chat_id":"deep","user_prompt":' + nested(depth) + b"}")
deep_batch = st.integers(50, 200_000).map(lambda depth: b'{"queries":[' + nested(depth) + b"]}")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


valid_chats = st.fixed_dictionaries(
    {
        "chat_id": st.text(min_size=1, max_size=20),
        "user_prompt": st.text(min_size=1, max_size=60),
        "max_tokens": st.integers(1, MAX_TOKENS_CAP),
    },
    optional={"temperature": st.floats(0, 2), "stop": st.text(min_size=1, max_size=3), "seed": st.integers(0, 99)},
)
huge_batch = st.integers(MAX_BATCH_QUERIES + 1, 3_000).map(
    lambda n: {"queries": [{"chat_id": f"q{i}", "user_prompt": "hi", "max_tokens": 1} for i in range(n)]}
)
batch_envelopes = st.one_of(
    st.lists(chat_objects, max_size=4).map(lambda qs: {"queries": qs}),
    st.lists(json_values, max_size=4).map(lambda qs: {"queries": qs}),
    st.dictionaries(st.text(max_size=10), json_values, max_size=3),
)
MSGPACK_KINDS = {
    "msgpack: random bytes": st.binary(max_size=512),
    "msgpack: random value": json_values.map(msgpack_dumps),
    "msgpack: deep nesting": st.integers(50, 100_000).map(lambda depth: b"\x91" * depth + b"\xc0"),
}
CHAT_KINDS = {
    "random bytes": st.binary(max_size=512),
    "random JSON": json_values.map(dumps),
    "wrong types": chat_objects.map(dumps),
    "valid": valid_chats.map(dumps),
    "huge prompt": huge_prompt,
    "invalid UTF-8": bad_utf8_bodies,
    "deep nesting": deep_chat,
    "msgpack: wrong types": chat_objects.map(msgpack_dumps),
    "msgpack: valid": valid_chats.map(msgpack_dumps),
    **MSGPACK_KINDS,
}
BATCH_KINDS = {
    "random bytes": st.binary(max_size=512),
    "random JSON": json_values.map(dumps),
    "wrong types": batch_envelopes.map(dumps),
    "valid": st.lists(valid_chats, min_size=1, max_size=3).map(lambda qs: dumps({"queries": qs})),
    "huge batch": huge_batch.map(dumps),
    "invalid UTF-8": bad_utf8_bodies,
    "deep nesting": deep_batch,
    "msgpack: wrong types": batch_envelopes.map(msgpack_dumps),
    "msgpack: huge batch": huge_batch.map(msgpack_dumps),
    **MSGPACK_KINDS,
}
extra_headers = st.one_of(
    st.none(),
    st.fixed_dictionaries({REQUEST_ID: printable_ascii}),
    st.fixed_dictionaries({CONTENT_TYPE: st.sampled_from([JSON, "text/plain", "application/json; charset=utf-8"])}),
)


def _int64(value: Any) -> Any:
    """MessagePack holds 64-bit integers only: clamp bigger ones (JSON bodies keep them, as bad input)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-(2**63), min(value, 2**63 - 1))
    if isinstance(value, list):
        return [_int64(v) for v in value]
    if isinstance(value, dict):
        return {k: _int64(v) for k, v in value.items()}
    return value


@st.composite
def cases(draw: st.DrawFn, kinds: dict[str, st.SearchStrategy[bytes]]) -> tuple[str, bytes, dict[str, str] | None]:
    kind = draw(st.sampled_from(sorted(kinds)))
    body = draw(kinds[kind])
    headers = {CONTENT_TYPE: MSGPACK} if kind.startswith("msgpack") else draw(extra_headers)
    return kind, body, headers


# --- checks ------------------------------------------------------------------------------------------------------


def expired_deadline(body: bytes, headers: dict[str, str] | None) -> bool:
    """A valid request may carry a deadline so short that 504 is the right answer (timeout is user input too)."""
    try:
        decoded = msgspec.msgpack.decode(body) if content_type(headers) == MSGPACK else msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    items = decoded.get("queries") if isinstance(decoded, dict) and "queries" in decoded else [decoded]
    if not isinstance(items, list):
        return False
    return any(isinstance(i, dict) and isinstance(i.get("timeout"), int | float) and i["timeout"] < 5 for i in items)


def check_reply(subject: str, body: bytes, headers: dict[str, str] | None, reply: nats.aio.msg.Msg) -> str:
    """Assert the reply is a clear 4xx error or a valid answer; returns a label for the tally."""
    code = (reply.headers or {}).get(ERROR_CODE)
    if code is not None:
        assert code.isdigit(), code
        assert reply.headers.get(ERROR), "an error answer needs a description"
        status = int(code)
        assert 400 <= status < 500 or (status == 504 and expired_deadline(body, headers)), (
            status,
            reply.headers.get(ERROR),
            body[:300],
        )
        return code
    kind = content_type(reply.headers)
    decode = msgspec.msgpack.decode if kind == MSGPACK else msgspec.json.decode
    if subject == SUBJECTS.chat_batched:
        answer = decode(reply.data, type=BatchResponse)
        assert all(r.code is None or 400 <= r.code < 500 or r.code == 504 for r in answer.responses), answer
        return "batch answered"
    try:
        answer = decode(reply.data, type=ChatResponse)
    except msgspec.ValidationError:
        answer = decode(reply.data, type=ChatChunk)  # the first message of a stream
    assert answer.chat_id
    return "answered"


class Canary:
    """A well-behaved client asking the same question throughout: its answer must never change."""

    def __init__(self, client: BusClient) -> None:
        self.client = client
        self.answers = 0
        self.wrong: list[object] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stop.set()
        await self._task

    async def _loop(self) -> None:
        while not self._stop.is_set():
            question = chat("canary", max_tokens=MAX_TOKENS_CAP, user_prompt="What is the capital of France?")
            try:
                answer = await self.client.chat(question, timeout=REPLY_TIMEOUT_S)
            except BusError as exc:
                self.wrong.append(exc)
                continue
            self.answers += 1
            usage_adds_up = answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
            if answer.chat_id != "canary" or "Paris" not in answer.response or not usage_adds_up:
                self.wrong.append(answer)
            await asyncio.sleep(0.1)  # a steady trickle, not a flood


async def fuzz(subject: str, nc: nats.NATS, figures: FaultFigures) -> Counter[str]:
    """Run hypothesis in a thread; each example is a real request sent from this event loop."""
    loop = asyncio.get_running_loop()
    tally: Counter[str] = Counter()

    kinds = CHAT_KINDS if subject == SUBJECTS.chat else BATCH_KINDS

    @FUZZ_SETTINGS
    @given(case=cases(kinds))
    def one_case(case: tuple[str, bytes, dict[str, str] | None]) -> None:
        kind, body, headers = case
        figures.sent += 1
        send = nc.request(subject, body, headers=headers, timeout=REPLY_TIMEOUT_S)
        try:
            reply = asyncio.run_coroutine_threadsafe(send, loop).result(REPLY_TIMEOUT_S + 5)
        except nats.errors.TimeoutError:
            figures.lost += 1
            raise
        tally[f"{kind}: {check_reply(subject, body, headers, reply)}"] += 1

    await asyncio.to_thread(one_case)
    return tally


@pytest.mark.model
@pytest.mark.parametrize("subject", [SUBJECTS.chat, SUBJECTS.chat_batched])
async def test_bad_input_gets_a_clear_error_and_harms_no_one(
    subject: str, fuzz_worker: RunningWorker, fuzz_nc: nats.NATS
) -> None:
    canary = Canary(BusClient(fuzz_nc, SUBJECTS))
    await canary.start()
    figures = FaultFigures(f"fuzz_{subject.replace('.', '_')}")
    try:
        tally = await fuzz(subject, fuzz_nc, figures)
    finally:
        await canary.stop()
    assert canary.answers >= 1 and not canary.wrong, canary.wrong
    assert not fuzz_worker.task.done(), "the worker must still run"
    answer = await BusClient(fuzz_nc, SUBJECTS).chat(chat("after-fuzz", max_tokens=2), timeout=REPLY_TIMEOUT_S)
    assert answer.chat_id == "after-fuzz"
    figures.answered = sum(n for label, n in tally.items() if label.endswith("answered"))
    figures.errored = sum(n for label, n in tally.items() if label[-3:].isdigit())
    figures.notes = {"codes": dict(sorted(tally.items())), "canary_answers": canary.answers}
    figures.record()


@pytest.mark.model
async def test_each_limit_is_a_clear_error_that_names_it(fuzz_worker: RunningWorker, fuzz_nc: nats.NATS) -> None:
    client = BusClient(fuzz_nc, SUBJECTS)
    with pytest.raises(BusError) as too_long:
        await client.chat(chat("long", user_prompt="word " * 400), timeout=REPLY_TIMEOUT_S)
    assert too_long.value.name == "context_length_exceeded" and too_long.value.code == 400
    assert f"context window is {CONTEXT_WINDOW} tokens" in too_long.value.message

    with pytest.raises(BusError) as too_many_tokens:
        await client.chat(chat("greedy", max_tokens=MAX_TOKENS_CAP + 1), timeout=REPLY_TIMEOUT_S)
    assert too_many_tokens.value.code == 400 and "max_tokens_cap" in too_many_tokens.value.message

    with pytest.raises(BusError) as too_many_queries:
        queries = [chat(f"q{i}", max_tokens=1) for i in range(MAX_BATCH_QUERIES + 1)]
        await client.chat_batched(queries, timeout=REPLY_TIMEOUT_S)
    assert too_many_queries.value.code == 413 and "max_batch_queries" in too_many_queries.value.message

    reply = await fuzz_nc.request(SUBJECTS.chat, b'{"chat_id":"x","user_prompt":"\xff"}', timeout=REPLY_TIMEOUT_S)
    assert reply.headers[ERROR_CODE] == "400" and "malformed" in reply.headers[ERROR]


async def test_a_message_over_the_nats_max_payload_fails_on_the_client(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        oversized = chat("big", user_prompt="x" * (nc.max_payload + 1))
        with pytest.raises(BusError) as core:
            await BusClient(nc).chat(oversized, timeout=5)
        assert core.value.code == 413 and f"max payload of {nc.max_payload} bytes" in core.value.message
        with pytest.raises(BusError) as durable:
            await JobClient(nc).chat(oversized, timeout=5)
        assert durable.value.code == 413 and f"max payload of {nc.max_payload} bytes" in durable.value.message
    finally:
        await nc.close()


async def test_a_message_whose_headers_push_it_over_the_max_payload_fails_and_keeps_the_connection(
    nats_server: NatsServer,
) -> None:
    """nats-py checks the payload alone; nats-server counts the headers too, and drops a connection that sends more,
    after which nats-py closes it for good. A request a few bytes under the limit, which the request-id header
    pushes over, is a 413 on the client, and its connection keeps working."""
    nc = await nats.connect(nats_server.url)
    try:
        base = msgspec.json.encode(with_deadline(chat("edge", user_prompt=""), 5.0))
        edge = chat("edge", user_prompt="x" * (nc.max_payload - 8 - len(base)))
        assert len(msgspec.json.encode(with_deadline(edge, 5.0))) == nc.max_payload - 8
        for client in (BusClient(nc), JobClient(nc)):
            with pytest.raises(BusError) as too_large:
                await client.chat(edge, timeout=5.0)
            assert too_large.value.code == 413 and f"max payload of {nc.max_payload} bytes" in too_large.value.message
        await nc.flush(timeout=5)
        assert nc.is_connected
    finally:
        await nc.close()


@pytest.mark.model
async def test_a_request_nobody_waits_for_is_not_run(fuzz_worker: RunningWorker, fuzz_nc: nats.NATS) -> None:
    """Published without a reply subject (fire-and-forget): there is no one to answer, so no generation is spent."""

    async def prefills() -> int:
        stats = [s for s in await gather_stats(fuzz_nc, 1.0) if s["endpoints"][0]["subject"].startswith(f"{PREFIX}.")]
        return engine_data(stats[0])["prefill_forwards"]

    before = await prefills()
    for i in range(3):
        await fuzz_nc.publish(SUBJECTS.chat, msgspec.json.encode(chat(f"orphan-{i}", max_tokens=MAX_TOKENS_CAP)))
    answer = await BusClient(fuzz_nc, SUBJECTS).chat(chat("after-orphans", max_tokens=2), timeout=REPLY_TIMEOUT_S)
    assert answer.chat_id == "after-orphans"
    assert await prefills() == before + 1, "only the request with a reply subject was run"
