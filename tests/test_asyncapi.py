"""The AsyncAPI document of the bus: current, complete, valid AsyncAPI 3.0, and true to what a real worker sends."""

from __future__ import annotations

import gzip
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import bus_gateway.jobs
import inference_worker.job_stream
import inference_worker.micro
import schemas.messages
import schemas.subjects
from helpers.workers import RunningWorker
from llmbus import __version__
from schemas import codec
from schemas.asyncapi import ASYNCAPI_PATH, asyncapi_document, asyncapi_json
from schemas.asyncapi_channels import DISCOVERY, JOBS_STREAM, VERBS
from schemas.asyncapi_messages import MSG_ID, PAYLOADS
from schemas.discovery import DISCOVERY_REPLIES
from schemas.errors import ERRORS
from schemas.export import MESSAGES
from schemas.subjects import STREAM, Subjects

OFFICIAL_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json.gz"
NOT_ON_THE_WIRE = {
    "BatchEnvelope": "how a BatchRequest is decoded (its queries kept raw)",
    "BatchItemError": "sent as a BatchResult",
}
HEADERS = [
    schemas.subjects.CONTENT_TYPE,
    schemas.subjects.REQUEST_ID,
    schemas.subjects.STREAM,
    schemas.subjects.ERROR,
    schemas.subjects.ERROR_CODE,
    schemas.subjects.ERROR_NAME,
    schemas.subjects.REPLY_TO,
    schemas.subjects.TENANT,
    schemas.subjects.TRACEPARENT,
    schemas.subjects.TRACESTATE,
    MSG_ID,
]
LLMBUS = [sys.executable, "-m", "llmbus.cli"]

Doc = dict[str, Any]


@cache
def document() -> Doc:
    return json.loads(ASYNCAPI_PATH.read_text())


def resolve(doc: Doc, ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} is not a local reference"
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def validator(doc: Doc, schema: Doc) -> jsonschema_rs.Draft7Validator:
    """A validator of `schema` whose `#/components/schemas/...` references resolve in `doc`."""
    return jsonschema_rs.Draft7Validator({**schema, "components": {"schemas": doc["components"]["schemas"]}})


def errors_of(doc: Doc, schema: Doc, instance: Any) -> list[str]:
    return [f"{e.instance_path}: {e.message}" for e in validator(doc, schema).iter_errors(instance)]


# --- the document is current and complete -----------------------------------------------------------------------


def test_committed_copy_is_what_the_generator_writes() -> None:
    expected = asyncapi_json(__version__)
    assert ASYNCAPI_PATH.read_text() == expected, "regenerate: llmbus schema --asyncapi --out schemas/asyncapi.json"


def test_every_wire_struct_is_a_schema_of_the_document() -> None:
    structs = {
        name
        for name, value in vars(schemas.messages).items()
        if inspect.isclass(value)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == schemas.messages.__name__
    }
    on_the_wire = structs - set(NOT_ON_THE_WIRE)
    components = document()["components"]["schemas"]
    assert on_the_wire <= set(components)
    _, expected = msgspec.json.schema_components(
        [getattr(schemas.messages, name) for name in on_the_wire], ref_template="#/components/schemas/{name}"
    )
    for name in on_the_wire:
        assert components[name] == expected[name], f"{name}'s schema is not msgspec's"
    assert set(PAYLOADS.values()) == set(MESSAGES.values()), "the AsyncAPI document and `llmbus schema` differ"


def test_every_subject_of_the_contract_is_in_the_document() -> None:
    doc, text = document(), ASYNCAPI_PATH.read_text()
    addresses = {channel["address"] for channel in doc["channels"].values()}
    subjects = Subjects()
    members = {name: value for name, value in vars(Subjects).items() if not name.startswith("_") and name != "prefix"}
    assert members, "no subjects found"
    for name, member in members.items():
        if isinstance(member, property):
            subject = getattr(subjects, name)
        else:
            parameter = "{request_id}" if name == "cancel" else "{model_token}"
            subject = member(subjects, "PARAM").replace("PARAM", parameter)
        if "*" in subject or ">" in subject:  # what workers subscribe to: named in the descriptions
            assert f"`{subject}`" in text, f"{name}: {subject}"
        else:
            assert subject in addresses, f"{name}: {subject}"
    for verb in VERBS:
        for address in (f"$SRV.{verb}", f"$SRV.{verb}.llm-inference", f"$SRV.{verb}.llm-inference.{{service_id}}"):
            assert address in addresses


