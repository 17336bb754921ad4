"""The AsyncAPI 3.0 document of the whole NATS interface (`llmbus schema --asyncapi`), generated from the wire Structs.

The channels and operations are in `schemas/asyncapi_channels.py`, the messages and their payload schemas in
`schemas/asyncapi_messages.py`, the header schemas in `schemas/asyncapi_headers.py`; this module writes the
description (with the error table), the components and the parameters, and assembles the document.

Addresses carry the subject prefix (default `llm`) as text, not as a `{prefix}` parameter, so that code generators
see plain subjects; `asyncapi_document(version, prefix)` writes the document of another prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.asyncapi_channels import Doc, bus_channels, bus_operations, discovery
from schemas.asyncapi_headers import Schema, header_schemas
from schemas.asyncapi_messages import answer_messages, payload_schemas, request_messages
from schemas.errors import ERRORS
from schemas.subjects import (
    DEFAULT_PREFIX,
    DEFAULT_QUEUE_GROUP,
    ERROR_NAME,
    JSON,
    NATS_STATUS,
    NO_RESPONDERS,
    Subjects,
    model_token,
)

ASYNCAPI_PATH = Path(__file__).parent / "asyncapi.json"

DESCRIPTION = """LLM chat inference over NATS. Send a chat request to `{chat}` with a reply subject (any NATS client's
request) and read the answer there. The workers of a model form the queue group `{group}`.

**Subject prefix.** Addresses here use the prefix `{prefix}`. Workers started with `--subject-prefix P` use `P.chat`
and so on (`llmbus schema --asyncapi --subject-prefix P` writes their document); `$SRV` subjects never change.

**Encoding.** Bodies are JSON. A request with `Content-Type: application/msgpack` may be MessagePack instead, and is
then answered in MessagePack (the same fields).

**Reply patterns.**
- *Single answer*: one message on the reply subject.
- *Stream* (`"stream": true`): several messages on the reply subject, the last with `Llmbus-Stream: end`, then an
  empty message, the sentinel (`nats req --replies 0` and nats.js `requestMany` stop there).
- *Error answer*: the headers `Nats-Service-Error-Code` (a number), `Nats-Service-Error` (for people) and
  `Llmbus-Error` (the name below), and an `ErrorBody`. Check the headers before decoding the body.
- *Cancel*: fire and forget, no answer.
- *Durable job*: published to JetStream; its answer comes on the subject in its `Llmbus-Reply-To` header.

When no worker listens, NATS itself answers a request at once with status {no_responders} (no responders: the
`{status}` header in some clients), which client libraries report as an error of their own.

**Errors.** Retry a retryable error (after Retry-After seconds where one is given); the others will fail again.
The table is shared by every llmbus surface (workers, the HTTP bridge, the Python client): a worker sends only some.

{errors}
"""


def error_table() -> str:
    """The error table (`schemas.errors.ERRORS`) as Markdown."""
    rows = [
        f"| `{s.name}` | {s.code} | {'yes' if s.retryable else 'no'} | {s.retry_after or ''} |" for s in ERRORS.values()
    ]
    return "\n".join(
        ["| `Llmbus-Error` | `Nats-Service-Error-Code` | retryable | Retry-After (s) |", "|---|---|---|---|", *rows]
    )


def error_name_schema() -> Schema:
    return {
        "type": "string",
        "enum": list(ERRORS),
        "description": f"The error's name (`{ERROR_NAME}`), which tells apart errors of one code.\n\n{error_table()}",
    }


def components() -> dict[str, Schema]:
    """The `components` of the document: schemas (payloads, headers, error names) and messages."""
    schemas = {**payload_schemas(), **header_schemas(), "ErrorName": error_name_schema()}
    return {"schemas": schemas, "messages": {**request_messages(), **answer_messages()}}


PARAMETERS = {
    "model_token": {
        "description": "The subject token of a model name (`schemas.subjects.model_token`), which any language "
        "computes. A name of 1-64 letters, digits, `_` and `-` is its own token, unless it ends as a hashed token "
        "does (`-` and 8 lowercase hex digits). Any other name becomes its letters, digits, `_` and `-` (every "
        "other character replaced by `_`, at most 48 of them), a `-`, and the first 8 hex digits of the SHA-256 of "
        "the name in UTF-8, so a name never takes another name's hashed token as its own.",
    },
    "request_id": {"description": "The request's `Llmbus-Request-Id` (1-128 of A-Z a-z 0-9 _ -)."},
    "service_id": {"description": "A worker instance's `id`, from a PING or INFO answer."},
}
EXAMPLE_MODELS = ("SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")


def asyncapi_document(version: str, prefix: str = DEFAULT_PREFIX) -> Doc:
    """The whole AsyncAPI 3.0 document of a bus whose workers use `prefix`."""
    s = Subjects(prefix)
    srv_channels, srv_operations = discovery()
    parameters = {name: dict(parameter) for name, parameter in PARAMETERS.items()}
    parameters["model_token"]["examples"] = [model_token(name) for name in EXAMPLE_MODELS]
    description = DESCRIPTION.format(
        chat=s.chat,
        group=DEFAULT_QUEUE_GROUP,
        prefix=prefix,
        no_responders=NO_RESPONDERS,
        status=NATS_STATUS,
        errors=error_table(),
    )
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "llmbus", "version": version, "description": description},
        "defaultContentType": JSON,
        "servers": {
            "local": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The nats-server of `llmbus up`; the bus is wherever the workers connect.",
            }
        },
        "channels": {**bus_channels(s), **srv_channels},
        "operations": {**bus_operations(), **srv_operations},
        "components": {**components(), "parameters": parameters},
    }


def asyncapi_json(version: str, prefix: str = DEFAULT_PREFIX) -> str:
    return json.dumps(asyncapi_document(version, prefix), indent=2, ensure_ascii=False) + "\n"
