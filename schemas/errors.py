"""Every error llmbus answers, in one table: what a worker puts in its micro error headers, and what the HTTP bridge
and the OpenAI layer make of it.

A worker answers an error with the ADR-32 headers `Nats-Service-Error-Code` (the `code` below, always a number)
and `Nats-Service-Error` (a message for people), plus `Llmbus-Error` (the error's `name`, for programs that must
tell apart errors that share a code, such as `overloaded` and `shutting_down`, both 503). Header values are
sanitized and bounded here (`error_headers`), so no user text reaches a header as it came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.subjects import ERROR, ERROR_CODE, ERROR_NAME

MAX_HEADER_MESSAGE = 512
MAX_BODY_MESSAGE = 4096
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    name: str
    code: int  # Nats-Service-Error-Code, and the HTTP status of the native /chat API
    openai_status: int
    openai_type: str
    retryable: bool = False
    retry_after: int | None = None  # seconds, sent as Retry-After on HTTP
    openai_code: str | None = None


ERRORS: dict[str, ErrorSpec] = {
    spec.name: spec
    for spec in (
        ErrorSpec("bad_request", 400, 400, "invalid_request_error"),
        ErrorSpec("context_length_exceeded", 400, 400, "invalid_request_error", openai_code="context_length_exceeded"),
        ErrorSpec("unauthorized", 401, 401, "invalid_request_error", openai_code="invalid_api_key"),
        ErrorSpec("forbidden", 403, 403, "invalid_request_error", openai_code="forbidden"),
        ErrorSpec("not_found", 404, 404, "invalid_request_error", openai_code="not_found"),
        ErrorSpec("model_not_found", 404, 404, "invalid_request_error", openai_code="model_not_found"),
        ErrorSpec("duplicate_request", 409, 409, "invalid_request_error", openai_code="duplicate_request"),
        ErrorSpec("too_large", 413, 413, "invalid_request_error", openai_code="request_too_large"),
        ErrorSpec("cancelled", 499, 499, "invalid_request_error", openai_code="cancelled"),
        ErrorSpec("rate_limited", 429, 429, "rate_limit_error", True, 1, "rate_limit_exceeded"),
        ErrorSpec("internal", 500, 500, "server_error", True),
        ErrorSpec("bad_reply", 502, 502, "server_error", True),
        ErrorSpec("overloaded", 503, 429, "rate_limit_error", True, 1, "overloaded"),
        ErrorSpec("shutting_down", 503, 503, "server_error", True, 1, "shutting_down"),
        ErrorSpec("no_responders", 503, 503, "server_error", True, 1, "no_responders"),
        ErrorSpec("not_connected", 503, 503, "server_error", True, 1, "not_connected"),
        ErrorSpec("timeout", 504, 504, "timeout", True, None, "timeout"),
    )
}

# the error a bare code means when no `Llmbus-Error` name came with it (a foreign service, an older worker)
BY_CODE: dict[int, str] = {
    spec.code: spec.name
    for spec in ERRORS.values()
    if spec.name
    in {"bad_request", "unauthorized", "forbidden", "not_found", "duplicate_request", "too_large", "cancelled",
        "rate_limited", "internal", "bad_reply", "shutting_down", "timeout"}
}  # fmt: skip


def error_spec(code: int, name: str | None = None) -> ErrorSpec:
    """The spec of an error from its name, else from its code; an unknown code is an internal error with that code."""
    if name and (spec := ERRORS.get(name)) is not None:
        return spec
    if (known := BY_CODE.get(code)) is not None:
        return ERRORS[known]
    if 400 <= code < 500:
        return ErrorSpec("bad_request", code, code, "invalid_request_error")
    return ErrorSpec("internal", code if 500 <= code < 600 else 500, 500, "server_error", True)


def clean_text(text: str, limit: int) -> str:
    """One line of printable text of at most `limit` characters: control characters (CR, LF...) become spaces."""
    text = _UNSAFE.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_headers(code: int, message: str, name: str | None = None) -> dict[str, str]:
    """The ADR-32 error headers (sanitized, bounded) plus `Llmbus-Error`."""
    return {
        ERROR: clean_text(message, MAX_HEADER_MESSAGE),
        ERROR_CODE: str(code),
        ERROR_NAME: error_spec(code, name).name,
    }
