"""The worker end to end: a real nats-server, the real SmolLM2 model, plain nats-py requests with hand-written JSON."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
import torch
from nats.aio.client import Client as NATS

from helpers.faults import stats_of, wait_until
from helpers.workers import RunningWorker, start_worker
from inference_worker.model_loader import LoadedModel
from llmbus.config import Config
from llmbus.nats_server import NatsServer

pytestmark = pytest.mark.model

ERROR_CODE = "Nats-Service-Error-Code"


async def ask(
    nc: NATS, payload: bytes | dict, subject: str = "llm.chat", timeout: float = 240, **kw
) -> tuple[dict, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    msg = await nc.request(subject, data, timeout=timeout, **kw)
    return (msg.headers or {}), json.loads(msg.data)


async def stats(nc: NATS, subject: str = "llm.chat", count: int = 1) -> list[dict]:
    """STATS `data` of the workers serving `subject` (micro answers once per instance), once `count` answered."""
    replies = await stats_of(nc, lambda r: r["endpoints"][0]["subject"] == subject, count)
    return [r["endpoints"][0]["data"] for r in replies]


async def test_raw_request_with_handwritten_json_answers_paris(worker: RunningWorker, nc: NATS) -> None:
    msg = await nc.request(
        "llm.chat", b'{"chat_id": "fr-1", "user_prompt": "What is the capital of France?"}', timeout=60
    )
    assert msg.headers is None or ERROR_CODE not in msg.headers
    body = json.loads(msg.data)
    assert body["chat_id"] == "fr-1"
    assert "Paris" in body["response"]
    assert body["finish_reason"] == "stop"
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


async def test_system_prompt_and_multi_turn_messages(worker: RunningWorker, nc: NATS) -> None:
    question = {"chat_id": "s", "user_prompt": "What is the capital of France?", "max_tokens": 24}
    _, default = await ask(nc, question)
    _, with_system = await ask(nc, {**question, "system_prompt": "You are a concise assistant."})
    assert "Paris" in with_system["response"]
    assert with_system["usage"]["prompt_tokens"] != default["usage"]["prompt_tokens"]
    conversation = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."},
        {"role": "user", "content": "And the capital of France?"},
    ]
    _, turns = await ask(nc, {"chat_id": "m", "messages": conversation, "max_tokens": 24})
    assert "Paris" in turns["response"]


async def test_messagepack_request_gets_a_messagepack_answer(worker: RunningWorker, nc: NATS) -> None:
    data = msgspec.msgpack.encode({"chat_id": "mp", "user_prompt": "Say hello.", "max_tokens": 4})
    msg = await nc.request("llm.chat", data, headers={"Content-Type": "application/msgpack"}, timeout=60)
    assert msg.headers["Content-Type"] == "application/msgpack"
    body = msgspec.msgpack.decode(msg.data)
    assert body["chat_id"] == "mp" and body["usage"]["completion_tokens"] <= 4


BAD_INPUTS = [
    (b"{not json", "malformed JSON"),
    (b"", "empty request body"),
    (b"[1, 2]", "Expected `object`"),
    (b'{"chat_id": "x", "user_prompt": 42}', "`$.user_prompt`"),
    (b'{"chat_id": "x", "user_prompt": ""}', "`$.user_prompt`"),
    (b'{"chat_id": "", "user_prompt": "hi"}', "`$.chat_id`"),
    (b'{"user_prompt": "hi"}', "missing required field `chat_id`"),
    (b'{"chat_id": "x"}', "`user_prompt` (or `messages`) is required"),
    (b'{"chat_id": "x", "user_prompt": "hi", "max_token": 3}', "unknown field `max_token`"),
    (b'{"chat_id": "x", "user_prompt": "hi", "temperature": -1}', "`$.temperature`"),
    (b'{"chat_id": "x", "user_prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}', "not both"),
    (b'{"chat_id": "x", "messages": [{"role": "robot", "content": "hi"}]}', "`$.messages[0].role`"),
    (b'{"chat_id": "x", "user_prompt": "hi", "max_tokens": 100000}', "max_tokens_cap"),
    (b"\xff\xfe\xfd", "malformed JSON"),
]


@pytest.mark.parametrize(("payload", "names"), BAD_INPUTS)
async def test_bad_input_gets_a_400_that_names_the_problem(
    worker: RunningWorker, nc: NATS, payload: bytes, names: str
) -> None:
    headers, body = await ask(nc, payload)
    assert headers[ERROR_CODE] == "400"
    assert names in headers["Nats-Service-Error"]
    assert body == {"error": headers["Nats-Service-Error"], "code": 400}


async def test_worker_still_serves_after_bad_input(worker: RunningWorker, nc: NATS) -> None:
    for payload, _ in BAD_INPUTS:
        await nc.request("llm.chat", payload, timeout=30)
    headers, body = await ask(nc, {"chat_id": "ok", "user_prompt": "What is the capital of France?"})
    assert ERROR_CODE not in headers and "Paris" in body["response"]


async def test_batch_answers_good_queries_and_reports_bad_ones(worker: RunningWorker, nc: NATS) -> None:
    queries = [
        {"chat_id": "good-1", "user_prompt": "What is the capital of France?", "max_tokens": 16},
        {"chat_id": "bad-1", "user_prompt": ""},
        {"chat_id": "good-2", "user_prompt": "Name one colour.", "max_tokens": 8},
        {"chat_id": "bad-2", "user_prompt": "hi", "top_p": 5},
        "not an object",
    ]
    headers, body = await ask(nc, {"queries": queries}, subject="llm.chat.batched")
    assert ERROR_CODE not in headers
    assert body["partial_success"] is True and "3 of 5" in body["message"]
    assert [r["chat_id"] for r in body["responses"]] == ["good-1", "bad-1", "good-2", "bad-2", None]
    good1, bad1, good2, bad2, junk = body["responses"]
    assert "Paris" in good1["response"] and good2["response"]
    assert "$.queries[1].user_prompt" in bad1["error"] and bad1["code"] == 400
    assert "$.queries[3].top_p" in bad2["error"]
    assert "Expected `object`" in junk["error"]


async def test_batch_envelope_errors(worker: RunningWorker, nc: NATS) -> None:
    for payload, expected in [
        (b'{"queries": []}', "`queries` is empty"),
        (b"{}", "missing required field `queries`"),
        (b'{"queries": [{"chat_id": "a", "user_prompt": ""}]}', "the batch's only query failed"),
    ]:
        headers, _ = await ask(nc, payload, subject="llm.chat.batched")
        assert headers[ERROR_CODE] == "400" and expected in headers["Nats-Service-Error"]


async def test_concurrent_clients_share_decode_batches(nats_server: NatsServer, smollm: LoadedModel) -> None:
    # the engine waits (up to a minute) until all 12 requests are in before its first prefill: no timing luck needed
    config = Config(nats_url=nats_server.url, subject_prefix="batching", max_batch_size=12, max_wait_ms=60_000)
    running = await start_worker(config, smollm)
    clients = [NATS() for _ in range(4)]
    try:
        for client in clients:
            await client.connect(nats_server.url)

        async def one(client: NATS, i: int) -> dict:
            msg = await client.request(
                "batching.chat",
                json.dumps({"chat_id": f"c{i}", "user_prompt": f"Count from 1 to {i + 3}.", "max_tokens": 24}).encode(),
                timeout=120,
            )
            return json.loads(msg.data)

        answers = await asyncio.gather(*(one(clients[i % 4], i) for i in range(12)))
        assert sorted(a["chat_id"] for a in answers) == sorted(f"c{i}" for i in range(12))
        [data] = await stats(clients[0], "batching.chat")
        assert data["requests_finished"] == 12
        assert data["max_running"] == 12, data
        assert max(int(size) for size in data["prefill_batch_sizes"]) >= 4, data
        assert sum(n for size, n in data["decode_batch_sizes"].items() if int(size) > 1) > 0
    finally:
        for client in clients:
            await client.close()
        await running.shutdown()


async def collect_stream(
    nc: NATS,
    request: dict,
    subject: str = "llm.chat",
    cancel_after: int | None = None,
) -> list[tuple[dict, dict]]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    request_id = f"stream-{request['chat_id']}"
    await nc.publish(subject, json.dumps(request).encode(), reply=inbox, headers={"Llmbus-Request-Id": request_id})
    messages = []
    while True:
        msg = await sub.next_msg(timeout=240)
        messages.append((msg.headers or {}, json.loads(msg.data)))
        if len(messages) == cancel_after:
            await nc.publish(f"llm.cancel.{request_id}", b"", headers={"Llmbus-Reply-To": inbox})
        if (msg.headers or {}).get("Llmbus-Stream") == "end":
            break
    await sub.unsubscribe()
    return messages


async def test_stream_chunks_arrive_in_order_and_end_with_a_marker(worker: RunningWorker, nc: NATS) -> None:
    """The chunks join to the answer of the same request without `stream`. Both answers prefill the same tokens
    after the cached system turn: a full prefill rounds differently from one after a cached prefix, and in bf16
    that can flip a near-tie (README, "Reproducibility")."""
    request = {"chat_id": "st", "user_prompt": "Tell me about the moon.", "max_tokens": 32}
    await ask(nc, {**request, "max_tokens": 1})
    _, whole = await ask(nc, request)
    messages = await collect_stream(nc, {**request, "stream": True})
    *chunks, (last_headers, last) = messages
    assert [body["index"] for _, body in messages] == list(range(len(messages)))
    assert all(h["Llmbus-Stream"] == "chunk" and not body.get("done") for h, body in chunks)
    assert last_headers["Llmbus-Stream"] == "end" and last_headers["Llmbus-Request-Id"] == "stream-st"
    assert last["done"] is True and last["finish_reason"] == whole["finish_reason"]
    assert last["usage"] == whole["usage"]
    assert "".join(body["delta"] for _, body in chunks) == whole["response"]
    assert len(chunks) > 5


async def test_stream_never_splits_a_multibyte_character(worker: RunningWorker, nc: NATS) -> None:
    request = {
        "chat_id": "utf8",
        "user_prompt": "Write the word 'café' and a few emoji like 🚀🌍, then say 你好.",
        "max_tokens": 48,
        "stream": True,
    }
    messages = await collect_stream(nc, request)
    assert all("\ufffd" not in body["delta"] for _, body in messages)


async def test_cancel_message_stops_the_generation(worker: RunningWorker, nc: NATS) -> None:
    request = {
        "chat_id": "cx",
        "user_prompt": "Write a very long story about a dragon.",
        "max_tokens": 200,
        "stream": True,
    }
    messages = await collect_stream(nc, request, cancel_after=3)
    _, last = messages[-1]
    assert last["finish_reason"] == "cancelled"
    assert last["usage"]["completion_tokens"] < 200
    assert (await stats(nc))[0]["requests_cancelled"] >= 1

    async def row_freed() -> bool:  # the cancelled row leaves the batch at the engine's next step
        return (await stats(nc))[0]["running"] == 0

    await wait_until(row_freed, 60, "the cancelled row to leave the batch")


async def test_expired_timeout_gets_504(worker: RunningWorker, nc: NATS) -> None:
    long_job = asyncio.create_task(ask(nc, {"chat_id": "busy", "user_prompt": "Write a long poem.", "max_tokens": 64}))
    headers, body = await ask(nc, {"chat_id": "late", "user_prompt": "hi", "timeout": 0.001})
    assert headers[ERROR_CODE] == "504" and "deadline exceeded" in body["error"]
    await long_job


async def test_prompt_over_the_context_window_is_a_400_context_length_exceeded(
    nats_server: NatsServer, smollm: LoadedModel, nc: NATS
) -> None:
    running = await start_worker(Config(nats_url=nats_server.url, subject_prefix="small", max_seq_len=64), smollm)
    try:
        headers, body = await ask(nc, {"chat_id": "long", "user_prompt": "word " * 100}, subject="small.chat")
        assert headers[ERROR_CODE] == "400" and headers["Llmbus-Error"] == "context_length_exceeded"
        assert "context window is 64 tokens" in body["error"]
        short = {"chat_id": "fits", "user_prompt": "Hi", "max_tokens": 60}
        headers, body = await ask(nc, short, subject="small.chat")  # prompt plus max_tokens over the window
        assert headers["Llmbus-Error"] == "context_length_exceeded" and "max_tokens 60" in body["error"]
        headers, body = await ask(nc, {"chat_id": "room", "user_prompt": "Hi"}, subject="small.chat")
        assert ERROR_CODE not in headers  # no max_tokens: up to the room left in the window
        assert body["usage"]["total_tokens"] <= 64
    finally:
        await running.shutdown()


async def test_two_workers_in_one_queue_group_both_serve(
    nats_server: NatsServer, smollm: LoadedModel, nc: NATS
) -> None:
    config = Config(nats_url=nats_server.url, subject_prefix="pair")
    first, second = await start_worker(config, smollm), await start_worker(config, smollm)
    try:
        answers = await asyncio.gather(
            *(
                ask(nc, {"chat_id": f"p{i}", "user_prompt": "Say yes.", "max_tokens": 4}, subject="pair.chat")
                for i in range(16)
            )
        )
        assert all(ERROR_CODE not in headers for headers, _ in answers)
        per_worker = [d["requests_finished"] for d in await stats(nc, "pair.chat", count=2)]
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker) and sum(per_worker) == 16
    finally:
        await asyncio.gather(first.shutdown(), second.shutdown())


async def test_service_discovery_reports_model_and_endpoints(worker: RunningWorker, nc: NATS) -> None:
    ping = json.loads((await nc.request("$SRV.PING.llm-inference", b"", timeout=5)).data)
    assert ping["name"] == "llm-inference" and ping["metadata"]["model"] == "SmolLM2-135M-Instruct"
    info = json.loads((await nc.request("$SRV.INFO.llm-inference", b"", timeout=5)).data)
    subjects = {e["subject"]: e["queue_group"] for e in info["endpoints"]}
    assert subjects["llm.chat"] == "llm-workers" and subjects["llm.chat.batched"] == "llm-workers"


async def test_request_ids_are_per_client_and_cancel_needs_the_reply_subject(worker: RunningWorker, nc: NATS) -> None:
    """Two clients may pick the same request id; one inbox may not reuse an id in flight; a cancel names both."""
    long_query = {"chat_id": "q", "user_prompt": "Write a long story.", "max_tokens": 48}
    batch = json.dumps({"queries": [long_query]}).encode()
    inboxes = [nc.new_inbox() for _ in range(3)]
    subs = [await nc.subscribe(inbox) for inbox in inboxes]
    same_id = {"Llmbus-Request-Id": "my-req-1"}
    # one connection publishes in order, so the worker sees these in this order
    await nc.publish("llm.chat.batched", batch, reply=inboxes[0], headers=same_id)
    await nc.publish("llm.chat", json.dumps(long_query).encode(), reply=inboxes[1], headers=same_id)
    await nc.publish("llm.chat.batched", batch, reply=inboxes[0], headers=same_id)  # same client, same id
    duplicate = await subs[0].next_msg(timeout=120)
    assert duplicate.headers[ERROR_CODE] == "409" and duplicate.headers["Llmbus-Error"] == "duplicate_request"
    await nc.publish("llm.cancel.my-req-1", b"")  # no reply subject: cancels nothing
    await nc.publish("llm.cancel.my-req-1", b"", headers={"Llmbus-Reply-To": inboxes[2]})  # another client's
    await nc.publish("llm.cancel.my-req-1", b"", headers={"Llmbus-Reply-To": inboxes[0]})  # the batch's own
    cancelled = await subs[0].next_msg(timeout=120)
    assert cancelled.headers[ERROR_CODE] == "499" and cancelled.headers["Llmbus-Error"] == "cancelled"
    other = json.loads((await subs[1].next_msg(timeout=120)).data)
    assert other["finish_reason"] == "length" and other["usage"]["completion_tokens"] == 48


async def test_an_in_process_worker_leaves_its_callers_torch_threads_as_they_were(nats_server: NatsServer) -> None:
    """A worker sets torch's threads for its engine (`--threads`) on the thread that runs it; run in a caller's
    process (tests, `llmbus up`) it restores the caller's count when it stops, so that what runs next there (and
    the compiled packages it names by thread count) does not depend on which worker ran before."""
    from helpers.tiny_model import tiny_model

    before = torch.get_num_threads()
    asked = 1 if before > 1 else 2
    config = Config(nats_url=nats_server.url, subject_prefix="threads", threads=asked)
    worker = await start_worker(config, tiny_model())
    try:
        assert torch.get_num_threads() == asked
    finally:
        await worker.shutdown()
    assert torch.get_num_threads() == before
