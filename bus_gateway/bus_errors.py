"""`BusError`: every failure a bus client sees, named after its row in the error table (`schemas.errors`)."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from nats.aio.msg import Msg

from schemas import ErrorBody
from schemas.errors import ErrorSpec, error_spec
from schemas.subjects import ERROR, ERROR_CODE, ERROR_NAME, is_no_responders

T = TypeVar("T")


class BusError(Exception):
    """A chat that failed. `code` follows HTTP; `name` is its row in `schemas.errors.ERRORS` (`overloaded`,
    `shutting_down`, `no_responders`, `timeout`, `not_connected`, `context_length_exceeded`, ...)."""

    def __init__(self, code: int, message: str, body: bytes | None = None, *, name: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.body = body
        self.spec: ErrorSpec = error_spec(code, name)
        self.name = self.spec.name

    @property
    def retryable(self) -> bool:
        """The same request may succeed if sent again (the error table's `retryable`)."""
        return self.spec.retryable

    @property
    def come_back_later(self) -> bool:
        """Overload, shutdown, no worker, a dropped connection: retry after a short wait (`Retry-After` on HTTP)."""
        return self.spec.retry_after is not None

    def __repr__(self) -> str:
        return f"BusError(code={self.code}, name={self.name!r}, message={self.message!r})"


def error_from_reply(msg: Msg, subject: str) -> BusError | None:
    """The error a reply carries: a no-responders status from the server, or a worker's micro error headers."""
    headers = msg.headers or {}
    if is_no_responders(headers) and not msg.data:
        return no_responders(subject)
    code_text = headers.get(ERROR_CODE)
    if code_text is None:
        return None
    try:
        code = int(code_text)
    except ValueError:
        code = 500
    message = headers.get(ERROR)
    if not message:
        body = try_decode(msg.data, ErrorBody)
        message = body.error if body is not None else "worker error with no description"
    return BusError(code, message, msg.data or None, name=headers.get(ERROR_NAME))


def no_responders(subject: str) -> BusError:
    return BusError(503, f"no inference worker is listening on {subject}", name="no_responders")


def no_reply(timeout: float, idle: bool = False) -> BusError:
    what = "no message" if idle else "no reply"
    return BusError(504, f"{what} from a worker within {timeout:g}s", name="timeout")


def not_connected(state: str) -> BusError:
    return BusError(503, f"not connected to NATS ({state}); try again shortly", name="not_connected")


def too_large(size: int, limit: int, what: str = "request") -> BusError:
    """A message over the server's max payload, its headers counted (`schemas.subjects.message_size`)."""
    return BusError(413, f"{what} of {size} bytes exceeds the NATS max payload of {limit} bytes", name="too_large")


def not_served(model: str, listing: str) -> str:
    """The message of a `model_not_found`: the model asked for and the models on the bus, wherever it is refused (the
    bridge, a worker's routing, a batch's query)."""
    return f"the model `{model}` is not served on this bus; models on the bus: {listing}"


def model_not_found(model: str, served: list[str]) -> BusError:
    return BusError(404, not_served(model, ", ".join(served)), name="model_not_found")


def no_durable_worker(model: str, takers: list[str] | None = None) -> BusError:
    """A durable job for `model`, whose workers are on the bus but none reads its job queue (none runs `--durable`);
    `takers`: the models whose workers do, when known."""
    message = f"the model `{model}` is on this bus, but none of its workers takes durable jobs (--durable)"
    if takers is not None:
        message += f"; models whose workers take durable jobs: {', '.join(takers) or 'none'}"
    return BusError(404, message, name="model_not_found")


def decode_reply(data: bytes, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=type_)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # msgspec's errors for bad JSON
        raise BusError(502, f"invalid reply from a worker: {exc}", data, name="bad_reply") from None


def try_decode(data: bytes, type_: type[T]) -> T | None:
    try:
        return msgspec.json.decode(data, type=type_) if data else None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
