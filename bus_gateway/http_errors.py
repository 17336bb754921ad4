"""Errors as HTTP responses, from the one error table (`schemas.errors`): status, `Retry-After`, and the body shape
of the API that was called (`{"error", "code"}` for /chat, OpenAI's `{"error": {...}}` for /v1)."""

from __future__ import annotations

from litestar import Response

from bus_gateway.bus_errors import BusError
from schemas import ErrorBody, WireError
from schemas.errors import ErrorSpec, error_spec


def http_status(code: int) -> int:
    return code if 400 <= code <= 599 else 502


def retry_headers(spec: ErrorSpec) -> dict[str, str]:
    return {"Retry-After": str(spec.retry_after)} if spec.retry_after is not None else {}


def error_response(code: int, message: str, name: str | None = None) -> Response[ErrorBody]:
    status = http_status(code)
    spec = error_spec(status, name)
    return Response(ErrorBody(error=message, code=status), status_code=status, headers=retry_headers(spec))


def bus_error_response(exc: BusError | WireError) -> Response[ErrorBody]:
    return error_response(exc.code, exc.message, exc.name)


def unavailable(message: str) -> Response[ErrorBody]:
    return error_response(503, message, "not_connected")


def client_gone() -> Response[ErrorBody]:
    """For a client that has already disconnected (nginx's 499): nobody reads it, but ASGI wants a response."""
    return Response(ErrorBody(error="client closed the request", code=499), status_code=499)
