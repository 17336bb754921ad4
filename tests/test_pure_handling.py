"""The pure halves of a worker, without NATS: request bytes and headers to a request or a `WireError`
(`inference_worker/requests.py`), and engine events to the messages the wire contract expects
(`inference_worker/replies.py`, driven by the real `Outbox` into a replier that records what it was asked to send)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import jinja2.exceptions
import msgspec
import pytest

from inference_worker import replies
from inference_worker.events import Accepted, Failed, Finished, TokenDelta
from inference_worker.held import Held, HeldRequests
from inference_worker.metrics import WorkerMetrics
from inference_worker.micro import Endpoint, error_headers_of
from inference_worker.outbox import Outbox
from inference_worker.requests import (
    Limits,
    fit_max_tokens,
    parse_batch,
    parse_chat,
    prepare,
    propagated,
    request_id_of,
    tenant_of,
)
from inference_worker.sequence import Sequence
from schemas import BatchItemError, ChatChunk, ChatRequest, ChatResponse, ErrorBody, Message, WireError, encode
from schemas.subjects import (
    CONTENT_TYPE,
    ERROR,
    ERROR_CODE,
    ERROR_NAME,
    JSON,
    MSGPACK,
    REQUEST_ID,
    STREAM,
    STREAM_CHUNK,
    STREAM_END,
    TENANT,
)

LIMITS = Limits(max_tokens_cap=100, max_batch_queries=8, context_window=50)


def chat(data: bytes, kind: str = JSON) -> ChatRequest:
    request = parse_chat(data, kind)
    assert isinstance(request, ChatRequest), request
    return request


def refusal(value: object) -> WireError:
    assert isinstance(value, WireError), value
    return value


# requests ---------------------------------------------------------------------------------------------------------


def test_a_valid_json_body_becomes_the_chat_request_it_describes() -> None:
    body = b'{"chat_id": "c1", "user_prompt": "hi", "max_tokens": 7, "temperature": 0.5, "stop": "END", "priority": -2}'
    request = chat(body)
    assert (request.chat_id, request.user_prompt, request.max_tokens) == ("c1", "hi", 7)
    assert (request.temperature, request.stop, request.priority, request.stream) == (0.5, "END", -2, False)


def test_a_msgpack_body_decodes_to_the_same_request_as_its_json() -> None:
    fields = {"chat_id": "c1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert chat(msgspec.msgpack.encode(fields), MSGPACK) == chat(msgspec.json.encode(fields))
    assert chat(msgspec.json.encode(fields)).messages == [Message("user", "hi")]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"chat_id": "c1", "user_prompt": "hi", "max_tokens": "7"}', "$.max_tokens"),
        (b'{"chat_id": "c1", "user_prompt": "hi", "temperature": 3}', "$.temperature"),
        (b'{"chat_id": "c1", "user_prompt": "hi", "max_token": 7}', "max_token"),
        (b'{"chat_id": 5, "user_prompt": "hi"}', "$.chat_id"),
        (b'{"chat_id": "c1"}', "user_prompt"),
        (b'{"chat_id": "c1", "user_prompt": "hi"', "malformed JSON"),
        (b"", "empty request body"),
    ],
)
def test_a_bad_body_is_a_400_that_names_what_is_wrong(body: bytes, names: str) -> None:
    error = refusal(parse_chat(body, JSON))
    assert error.code == 400
    assert names in error.message


def test_stream_is_refused_on_a_durable_job_but_not_on_request_reply() -> None:
    body = b'{"chat_id": "c1", "user_prompt": "hi", "stream": true}'
    assert chat(body).stream
    error = refusal(parse_chat(body, JSON, durable=True))
    assert error.code == 400 and "durable" in error.message


def test_a_tenant_header_is_taken_when_valid_and_absent_means_the_shared_tenant() -> None:
    assert tenant_of({TENANT: "team_A-7"}) == "team_A-7"
    assert tenant_of({TENANT: "t" * 128}) == "t" * 128
    assert tenant_of({"Other": "x"}) == ""
    assert tenant_of(None) == ""


@pytest.mark.parametrize("tenant", ["team.a", "team a", "tenant/1", "é", "a*", "", "t" * 129])
def test_a_tenant_header_outside_the_alphabet_or_too_long_is_refused(tenant: str) -> None:
    error = refusal(tenant_of({TENANT: tenant}))
    assert (error.code, error.name) == (400, "bad_request")
    assert TENANT in error.message


def test_a_request_id_header_is_kept_and_a_missing_one_is_made_up_fresh() -> None:
    assert request_id_of({REQUEST_ID: "my-req_1"}) == "my-req_1"
    made = {request_id_of({}), request_id_of(None)}
    assert len(made) == 2
    assert all(isinstance(rid, str) and len(rid) == 32 and rid.isalnum() for rid in made)


@pytest.mark.parametrize(
    "request_id", ["has.dot", "has space", "llm.cancel.*", "", "r" * 129, "id\n", "x\nforged log line"]
)
def test_an_invalid_request_id_header_is_refused_not_replaced(request_id: str) -> None:
    """An id names the cancel subject `llm.cancel.<id>`, so one that is not a single subject token is a 400."""
    error = refusal(request_id_of({REQUEST_ID: request_id}))
    assert (error.code, error.name) == (400, "bad_request")
    assert REQUEST_ID in error.message


def test_a_batch_gives_its_model_to_the_queries_without_one_and_refuses_streamed_queries() -> None:
    body = msgspec.json.encode(
        {
            "queries": [
                {"chat_id": "a", "user_prompt": "hi"},
                {"chat_id": "b", "user_prompt": "hi", "model": "other"},
                {"chat_id": "c", "user_prompt": "hi", "stream": True},
                {"chat_id": "d", "user_prompt": "hi", "max_tokens": 0},
            ]
        }
    )
    batch = parse_batch(body, JSON, model="mine")
    assert not isinstance(batch, WireError)
    first, second, streamed, invalid = batch.items
    assert isinstance(first, ChatRequest) and first.model == "mine"
    assert isinstance(second, ChatRequest) and second.model == "other"
    assert isinstance(streamed, BatchItemError) and (streamed.chat_id, streamed.code) == ("c", 400)
    assert isinstance(invalid, BatchItemError) and "$.queries[3].max_tokens" in invalid.error


def test_the_completion_budget_fits_the_context_window_or_is_refused() -> None:
    asked = chat(b'{"chat_id": "c", "user_prompt": "hi", "max_tokens": 20}')
    unasked = chat(b'{"chat_id": "c", "user_prompt": "hi"}')
    assert fit_max_tokens(asked, 30, LIMITS) == 20
    assert fit_max_tokens(unasked, 30, LIMITS) == 20  # the room left: 50 - 30
    assert fit_max_tokens(unasked, 1, Limits(10, 8, 1000)) == 10  # at most the cap
    error = refusal(fit_max_tokens(asked, 31, LIMITS))
    assert (error.code, error.name) == (400, "context_length_exceeded")
    assert "19 tokens" in error.message


def test_prepare_turns_a_request_into_an_engine_sequence_or_a_failed_event() -> None:
    def encode_chat(turns: list[dict[str, str]]) -> tuple[list[int], int]:
        return [len(turn["content"]) for turn in turns], 1

    body = b'{"chat_id": "c", "system_prompt": "be brief", "user_prompt": "hi", "seed": 3, "stop": ["x", "y"]}'
    seq = prepare("r1", chat(body), encode_chat, LIMITS, deadline=12.5, tenant="acme")
    assert isinstance(seq, Sequence)
    assert (seq.request_id, seq.prompt_ids, seq.prefix_len, seq.tenant, seq.deadline) == ("r1", [8, 2], 1, "acme", 12.5)
    assert (seq.params.max_tokens, seq.params.seed, seq.params.stop) == (48, 3, ("x", "y"))

    too_long = chat(b'{"chat_id": "c", "user_prompt": "hi", "max_tokens": 50}')
    failed = prepare("r2", too_long, encode_chat, LIMITS, deadline=None)
    assert isinstance(failed, Failed)
    assert (failed.request_id, failed.code, failed.name) == ("r2", 400, "context_length_exceeded")

    def alternating_only(turns: list[dict[str, str]]) -> tuple[list[int], int]:  # as Mistral's template refuses
        raise jinja2.exceptions.TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    refused = prepare("r3", chat(body), alternating_only, LIMITS, deadline=None)
    assert isinstance(refused, Failed) and (refused.code, refused.name) == (400, "bad_request")
    assert "chat template refused" in refused.message and "must alternate" in refused.message


# replies ----------------------------------------------------------------------------------------------------------


@dataclass
class Sent:
    data: bytes
    headers: dict[str, str] | None
    final: bool
    error: WireError | None = None


@dataclass
class RecordingReplier:
    """A `Replier` that keeps what it is asked to publish, in order."""

    data: bytes = b""
    headers: dict[str, str] | None = None
    reply: str = "_INBOX.test"
    sent: list[Sent] = field(default_factory=list)

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None, *, final: bool = True) -> None:
        self.sent.append(Sent(data, headers, final))

    async def respond_error(self, error: WireError, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.sent.append(Sent(data, headers, True, error))

    async def forward(self, subject: str) -> None:
        raise AssertionError("a reply is never forwarded")


def held(kind: str = JSON, stream: bool = False) -> Held:
    """Request `req-1` (engine id `r1`, chat `chat-1`) as the worker holds it."""
    return Held(RecordingReplier(), ("_INBOX.test", "req-1"), "r1", kind, "chat-1", stream)


async def outbox_answers(request: Held, events: list[Accepted | TokenDelta | Finished | Failed]) -> list[Sent]:
    """What the real Outbox publishes to `request` for these engine events."""
    requests = HeldRequests()
    requests.hold(request)
    outbox = Outbox(requests, "tiny-model", lambda: None, WorkerMetrics("tiny-model", "w1"))
    await outbox.publish(events)
    return cast(RecordingReplier, request.replier).sent


def test_a_finished_event_is_one_chat_response_with_usage_and_model() -> None:
    (answer,) = replies.finished(held(), Finished("r1", "Hello!", "length", 11, 4), "tiny-model")
    assert answer.final and answer.error is None and answer.headers is None
    response = msgspec.json.decode(answer.data, type=ChatResponse)
    assert (response.chat_id, response.response, response.finish_reason, response.model) == (
        "chat-1",
        "Hello!",
        "length",
        "tiny-model",
    )
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (11, 4, 15)


def test_a_msgpack_request_is_answered_in_msgpack_with_its_content_type() -> None:
    (answer,) = replies.finished(held(MSGPACK), Finished("r1", "Hi", "stop", 3, 1), "tiny-model")
    assert answer.headers == {CONTENT_TYPE: MSGPACK}
    assert msgspec.msgpack.decode(answer.data, type=ChatResponse).response == "Hi"


async def test_a_stream_is_accepted_chunks_the_end_message_and_the_empty_sentinel() -> None:
    request = held(stream=True)
    events = [Accepted("r1"), TokenDelta("r1", "Hel"), TokenDelta("r1", "lo"), Finished("r1", "Hello", "stop", 9, 2)]
    sent = await outbox_answers(request, events)

    assert [m.headers for m in sent] == [{STREAM: STREAM_CHUNK, REQUEST_ID: "req-1"}] * 3 + [
        {STREAM: STREAM_END, REQUEST_ID: "req-1"},
        None,
    ]
    assert [m.final for m in sent] == [False, False, False, True, False]
    chunks = [msgspec.json.decode(m.data, type=ChatChunk) for m in sent[:4]]
    assert [(c.index, c.delta, c.done) for c in chunks] == [
        (0, "", False),
        (1, "Hel", False),
        (2, "lo", False),
        (3, "", True),
    ]
    end = chunks[3]
    assert (end.finish_reason, end.model, end.usage and end.usage.total_tokens) == ("stop", "tiny-model", 11)
    assert sent[4].data == b"" and sent[4].error is None
    assert b'"done"' not in sent[1].data  # chunks omit their defaults


async def test_a_failed_event_on_a_stream_ends_it_with_the_error_headers_then_the_sentinel() -> None:
    request = held(stream=True)
    sent = await outbox_answers(
        request, [TokenDelta("r1", "partial"), Failed("r1", 503, "busy\r\nnow", name="overloaded")]
    )

    assert len(sent) == 3
    end, sentinel = sent[1], sent[2]
    assert end.error == WireError(503, "busy\r\nnow", "overloaded") and end.final
    assert end.headers == {STREAM: STREAM_END, REQUEST_ID: "req-1"}
    assert msgspec.json.decode(end.data, type=ErrorBody) == ErrorBody("busy now", 503)  # no CR/LF in the body
    assert error_headers_of(end.error) == {ERROR: "busy now", ERROR_CODE: "503", ERROR_NAME: "overloaded"}
    assert (sentinel.data, sentinel.headers, sentinel.final, sentinel.error) == (b"", None, False, None)


async def test_a_failed_event_without_a_stream_is_one_error_answer() -> None:
    sent = await outbox_answers(held(), [Failed("r1", 504, "timed out")])
    (answer,) = sent
    assert answer.error is not None and answer.headers is None
    assert msgspec.json.decode(answer.data, type=ErrorBody) == ErrorBody("timed out", 504)
    assert error_headers_of(answer.error)[ERROR_NAME] == "timeout"  # named from the code when the event gave none


async def test_token_deltas_of_a_non_streaming_request_are_not_sent() -> None:
    sent = await outbox_answers(
        held(), [Accepted("r1"), TokenDelta("r1", "Hel"), Finished("r1", "Hello", "stop", 9, 2)]
    )
    assert len(sent) == 1 and msgspec.json.decode(sent[0].data, type=ChatResponse).response == "Hello"


def test_an_error_on_a_stream_is_the_end_message_with_its_request_id_and_content_type() -> None:
    refused = WireError.of("bad_request", "no")
    (plain,) = replies.error(JSON, refused)
    end, _ = replies.error(MSGPACK, refused, stream=True, request_id="req-9")
    assert plain.headers is None
    assert end.headers == {STREAM: STREAM_END, REQUEST_ID: "req-9", CONTENT_TYPE: MSGPACK}
    assert end.data == encode(ErrorBody("no", 400), MSGPACK)


def test_names_ending_in_a_newline_are_no_subject_tokens() -> None:
    """A regex's `$` also matches before an end "\\n": such names once passed as tokens, into subjects and logs."""
    from llmbus.permissions import check_names
    from schemas.subjects import model_token

    assert model_token("abc") == "abc" and "\n" not in model_token("abc\n")
    assert check_names("llm\n", None, "workers") is not None and check_names("llm", None, "workers\n") is not None
    assert check_names("llm", "_INBOX.alice", "workers") is None