def test_every_header_and_name_of_the_contract_is_in_the_document() -> None:
    text = ASYNCAPI_PATH.read_text()
    constants = {
        name: value
        for name, value in vars(schemas.subjects).items()
        if name.isupper() and isinstance(value, str) and not name.startswith("_")
    }
    for name, value in constants.items():
        assert value in text, f"{name} = {value!r} is not in the document"
    doc = document()
    header_schemas = [
        resolve(doc, m["headers"]["$ref"]) for m in doc["components"]["messages"].values() if "headers" in m
    ]
    header_names = {name for schema in header_schemas for name in schema["properties"]}
    assert set(HEADERS) <= header_names
    request_headers = doc["components"]["schemas"]["RequestHeaders"]["properties"]
    assert set(request_headers) >= schemas.subjects.PROPAGATED_HEADERS
    pattern = request_headers[schemas.subjects.REQUEST_ID]["pattern"]
    assert pattern == schemas.subjects.REQUEST_ID_PATTERN.pattern


def test_names_shared_with_the_worker_and_clients_agree() -> None:
    assert MSG_ID == bus_gateway.jobs.MSG_ID
    assert JOBS_STREAM == inference_worker.job_stream.STREAM_NAME
    assert (DISCOVERY, VERBS) == (inference_worker.micro.DISCOVERY, inference_worker.micro.VERBS)


def test_the_error_table_is_in_the_document() -> None:
    doc = document()
    assert doc["components"]["schemas"]["ErrorName"]["enum"] == list(ERRORS)
    for spec in ERRORS.values():
        retry = spec.retry_after or ""
        row = f"| `{spec.name}` | {spec.code} | {'yes' if spec.retryable else 'no'} | {retry} |"
        assert row in doc["info"]["description"]


def test_another_prefix_changes_every_bus_subject_and_no_discovery_subject() -> None:
    doc = asyncapi_document(__version__, "acme.llm")
    for name, channel in doc["channels"].items():
        address = channel["address"]
        if address is not None:
            assert address.startswith("$SRV." if name.startswith("srv") else "acme.llm."), address


# --- the document is valid AsyncAPI 3.0 ---------------------------------------------------------------------------


def test_the_document_is_valid_against_the_official_asyncapi_3_schema() -> None:
    official = json.loads(gzip.decompress(OFFICIAL_SCHEMA.read_bytes()))
    problems = [
        f"{e.instance_path}: {e.message[:300]}" for e in jsonschema_rs.Draft7Validator(official).iter_errors(document())
    ]
    assert problems == []


def test_the_official_schema_catches_a_broken_document() -> None:
    """Guards the check above: a document with a wrong `action` and no `info` is rejected."""
    official = json.loads(gzip.decompress(OFFICIAL_SCHEMA.read_bytes()))
    broken = json.loads(json.dumps(document()))
    broken["operations"]["chat"]["action"] = "publish"
    assert not jsonschema_rs.Draft7Validator(official).is_valid(broken)
    del broken["info"]
    assert not jsonschema_rs.Draft7Validator(official).is_valid(broken)


def test_structure_and_references() -> None:
    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "llmbus" and doc["info"]["version"] == __version__
    for ref in refs(doc):
        resolve(doc, ref)
    for name, channel in doc["channels"].items():
        assert "address" in channel, name
        parameters = set(re.findall(r"\{(\w+)\}", channel["address"] or ""))
        assert parameters == set(channel.get("parameters", {})), f"{name}: address parameters"
        for message in channel["messages"].values():
            assert message["$ref"].startswith("#/components/messages/")
    for name, operation in doc["operations"].items():
        assert operation["action"] in {"send", "receive"}, name
        channel = operation["channel"]["$ref"]
        assert all(m["$ref"].startswith(f"{channel}/messages/") for m in operation["messages"]), name
        if (reply := operation.get("reply")) is not None:
            reply_channel = reply["channel"]["$ref"]
            assert all(m["$ref"].startswith(f"{reply_channel}/messages/") for m in reply["messages"]), name
            if "address" in reply:
                assert resolve(doc, reply_channel)["address"] is None, f"{name}: reply address and channel address"
    for name, message in doc["components"]["messages"].items():
        assert "payload" in message, name
        assert message["name"] == name


def test_message_examples_match_their_schemas_and_decode() -> None:
    doc = document()
    decoders = {"ChatRequest": codec.decode_chat_request, "BatchRequest": codec.decode_batch}
    for name, message in doc["components"]["messages"].items():
        for example in message.get("examples", []):
            if "payload" in example:
                assert errors_of(doc, message["payload"], example["payload"]) == [], f"{name}: {example['name']}"
                payload_ref = message["payload"].get("$ref", "").rsplit("/", 1)[-1]
                if payload_ref in decoders:
                    decoded = decoders[payload_ref](json.dumps(example["payload"]).encode())
                    assert not isinstance(decoded, codec.WireError), f"{name}: {decoded}"
            if "headers" in example:
                assert errors_of(doc, message["headers"], example["headers"]) == [], f"{name}: {example['name']}"


