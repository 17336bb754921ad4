"""Subject names, queue group and header names, in one place."""

from __future__ import annotations

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
        return f"{self.prefix}.cancel.{request_id}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}.jobs.>"

    @property
    def jobs_chat(self) -> str:
        return f"{self.prefix}.jobs.chat"
