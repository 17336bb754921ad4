"""Subject names, queue group and header names, in one place.

Subjects (prefix `llm`, `--subject-prefix`):
- `llm.chat`, `llm.chat.batched`: every worker, queue group `llm-workers`. The default model, or the model a request
  names (`model`): a worker forwards a request for another model to that model's subject, with the client's reply
  subject, so the answer comes from a worker of the right model.
- `llm.model.<token>.chat`, `llm.model.<token>.chat.batched`: the workers of one model, queue group `llm-workers`.
- `llm.cancel.<request id>`: every worker, no queue group; the request's reply subject goes in `Llmbus-Reply-To`.
- `llm.worker.left`: every worker, no queue group: a worker leaving the bus (a drain, or an engine that died) says
  which model it served (`WorkerLeft`), so its peers look at the bus again before forwarding a request for that
  model to a subject nobody may serve any more. Between workers only: clients never use it.
- `llm.jobs.chat`, `llm.jobs.chat.batched`: durable jobs (stream `LLM_JOBS`, consumer `llm-workers`) for the default
  model or the one they name; `llm.jobs.model.<token>.chat[.batched]`: one model's (consumer `llm-workers-<token>`).

`<token>` is `model_token(name)`, which any language computes: a model name of 1-64 letters, digits, `_` and `-` is
its own token (`SmolLM2-135M-Instruct`), unless it ends as a hashed token does (`-` and 8 lowercase hex digits); any
other name (`Qwen/Qwen2.5-0.5B-Instruct`) becomes its letters, digits, `_` and `-` (every other character replaced by
`_`, at most 48 of them), a `-`, and the first 8 hex digits of the SHA-256 of the name in UTF-8
(`Qwen_Qwen2_5-0_5B-Instruct-4b05be1d`). So a name never takes a hashed name's token as its own: the name
`Qwen_Qwen2_5-0_5B-Instruct-4b05be1d` is hashed too (`Qwen_Qwen2_5-0_5B-Instruct-4b05be1d-28fd1090`). Two hashed
names share a token only when their first 48 characters (as replaced) and 32 bits of their digests agree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PREFIX = "llm"
DEFAULT_QUEUE_GROUP = "llm-workers"
SERVICE_NAME = "llm-inference"
JOBS_STREAM = "LLM_JOBS"  # the JetStream work queue of durable jobs
JOBS_CONSUMER = "llm-workers"  # its consumer of model-less jobs; one model's: llm-workers-<token>
MSG_ID = "Nats-Msg-Id"  # JetStream's de-duplication header; a durable job's is its reply subject
JOB_PUBLISHED = "Llmbus-Job-Published"  # a job stored again: its first publication (server time, POSIX seconds)
JOB_ATTEMPTS = "Llmbus-Job-Attempts"  # a job stored again: the deliveries charged to it before

CONTENT_TYPE = "Content-Type"
JSON = "application/json"
MSGPACK = "application/msgpack"
REQUEST_ID = "Llmbus-Request-Id"
STREAM = "Llmbus-Stream"
STREAM_CHUNK = "chunk"
STREAM_END = "end"
ERROR = "Nats-Service-Error"
ERROR_CODE = "Nats-Service-Error-Code"
ERROR_NAME = "Llmbus-Error"
REPLY_TO = "Llmbus-Reply-To"
TENANT = "Llmbus-Tenant"
PROBE = "Llmbus-Probe"  # between workers: an empty message asking the server whether anyone serves a subject
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
PROPAGATED_HEADERS = frozenset({TENANT, TRACEPARENT, TRACESTATE})  # carried from a batch to each of its queries
NATS_STATUS = "Status"
NO_RESPONDERS = "503"

# anchored for JSON Schema (asyncapi); Python matches them with `fullmatch`, as `$` also matches before an end "\n"
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MODEL_TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
UNSAFE_IN_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
DIGEST_HEX = 8  # the hex digits of SHA-256 that end a hashed token
HASHED_ENDING = re.compile(rf"-[0-9a-f]{{{DIGEST_HEX}}}$")  # how every hashed token ends


def model_token(name: str) -> str:
    """The subject token of a model name (see the module docstring)."""
    if MODEL_TOKEN_PATTERN.fullmatch(name) and not HASHED_ENDING.search(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:DIGEST_HEX]
    return f"{UNSAFE_IN_TOKEN.sub('_', name)[:48]}-{digest}"


def is_no_responders(headers: Mapping[str, str] | None) -> bool:
    """The server's no-responders status (`Status: 503`): nobody subscribed to the subject a request went to."""
    return headers is not None and headers.get(NATS_STATUS) == NO_RESPONDERS


def is_probe(headers: Mapping[str, str] | None) -> bool:
    """A probe (`PROBE`: a worker asking the server whether anyone serves a subject), not a request: its receiver
    drops it unanswered."""
    return headers is not None and PROBE in headers


def message_size(data: bytes, headers: dict[str, str] | None) -> int:
    """The bytes nats-server counts against its max payload: the payload and the header block (`NATS/1.0`, each
    `name: value`, the blank line). nats-py checks the payload alone, and a message the server finds too big makes
    it drop the whole connection, which nats-py then closes for good: so a publisher checks this first."""
    if not headers:
        return len(data)
    block = 10 + sum(len(name.encode()) + len(value.encode()) + 4 for name, value in headers.items()) + 2
    return len(data) + block


def valid_request_id(request_id: str) -> bool:
    """A request id is one NATS subject token (it names `<prefix>.cancel.<id>`): 1-128 of A-Z a-z 0-9 _ -."""
    return REQUEST_ID_PATTERN.fullmatch(request_id) is not None


@dataclass(frozen=True, slots=True)
class Subjects:
    prefix: str = DEFAULT_PREFIX

    @property
    def chat(self) -> str:
        return f"{self.prefix}.chat"

    @property
    def chat_batched(self) -> str:
        return f"{self.prefix}.chat.batched"

    @property
    def cancel_all(self) -> str:
        return f"{self.prefix}.cancel.*"

    def cancel(self, request_id: str) -> str:
        if not valid_request_id(request_id):
            raise ValueError(f"invalid request id {request_id!r}: use 1-128 characters from A-Z a-z 0-9 _ -")
        return f"{self.prefix}.cancel.{request_id}"

    @property
    def worker_left(self) -> str:
        return f"{self.prefix}.worker.left"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}.jobs.>"

    @property
    def jobs_chat(self) -> str:
        return f"{self.prefix}.jobs.chat"

    @property
    def jobs_chat_batched(self) -> str:
        return f"{self.prefix}.jobs.chat.batched"

    def model_chat(self, model: str) -> str:
        return f"{self.prefix}.model.{model_token(model)}.chat"

    def model_chat_batched(self, model: str) -> str:
        return f"{self.prefix}.model.{model_token(model)}.chat.batched"

    def model_jobs(self, model: str) -> str:
        return f"{self.prefix}.jobs.model.{model_token(model)}.>"

    def model_jobs_chat(self, model: str) -> str:
        return f"{self.prefix}.jobs.model.{model_token(model)}.chat"

    def model_jobs_chat_batched(self, model: str) -> str:
        return f"{self.prefix}.jobs.model.{model_token(model)}.chat.batched"