def test_cli_prints_and_writes_the_document(tmp_path: Path) -> None:
    printed = subprocess.run([*LLMBUS, "schema", "--asyncapi"], capture_output=True, text=True, timeout=60, check=True)
    assert printed.stdout == ASYNCAPI_PATH.read_text()
    out = tmp_path / "asyncapi.json"
    subprocess.run([*LLMBUS, "schema", "--asyncapi", "--out", str(out)], capture_output=True, timeout=60, check=True)
    assert out.read_text() == ASYNCAPI_PATH.read_text()
    other = subprocess.run(
        [*LLMBUS, "schema", "--asyncapi", "--subject-prefix", "acme"], capture_output=True, text=True, timeout=60
    )
    assert '"address": "acme.chat"' in other.stdout
    bad = subprocess.run(
        [*LLMBUS, "schema", "--asyncapi", "--subject-prefix", "llm.*"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "invalid subject prefix" in bad.stderr


# --- a real worker sends what the document says -------------------------------------------------------------------


def check(msg: Msg, message: str) -> None:
    """`msg` is an instance of the document's message `message`: its payload and its headers."""
    doc = document()
    spec = doc["components"]["messages"][message]
    payload = json.loads(msg.data) if msg.data else ""
    assert errors_of(doc, spec["payload"], payload) == [], f"{message}: {payload}"
    if "headers" in spec:
        assert errors_of(doc, spec["headers"], dict(msg.headers or {})) == [], f"{message}: {msg.headers}"
    else:
        assert not msg.headers, f"{message} has headers: {msg.headers}"


async def replies(nc: NATS, subject: str, body: dict | bytes, headers: dict[str, str] | None = None) -> list[Msg]:
    """Every message answered to one request, up to the empty sentinel (or a single answer that is not a stream)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await nc.publish(subject, data, reply=inbox, headers=headers)
    received: list[Msg] = []
    try:
        while True:
            received.append(msg := await sub.next_msg(timeout=240))
            if not msg.data or STREAM not in (msg.headers or {}):  # the sentinel, or an answer that is not a stream
                return received
    finally:
        await sub.unsubscribe()


@pytest.mark.model
async def test_a_worker_answers_as_the_document_says(worker: RunningWorker, nc: NATS) -> None:
    s = Subjects()
    [answer] = await replies(nc, s.chat, {"chat_id": "a", "user_prompt": "Say hi.", "max_tokens": 4})
    check(answer, "ChatResponse")

    stream = await replies(nc, s.chat, {"chat_id": "s", "user_prompt": "Count to 3.", "max_tokens": 4, "stream": True})
    *chunks, end, sentinel = stream
    assert json.loads(chunks[0].data) == {"chat_id": "s", "delta": "", "index": 0}
    for chunk in chunks:
        check(chunk, "ChatChunk")
    check(end, "ChatStreamEnd")
    check(sentinel, "StreamSentinel")
    with pytest.raises(AssertionError):  # the checks can fail: a chunk is not an end message, an answer not an error
        check(chunks[0], "ChatStreamEnd")
    with pytest.raises(AssertionError):
        check(answer, "Error")

    [error] = await replies(nc, s.chat, {"chat_id": "e", "user_prompt": "hi", "max_token": 3})
    check(error, "Error")
    [undecodable] = await replies(nc, s.chat, {"chat_id": "e", "user_prompt": "hi", "max_token": 3, "stream": True})
    check(undecodable, "Error")  # as documented: `stream` is unknown until the body decodes, so no Llmbus-Stream
    *_, stream_error, sentinel = await replies(
        nc, s.chat, {"chat_id": "e", "user_prompt": "hi", "max_tokens": 10**6, "stream": True}
    )
    check(stream_error, "Error")
    assert stream_error.headers[STREAM] == "end"
    check(sentinel, "StreamSentinel")


@pytest.mark.model
async def test_a_worker_answers_batches_as_the_document_says(worker: RunningWorker, nc: NATS) -> None:
    s = Subjects()
    queries = [{"chat_id": "a", "user_prompt": "Hi", "max_tokens": 2}, {"chat_id": "b", "user_prompt": ""}]
    [answer] = await replies(nc, s.chat_batched, {"queries": queries})
    check(answer, "BatchResponse")
    [failed] = await replies(nc, s.chat_batched, {"queries": queries[1:]})
    check(failed, "BatchFailed")
    [bad] = await replies(nc, s.chat_batched, {"queries": []})
    check(bad, "Error")
    *items, done, sentinel = await replies(nc, s.chat_batched, {"queries": queries, "stream": True})
    assert len(items) == 2
    for item in items:
        check(item, "BatchItemDone")
    check(done, "BatchDone")
    check(sentinel, "StreamSentinel")


@pytest.mark.model
async def test_a_worker_answers_discovery_as_the_document_says(worker: RunningWorker, nc: NATS) -> None:
    for verb, reply_type in DISCOVERY_REPLIES.items():
        msg = await nc.request(f"$SRV.{verb}.llm-inference", b"", timeout=10)
        check(msg, reply_type.__name__)
        msgspec.json.decode(msg.data, type=reply_type)
        instance = json.loads(msg.data)["id"]
        again = await nc.request(f"$SRV.{verb}.llm-inference.{instance}", b"", timeout=10)
        assert json.loads(again.data)["id"] == instance
