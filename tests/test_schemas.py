"""The wire contract: bad input is a WireError that names the field, never an exception; schemas match the Structs."""

from __future__ import annotations

import inspect
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas.messages
from schemas import (
    Batch,
    BatchItemError,
    BatchResult,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Message,
    Usage,
    WireError,
    content_type,
    conversation,
    decode_batch,
    decode_chat_request,
    encode,
    stop_strings,
)
from schemas.export import JSON_DIR, MESSAGES, json_schemas, write_json_schemas
from schemas.subjects import JSON, MSGPACK

BAD_CHAT_REQUESTS = {
    "bad JSON": (b'{"chat_id": "a",', ["malformed JSON"]),
    "empty body": (b"", ["empty request body"]),
    "not an object": (b'["What is the capital of France?"]', ["Expected `object`, got `array`"]),
    "chat_id not a string": (b'{"chat_id": 5, "user_prompt": "hi"}', ["`$.chat_id`", "Expected `str`, got `int`"]),
    "temperature not a number": (
        b'{"chat_id": "a", "user_prompt": "hi", "temperature": "hot"}',
        ["`$.temperature`", "Expected `float`"],
    ),
    "stream not a bool": (b'{"chat_id": "a", "user_prompt": "hi", "stream": "yes"}', ["`$.stream`"]),
    "empty user_prompt": (b'{"chat_id": "a", "user_prompt": ""}', ["`$.user_prompt`", "length >= 1"]),
    "empty chat_id": (b'{"chat_id": "", "user_prompt": "hi"}', ["`$.chat_id`", "length >= 1"]),
    "missing chat_id": (b'{"user_prompt": "hi"}', ["missing required field `chat_id`"]),
    "unknown field": (b'{"chat_id": "a", "user_prompt": "hi", "max_token": 5}', ["unknown field `max_token`"]),
    "unknown field in a message": (
        b'{"chat_id": "a", "messages": [{"role": "user", "content": "hi", "name": "bob"}]}',
        ["unknown field `name`"],
    ),
    "both messages and user_prompt": (
        b'{"chat_id": "a", "user_prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}',
        ["`messages`", "`user_prompt`", "not both"],
    ),
    "system_prompt with messages": (
        b'{"chat_id": "a", "system_prompt": "be brief", "messages": [{"role": "user", "content": "hi"}]}',
        ["`messages`", "`system_prompt`"],
    ),
    "neither messages nor user_prompt": (b'{"chat_id": "a"}', ["`user_prompt`", "required"]),
    "empty messages": (b'{"chat_id": "a", "messages": []}', ["`$.messages`"]),
    "only system messages": (
        b'{"chat_id": "a", "messages": [{"role": "system", "content": "be brief"}]}',
        ["`messages`", "user or assistant"],
    ),
    "unknown role": (b'{"chat_id": "a", "messages": [{"role": "robot", "content": "hi"}]}', ["`$.messages[0].role`"]),
    "max_tokens zero": (b'{"chat_id": "a", "user_prompt": "hi", "max_tokens": 0}', ["`$.max_tokens`", ">= 1"]),
    "temperature too high": (b'{"chat_id": "a", "user_prompt": "hi", "temperature": 3}', ["`$.temperature`"]),
    "top_p zero": (b'{"chat_id": "a", "user_prompt": "hi", "top_p": 0}', ["`$.top_p`"]),
    "empty stop string in a list": (b'{"chat_id": "a", "user_prompt": "hi", "stop": [""]}', ["`$.stop"]),
}


@pytest.mark.parametrize(("data", "expected"), BAD_CHAT_REQUESTS.values(), ids=BAD_CHAT_REQUESTS.keys())
def test_bad_chat_request_is_a_wire_error_naming_the_problem(data: bytes, expected: list[str]) -> None:
    result = decode_chat_request(data)
    assert isinstance(result, WireError), result
    assert result.code == 400
    for text in expected:
        assert text in result.message


def test_user_prompt_request_decodes_with_defaults() -> None:
    request = decode_chat_request(
        b'{"chat_id": "c1", "user_prompt": "What is the capital of France?", "system_prompt": "Be brief."}'
    )
    assert isinstance(request, ChatRequest)
    assert (request.temperature, request.top_p, request.top_k, request.stream) == (0.0, 1.0, 0, False)
    assert request.max_tokens is None
    assert conversation(request) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]


def test_messages_request_keeps_the_turns_in_order() -> None:
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    request = decode_chat_request(json.dumps({"chat_id": "c2", "messages": turns}).encode())
    assert isinstance(request, ChatRequest)
    assert conversation(request) == turns


@pytest.mark.parametrize(
    ("stop", "expected"), [(None, ()), ("", ()), ("\n", ("\n",)), (["a", "bc"], ("a", "bc"))], ids=repr
)
def test_stop_strings(stop: str | list[str] | None, expected: tuple[str, ...]) -> None:
    assert stop_strings(ChatRequest(chat_id="s", user_prompt="hi", stop=stop)) == expected


def test_empty_batch_is_a_wire_error_naming_queries() -> None:
    result = decode_batch(b'{"queries": []}')
    assert isinstance(result, WireError)
    assert result.code == 400
    assert "`queries`" in result.message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"queries": 3}', "`$.queries`"),
        (b'{"query": []}', "unknown field `query`"),
        (b'{"queries": [', "malformed JSON"),
    ],
    ids=["queries not a list", "misspelt envelope", "bad JSON"],
)
def test_bad_batch_envelope_is_a_wire_error(data: bytes, expected: str) -> None:
    result = decode_batch(data)
    assert isinstance(result, WireError)
    assert expected in result.message


