"""Subject names, queue group and header names, in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "llm"
DEFAULT_QUEUE_GROUP = "llm-workers"
SERVICE_NAME = "llm-inference"

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
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
PROPAGATED_HEADERS = frozenset({TRACEPARENT, TRACESTATE})  # carried from a batch to each of its queries
NATS_STATUS = "Status"
NO_RESPONDERS = "503"

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def valid_request_id(request_id: str) -> bool:
    """A request id is one NATS subject token (it names `<prefix>.cancel.<id>`): 1-128 of A-Z a-z 0-9 _ -."""
    return REQUEST_ID_PATTERN.match(request_id) is not None


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
    def jobs(self) -> str:
        return f"{self.prefix}.jobs.>"

    @property
    def jobs_chat(self) -> str:
        return f"{self.prefix}.jobs.chat"

    @property
    def jobs_chat_batched(self) -> str:
        return f"{self.prefix}.jobs.chat.batched"
