"""Answers that must fit the server's max payload, its headers counted (`schemas.subjects.message_size`).

nats-py checks the payload alone, and a message that is over only with its headers makes the server drop the worker's
connection. So every answer is checked first (`answer_too_large`), and one that would not fit goes out as a 413
(`too_large`, naming the size and the limit, never the contents) in its place (`in_its_place`): a core request's
(`micro.Request`), a durable job's (`durable.Job._final`) and a `$SRV` answer's (`DiscoveryAnswers`). A request or
job records the 413 it answered (`too_large`), so that the outbox counts it as a 413, never as a success
(`outbox.too_large_of`).
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client as NATS

from bus_gateway.bus_errors import too_large
from schemas import ErrorBody, WireError, content_type, encode
from schemas.errors import error_headers
from schemas.subjects import STREAM, STREAM_END, message_size

log = logging.getLogger("llmbus.micro")


def answer_too_large(nc: NATS, data: bytes, headers: dict[str, str] | None, what: str = "answer") -> WireError | None:
    """The 413 to answer in place of a message over the server's max payload, its headers counted; None if it fits."""
    if (size := message_size(data, headers)) <= nc.max_payload:
        return None
    error = too_large(size, nc.max_payload, what)
    return WireError(error.code, error.message, error.name)


def in_its_place(error: WireError, headers: dict[str, str] | None) -> tuple[bytes, dict[str, str]]:
    """The 413 message that goes out in place of one with `headers`: those headers (a request id, a content type)
    with the error's on top, and on a stream as its end message; its body an `ErrorBody`, encoded as they say."""
    headers = {**(headers or {}), **error_headers(error.code, error.message, error.name or None)}
    if STREAM in headers:
        headers[STREAM] = STREAM_END
    return encode(ErrorBody(error.message, error.code), content_type(headers)), headers


async def publish_in_its_place(nc: NATS, reply: str, error: WireError, headers: dict[str, str] | None) -> None:
    """Publish the 413 `error` to `reply` in place of a message with `headers` (`in_its_place`): on a stream as its
    end message, followed by the sentinel (`replies.SENTINEL`). A 413 that does not fit either (a max payload of a few
    hundred bytes) is never published: that raises `MaxPayloadError`, as nats-py does for a payload over the limit."""
    data, headers = in_its_place(error, headers)
    if answer_too_large(nc, data, headers) is not None:
        raise nats.errors.MaxPayloadError
    await nc.publish(reply, data, headers=headers)
    if STREAM in headers:
        await nc.publish(reply, b"")


class DiscoveryAnswers:
    """The `$SRV` answers of a service (`micro.MicroService`). One that would not fit the max payload (a worker's
    STATS is several KB) is an ADR-32 413 error in its place, headers only, as NATS services answer a discovery request
    that failed (none when even that would not fit), and a warning names its size and the limit, never its contents:
    once per verb, since any client may ask again and again."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.too_large: set[str] = set()  # the verbs whose answer did not fit (warned)

    async def publish(self, verb: str, reply: str, data: bytes) -> None:
        if (error := answer_too_large(self.nc, data, None, f"$SRV.{verb} answer")) is None:
            return await self.nc.publish(reply, data)
        if verb not in self.too_large:
            self.too_large.add(verb)
            log.warning("%s; answering 413 (raise the server's max_payload to read it)", error.message)
        headers = error_headers(error.code, error.message, error.name or None)
        if answer_too_large(self.nc, b"", headers) is None:
            await self.nc.publish(reply, b"", headers=headers)