def test_a_batch_passes_on_only_a_valid_trace_context_and_a_checked_tenant() -> None:
    """Copied as they came, a malformed traceparent or a 60 KB tracestate went out on every query of the batch."""
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert propagated({"traceparent": parent, "tracestate": "a=1", TENANT: "t1"}) == {
        "traceparent": parent,
        "tracestate": "a=1",
        TENANT: "t1",
    }
    assert propagated({"traceparent": "garbage", "tracestate": "x" * 60_000, TENANT: "t1"}) == {TENANT: "t1"}
    assert propagated(None) == {}
    refused = propagated({TENANT: "a tenant\nwith a newline"})
    assert isinstance(refused, WireError) and refused.code == 400
    endpoint = Endpoint("chat", "llm.chat", "q", handler=None)  # type: ignore[arg-type]
    endpoint.record(1, WireError.of("bad_request", "model 'x\nforged' is not served"))
    assert "\n" not in endpoint.last_error and endpoint.last_error.startswith("400:")


async def test_a_final_answer_that_cannot_be_published_is_logged_and_strands_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The publish raised (a closed connection): the error is logged without stranding the answers after it. Only
    an answer that reached its client counts as answered (its tokens too); the other counts as abandoned."""

    class FailingReplier(RecordingReplier):
        async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None, *, final: bool = True):
            raise ConnectionError("connection closed")

    requests, metrics = HeldRequests(), WorkerMetrics("tiny-model", "w1")
    requests.hold(Held(FailingReplier(), ("_INBOX.test", "req-1"), "r1", JSON, "chat-1", False))
    requests.hold(held_two := Held(RecordingReplier(), ("_INBOX.test", "req-2"), "r2", JSON, "chat-2", False))
    outbox = Outbox(requests, "tiny-model", lambda: None, metrics)
    with caplog.at_level("INFO"):
        await outbox.publish([Finished("r1", "Hi", "stop", 3, 1), Finished("r2", "Yo", "stop", 3, 1)])
    assert metrics.generation_tokens._value.get() == 1  # r2's: r1's answer never reached its client
    assert metrics.unanswered_by_outcome["abandoned"] == 1
    assert "failed to publish an answer to _INBOX.test" in caplog.text
    assert len(cast(RecordingReplier, held_two.replier).sent) == 1
