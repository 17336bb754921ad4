"""The llmbus wire contract: every message that crosses NATS, as msgspec Structs.

Requests reject unknown fields, so a typo such as `max_token` is an error that names the field
instead of a setting that is silently ignored. Responses are plain data with no behaviour.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

NonEmptyStr = Annotated[str, Meta(min_length=1)]
ChatId = Annotated[str, Meta(min_length=1, max_length=256)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled"]


class Message(Struct, forbid_unknown_fields=True):
    role: Role
    content: str


class ChatRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """One chat completion. Give either `user_prompt` (with an optional `system_prompt`) or `messages`.

    `model` picks one of the models on the bus (default: the bus's default model). `priority` orders admission
    when a worker is busy: lower is served first (-10..10, default 0); waiting requests age, so none starves."""

    chat_id: ChatId
    model: ModelName | None = None
    user_prompt: NonEmptyStr | None = None
    system_prompt: str | None = None
    messages: Annotated[list[Message], Meta(min_length=1)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stop: str | Annotated[list[NonEmptyStr], Meta(max_length=16)] | None = None
    stream: bool = False
    timeout: Annotated[float, Meta(gt=0.0)] | None = None
    priority: Annotated[int, Meta(ge=-10, le=10)] = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(Struct, kw_only=True):
    chat_id: str
    response: str
    finish_reason: FinishReason
    usage: Usage
    model: str


class ChatChunk(Struct, kw_only=True, omit_defaults=True):
    """One message of a stream. The last one has `done: true` (and the `Llmbus-Stream: end` header)."""

    chat_id: str
    delta: str
    index: int
    done: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    model: str | None = None


class BatchItemError(Struct, kw_only=True):
    chat_id: str | None
    error: str
    code: int = 400


class BatchRequest(Struct, forbid_unknown_fields=True):
    """Many chats in one message. With `stream: true`, each query's result is sent as soon as it is ready."""

    queries: list[ChatRequest]
    stream: bool = False


class BatchResult(Struct, kw_only=True, omit_defaults=True):
    """One entry of a batch answer: the fields of a ChatResponse, or `{chat_id, error, code}` for a failed query."""

    chat_id: str | None
    response: str | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    model: str | None = None
    error: str | None = None
    code: int | None = None

    @classmethod
    def ok(cls, r: ChatResponse) -> BatchResult:
        return cls(chat_id=r.chat_id, response=r.response, finish_reason=r.finish_reason, usage=r.usage, model=r.model)

    @classmethod
    def failed(cls, e: BatchItemError) -> BatchResult:
        return cls(chat_id=e.chat_id, error=e.error, code=e.code)


class BatchResponse(Struct, kw_only=True, omit_defaults=True):
    responses: list[BatchResult]
    partial_success: bool = False
    message: str | None = None

    @classmethod
    def of(cls, results: list[BatchResult]) -> BatchResponse:
        """The answer to a batch: `partial_success` and a `message` when some queries failed."""
        failed = sum(r.error is not None for r in results)
        if failed == len(results):
            return cls(responses=results, message=all_failed(failed))
        if failed:
            return cls(responses=results, partial_success=True, message=some_failed(failed, len(results)))
        return cls(responses=results)


class ErrorBody(Struct):
    error: str
    code: int


class BatchItemDone(Struct, kw_only=True):
    """One message of a streamed batch: the result of query `index`, sent when it is ready (in completion order)."""

    index: int
    result: BatchResult


class BatchDone(Struct, kw_only=True):
    """The last message of a streamed batch (`Llmbus-Stream: end`)."""

    done: bool = True
    answered: int
    failed: int
    partial_success: bool = False
    message: str | None = None

    @classmethod
    def of(cls, answered: int, failed: int) -> BatchDone:
        if failed and answered:
            message = some_failed(failed, answered + failed)
            return cls(answered=answered, failed=failed, partial_success=True, message=message)
        return cls(answered=answered, failed=failed, message=all_failed(failed) if failed else None)


class WorkerLeft(Struct, kw_only=True):
    """Published on `llm.worker.left` by a worker leaving the bus: the model it served, and its micro service id."""

    model: str
    id: str


class BatchEnvelope(Struct, forbid_unknown_fields=True):
    """How a batch is decoded: each query stays raw so that one bad query fails alone."""

    queries: list[msgspec.Raw]
    stream: bool = False


def some_failed(failed: int, total: int) -> str:
    return f"{failed} of {total} queries failed; the others were answered"


def all_failed(count: int) -> str:
    return "the batch's only query failed" if count == 1 else f"all {count} queries failed"
