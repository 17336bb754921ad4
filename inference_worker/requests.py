"""Pure request handling: from a message's bytes and headers to a chat the engine can run, or a `WireError`.

Nothing here touches NATS or the engine, so every rule is testable on its own. Decoding and validation run in the
handler (cheap); applying the chat template and tokenizing (`prepare`) run in the engine thread, off the event loop.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jinja2.exceptions
import msgspec

from inference_worker.engine import Failed
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence
from llmbus.tracing import trace_headers
from schemas import (
    Batch,
    BatchItemError,
    ChatRequest,
    WireError,
    conversation,
    decode_batch,
    decode_chat_request,
    stop_strings,
)
from schemas.codec import at_query
from schemas.subjects import REQUEST_ID, TENANT, valid_request_id

EncodeChat = Callable[[list[dict[str, str]]], tuple[list[int], int]]


@dataclass(frozen=True, slots=True)
class Limits:
    """What a worker accepts. `context_window` is the engine's (prompt + completion tokens)."""

    max_tokens_cap: int
    max_batch_queries: int
    context_window: int


def tenant_of(headers: Mapping[str, str] | None) -> str | WireError:
    """The `Llmbus-Tenant` header (1-128 of A-Z a-z 0-9 _ -), or "" (everyone without one shares one turn)."""
    given = (headers or {}).get(TENANT)
    if given is None:
        return ""
    if not valid_request_id(given):
        return WireError.of("bad_request", f"invalid {TENANT} header: use 1-128 characters from A-Z a-z 0-9 _ -")
    return given


def propagated(headers: Mapping[str, str] | None) -> dict[str, str] | WireError:
    """The headers a batch passes on to each of its queries: its valid trace context (`tracing.trace_headers`) and
    its tenant, checked as a request's own are. Copied as they came, a bad or huge one went out on every query."""
    carried: dict[str, str] = dict(trace_headers(headers))
    tenant = tenant_of(headers)
    if isinstance(tenant, WireError):
        return tenant
    if tenant:
        carried[TENANT] = tenant
    return carried


def request_id_of(headers: Mapping[str, str] | None) -> str | WireError:
    """The client's `Llmbus-Request-Id`, or a fresh one when it gave none."""
    given = (headers or {}).get(REQUEST_ID)
    if given is None:
        return uuid.uuid4().hex
    if not valid_request_id(given):
        return WireError.of("bad_request", f"invalid {REQUEST_ID} header: use 1-128 characters from A-Z a-z 0-9 _ -")
    return given


def parse_chat(data: bytes, kind: str, *, durable: bool = False) -> ChatRequest | WireError:
    request = decode_chat_request(data, kind)
    if isinstance(request, WireError):
        return request
    if request.stream and durable:
        return WireError.of("bad_request", "`stream` is not available for durable jobs; use core request-reply")
    return request


def parse_batch(data: bytes, kind: str, model: str | None = None) -> Batch | WireError:
    """Each query decoded on its own; those that name no model get `model` (the model whose subject it came on)."""
    batch = decode_batch(data, kind)
    if isinstance(batch, WireError):
        return batch
    items: list[ChatRequest | BatchItemError] = []
    for index, item in enumerate(batch.items):
        if isinstance(item, ChatRequest) and item.stream:
            why = at_query("`stream` is not supported on a query of a batch", index, ".stream")
            item = BatchItemError(chat_id=item.chat_id, error=why, code=400)
        elif isinstance(item, ChatRequest) and item.model is None and model is not None:
            item = msgspec.structs.replace(item, model=model)
        items.append(item)
    return Batch(items, batch.stream)


def check_batch(batch: Batch, limits: Limits, durable: bool) -> WireError | None:
    if len(batch.items) > limits.max_batch_queries:
        return WireError.of(
            "too_large",
            f"batch has {len(batch.items)} queries; the limit is {limits.max_batch_queries} (max_batch_queries)",
        )
    if batch.stream and durable:
        return WireError.of("bad_request", "`stream` is not available for durable jobs; use core request-reply")
    return None


def check_max_tokens(request: ChatRequest, limits: Limits) -> WireError | None:
    if request.max_tokens is not None and request.max_tokens > limits.max_tokens_cap:
        return WireError.of(
            "bad_request",
            f"max_tokens {request.max_tokens} exceeds this worker's limit of {limits.max_tokens_cap} (max_tokens_cap)",
        )
    return None


def fit_max_tokens(request: ChatRequest, prompt_tokens: int, limits: Limits) -> int | WireError:
    """The completion budget: the asked `max_tokens` if prompt + it fits the context window; without `max_tokens`,
    the room left in the window, at most `max_tokens_cap`. Never silently shortened."""
    room = limits.context_window - prompt_tokens
    asked = request.max_tokens
    if room < 1 or (asked is not None and asked > room):
        wanted = f" plus max_tokens {asked}" if asked is not None else ""
        return WireError.of(
            "context_length_exceeded",
            f"this model's context window is {limits.context_window} tokens; the prompt has {prompt_tokens} tokens"
            f"{wanted}, which leaves {'no' if room < 1 else room} tokens for the completion",
        )
    return asked if asked is not None else min(room, limits.max_tokens_cap)


def prepare(
    engine_id: str,
    request: ChatRequest,
    encode_chat: EncodeChat,
    limits: Limits,
    deadline: float | None,
    tenant: str = "",
) -> Sequence | Failed:
    """Template and tokenize a request into an engine `Sequence` (runs in the engine thread). A conversation the
    model's chat template refuses (Mistral's and Llama 2's raise when roles do not alternate) is the request's 400,
    not a retryable 500."""
    try:
        prompt_ids, prefix_len = encode_chat(conversation(request))
    except jinja2.exceptions.SecurityError:
        raise  # the template itself is unsafe: the server's problem
    except jinja2.exceptions.TemplateError as exc:
        return Failed(engine_id, 400, f"the model's chat template refused these messages: {exc}", name="bad_request")
    max_tokens = fit_max_tokens(request, len(prompt_ids), limits)
    if isinstance(max_tokens, WireError):
        return Failed(engine_id, max_tokens.code, max_tokens.message, name=max_tokens.name)
    params = SamplingParams(
        max_tokens, request.temperature, request.top_p, request.top_k, request.seed, stop_strings(request)
    )
    return Sequence(
        engine_id,
        prompt_ids,
        params,
        stream=request.stream,
        deadline=deadline,
        prefix_len=prefix_len,
        tenant=tenant,
        priority=request.priority,
    )


def deadline_of(request: ChatRequest, age: float = 0.0, now: float | None = None) -> float | None:
    """The monotonic time after which nobody waits for this answer: its `timeout`, counted from its publication."""
    if request.timeout is None:
        return None
    return (time.monotonic() if now is None else now) + request.timeout - age
