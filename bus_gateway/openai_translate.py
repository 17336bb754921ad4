"""Pure functions from an OpenAI Chat Completions request to the bus request, and bus errors as OpenAI errors.
Failures are `ApiFailure` values. The way back (bus answers as OpenAI answers) is `openai_answers`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from bus_gateway.client import BusError
from bus_gateway.openai_types import ChatCompletionRequest, OpenAIErrorBody, OpenAIErrorDetail, OpenAIMessage
from schemas import ChatRequest, check_chat_request


@dataclass(frozen=True, slots=True)
class ApiFailure:
    """An OpenAI-style error: HTTP `status` and the `{"error": {message, type, param, code}}` body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> OpenAIErrorBody:
        return OpenAIErrorBody(OpenAIErrorDetail(self.message, self.type, self.param, self.code))


@dataclass(frozen=True, slots=True)
class Unsupported:
    """An OpenAI parameter llmbus cannot honour: accepted only with a value that changes nothing."""

    accepts: Callable[[Any], bool]
    why: str


def _is_none_or(*neutral: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in neutral


def _empty(value: Any) -> bool:
    return not value


def _always(_: Any) -> bool:
    return True


def _text_format(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and value.get("type") == "text")


UNSUPPORTED: dict[str, Unsupported] = {
    "n": Unsupported(_is_none_or(1), "`n` > 1 is not supported: llmbus returns exactly one choice per request"),
    "tools": Unsupported(_empty, "tools / function calling is not supported by llmbus"),
    "tool_choice": Unsupported(_is_none_or("none"), "tools / function calling is not supported by llmbus"),
    "functions": Unsupported(_empty, "function calling is not supported by llmbus"),
    "function_call": Unsupported(_is_none_or("none"), "function calling is not supported by llmbus"),
    "parallel_tool_calls": Unsupported(_always, ""),
    "logprobs": Unsupported(_is_none_or(False), "`logprobs` is not supported by llmbus"),
    "top_logprobs": Unsupported(_is_none_or(0), "`top_logprobs` is not supported by llmbus"),
    "logit_bias": Unsupported(_empty, "`logit_bias` is not supported by llmbus"),
    "presence_penalty": Unsupported(_is_none_or(0), "`presence_penalty` is not supported by llmbus (use 0)"),
    "frequency_penalty": Unsupported(_is_none_or(0), "`frequency_penalty` is not supported by llmbus (use 0)"),
    "response_format": Unsupported(_text_format, 'only `response_format: {"type": "text"}` is supported'),
    "modalities": Unsupported(lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "audio": Unsupported(_is_none_or(), "audio output is not supported by llmbus"),
    "prediction": Unsupported(_is_none_or(), "predicted outputs are not supported by llmbus"),
    "reasoning_effort": Unsupported(_is_none_or(), "`reasoning_effort` is not supported: the model does not reason"),
    "web_search_options": Unsupported(_is_none_or(), "web search is not supported by llmbus"),
    # metadata for the caller's own bookkeeping; they do not change the completion
    "store": Unsupported(_always, ""),
    "metadata": Unsupported(_always, ""),
    "service_tier": Unsupported(_always, ""),
    "prompt_cache_key": Unsupported(_always, ""),
    "prompt_cache_retention": Unsupported(_always, ""),
    "prompt_cache_options": Unsupported(_always, ""),
    "safety_identifier": Unsupported(_always, ""),
    "verbosity": Unsupported(_is_none_or("medium"), "`verbosity` other than medium is not supported by llmbus"),
    "moderation": Unsupported(_is_none_or(), "`moderation` is not supported by llmbus"),
}
# with tool_choice "none" (function_call "none"), no tool can be called: the tools are only the client's own list
UNCALLABLE_WITH_NONE = {"tool_choice": ("tools", "parallel_tool_calls"), "function_call": ("functions",)}

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_PATH = re.compile(r"at `\$\.?([^`]*)`")


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiFailure:
    return ApiFailure(400, message, param=param, code=code)


def param_of(message: str) -> str | None:
    """The parameter a msgspec error names (`... - at `$.messages[0].role``), as OpenAI's `param`."""
    match = _PATH.search(message)
    return match.group(1) or None if match else None


def parse_request(body: bytes) -> ChatCompletionRequest | ApiFailure:
    """Decode and check a request body: unsupported parameters, unknown fields and bad types are 400s, and so is
    `stream_options` (null aside) without `stream: true`."""
    if not body:
        return invalid("empty request body: expected a JSON object")
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter for bad UTF-8 in a string
        return invalid(f"malformed JSON: {exc}")
    except RecursionError:
        return invalid("malformed JSON: nested too deeply")
    if not isinstance(raw, dict):
        return invalid(f"expected a JSON object, got {type(raw).__name__}")
    for choice, uncallable in UNCALLABLE_WITH_NONE.items():
        if raw.get(choice) == "none":
            for name in uncallable:
                raw.pop(name, None)
    for name in [key for key in raw if key in UNSUPPORTED]:
        rule = UNSUPPORTED[name]
        if not rule.accepts(raw[name]):
            return invalid(rule.why, param=name, code="unsupported_parameter")
        del raw[name]
    try:
        request = msgspec.convert(raw, ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Object contains unknown field"):
            name = text.split("`")[1] if "`" in text else None
            return invalid(f"unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
        return invalid(f"invalid request: {text}", param=param_of(text))
    if request.stream_options is not None and not request.stream:  # as OpenAI and vLLM: a 400, not ignored
        return invalid("`stream_options` is only allowed when `stream` is true", param="stream_options")
    return request


def message_text(message: OpenAIMessage, index: int) -> str | ApiFailure:
    if message.tool_calls or message.function_call:
        return invalid("tool calls are not supported by llmbus", param=f"messages[{index}].tool_calls")
    content = message.content
    if content is None:
        return invalid(f"messages[{index}] has no content", param=f"messages[{index}].content")
    if isinstance(content, str):
        return content
    texts = []
    for part_index, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type")
            return invalid(
                f"only text content parts are supported, got type {kind!r}",
                param=f"messages[{index}].content[{part_index}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def to_bus_messages(messages: list[OpenAIMessage]) -> list[dict[str, str]] | ApiFailure:
    if not messages:
        return invalid("`messages` must hold at least one message", param="messages")
    out = []
    for index, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            why = "tool messages are not supported" if message.role in ("tool", "function") else "unknown role"
            return invalid(f"{why}: messages[{index}].role is {message.role!r}", param=f"messages[{index}].role")
        text = message_text(message, index)
        if isinstance(text, ApiFailure):
            return text
        out.append({"role": role, "content": text})
    return out


def to_chat_request(request: ChatCompletionRequest, chat_id: str) -> ChatRequest | ApiFailure:
    """The bus request for an OpenAI one, validated by the same rules as the worker's. A conversation of system (or
    developer) messages alone, which OpenAI answers, becomes one whose last message is the user's: the bus contract
    needs a user or assistant turn. A negative `seed` (OpenAI takes any 64-bit one) is taken modulo 2**63."""
    messages = to_bus_messages(request.messages)
    if isinstance(messages, ApiFailure):
        return messages
    if all(message["role"] == "system" for message in messages):
        messages[-1] = {**messages[-1], "role": "user"}
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    if top_p == 0:  # the limit of nucleus sampling as top_p -> 0 is greedy decoding
        temperature, top_p = 0.0, 1.0
    raw: dict[str, Any] = {
        "chat_id": chat_id,
        "messages": messages,
        "max_tokens": request.max_completion_tokens
        if request.max_completion_tokens is not None
        else request.max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": None if request.seed is None else request.seed % 2**63,
        "stop": request.stop,
        "stream": bool(request.stream),
    }
    try:
        bus_request = msgspec.convert({k: v for k, v in raw.items() if v is not None}, ChatRequest)
    except msgspec.ValidationError as exc:
        param = param_of(str(exc))
        if param == "max_tokens" and request.max_completion_tokens is not None:
            param = "max_completion_tokens"  # the name the client sent
        return invalid(f"invalid request: {exc}", param=param)
    error = check_chat_request(bus_request)
    if error is not None:
        return invalid(error.message, param="messages")
    return bus_request


def from_bus_error(exc: BusError) -> ApiFailure:
    """A bus error as OpenAI sees it, from the error table: overload is a 429, shutting down stays a 503, a prompt
    that does not fit is a 400 `context_length_exceeded`."""
    spec = exc.spec
    return ApiFailure(spec.openai_status, exc.message, spec.openai_type, None, spec.openai_code)