def test_a_bad_query_fails_alone_and_the_good_ones_are_kept_in_order() -> None:
    batch = {
        "queries": [
            {"chat_id": "good-1", "user_prompt": "What is the capital of France?"},
            {"chat_id": "bad-empty", "user_prompt": ""},
            {"chat_id": "bad-neither"},
            7,
            {"chat_id": "good-2", "messages": [{"role": "user", "content": "Hi"}]},
        ]
    }
    decoded = decode_batch(json.dumps(batch).encode())
    assert not isinstance(decoded, WireError) and decoded.stream is False
    items = decoded.items
    assert len(items) == 5
    good_1, bad_empty, bad_neither, not_an_object, good_2 = items
    assert isinstance(good_1, ChatRequest) and good_1.chat_id == "good-1"
    assert isinstance(good_2, ChatRequest) and good_2.chat_id == "good-2"
    assert isinstance(bad_empty, BatchItemError)
    assert (bad_empty.chat_id, bad_empty.code) == ("bad-empty", 400)
    assert "`$.queries[1].user_prompt`" in bad_empty.error
    assert isinstance(bad_neither, BatchItemError)
    assert bad_neither.chat_id == "bad-neither"
    assert "`user_prompt`" in bad_neither.error
    assert isinstance(not_an_object, BatchItemError)
    assert not_an_object.chat_id is None
    assert BatchResult.failed(bad_empty) == BatchResult(chat_id="bad-empty", error=bad_empty.error, code=400)


@pytest.mark.parametrize(
    ("headers", "kind"),
    [
        (None, JSON),
        ({}, JSON),
        ({"Content-Type": "application/json"}, JSON),
        ({"Content-Type": "application/msgpack"}, MSGPACK),
        ({"Content-Type": "Application/MsgPack; charset=binary"}, MSGPACK),
        ({"Content-Type": "text/plain"}, JSON),
    ],
    ids=repr,
)
def test_content_type_picks_the_encoding(headers: dict[str, str] | None, kind: str) -> None:
    assert content_type(headers) == kind


def test_msgpack_round_trip_via_content_type_header() -> None:
    request = ChatRequest(
        chat_id="mp-1",
        messages=[Message(role="system", content="Be brief."), Message(role="user", content="Capital of France?")],
        max_tokens=16,
        temperature=0.7,
        stop=["\n\n"],
        seed=7,
    )
    headers = {"Content-Type": "application/msgpack"}
    data = encode(request, content_type(headers))
    assert data != encode(request)
    assert decode_chat_request(data, content_type(headers)) == request
    assert decode_chat_request(encode(request), content_type(None)) == request


def test_msgpack_batch_keeps_good_queries_and_names_the_bad_one() -> None:
    batch = {"queries": [{"chat_id": "ok", "user_prompt": "hi"}, {"chat_id": "bad", "user_prompt": "hi", "x": 1}]}
    decoded = decode_batch(msgspec.msgpack.encode(batch), MSGPACK)
    assert not isinstance(decoded, WireError)
    items = decoded.items
    assert isinstance(items[0], ChatRequest)
    assert isinstance(items[1], BatchItemError)
    assert items[1].chat_id == "bad"
    assert "unknown field `x`" in items[1].error


def test_json_sent_as_msgpack_is_a_wire_error() -> None:
    result = decode_chat_request(b'{"chat_id": "a", "user_prompt": "hi"}', MSGPACK)
    assert isinstance(result, WireError)
    assert result.code == 400


def test_responses_encode_to_the_documented_shape() -> None:
    usage = Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12)
    response = ChatResponse(chat_id="c", response="Paris.", finish_reason="stop", usage=usage, model="smollm2")
    assert json.loads(encode(response)) == {
        "chat_id": "c",
        "response": "Paris.",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        "model": "smollm2",
    }
    assert json.loads(encode(ChatChunk(chat_id="c", delta="Par", index=0))) == {
        "chat_id": "c",
        "delta": "Par",
        "index": 0,
    }
    assert msgspec.msgpack.decode(encode(response, MSGPACK), type=ChatResponse) == response


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), kind=st.sampled_from([JSON, MSGPACK]))
def test_arbitrary_bytes_never_raise(data: bytes, kind: str) -> None:
    assert isinstance(decode_chat_request(data, kind), ChatRequest | WireError)
    assert isinstance(decode_batch(data, kind), Batch | WireError)


def wire_structs() -> set[str]:
    internal = {"BatchEnvelope", "BatchItemError"}
    return {
        name
        for name, obj in inspect.getmembers(schemas.messages, inspect.isclass)
        if issubclass(obj, msgspec.Struct) and obj.__module__ == "schemas.messages" and name not in internal
    }


def test_json_schema_export_covers_every_wire_message() -> None:
    exported = json_schemas()
    assert set(exported) == set(MESSAGES)
    defined = {name for schema in exported.values() for name in schema["$defs"]}
    assert defined == wire_structs()


def test_chat_request_schema_forbids_unknown_fields_and_requires_chat_id() -> None:
    schema = json_schemas()["chat_request"]["$defs"]["ChatRequest"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["chat_id"]
    assert {"chat_id", "user_prompt", "messages", "max_tokens", "stream"} <= set(schema["properties"])


def test_committed_json_schemas_are_up_to_date(tmp_path) -> None:
    written = write_json_schemas(tmp_path)
    committed = sorted(path.name for path in JSON_DIR.glob("*.json"))
    assert committed == sorted(path.name for path in written), "run `llmbus schema --out schemas/json`"
    for path in written:
        assert (JSON_DIR / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run `llmbus schema --out schemas/json`"
        )
