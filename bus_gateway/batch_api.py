"""`POST /chat/batched` (llm.chat.batched): every query answered in input order, or streamed as each is ready.

The worker that receives a batch spreads its queries over every worker of the model (scatter-gather). Only valid
queries travel; an invalid one keeps its local error (the same message the worker would give), in place.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import State
from litestar.response import Stream

from bus_gateway.auth import tenant_headers
from bus_gateway.bus_errors import BusError
from bus_gateway.chat_api import ERROR_RESPONSES, bus_of, config_of, sender_of
from bus_gateway.client import BusClient
from bus_gateway.disconnect import ClientGone, unless_disconnected
from bus_gateway.http_errors import bus_error_response, client_gone, error_response, http_status
from bus_gateway.sse import SSE_HEADERS, sse_event
from schemas import (
    BatchDone,
    BatchItemDone,
    BatchItemError,
    BatchResponse,
    BatchResult,
    ChatRequest,
    ErrorBody,
    WireError,
    decode_batch,
)
from schemas.messages import all_failed


class BatchErrorBody(msgspec.Struct, kw_only=True):
    """A batch whose every query failed: the common code (else 400), and each query's own error in order."""

    error: str
    code: int
    responses: list[BatchResult]
    partial_success: bool = False


@post(
    "/chat/batched",
    status_code=200,
    summary="Many chat completions in one request (llm.chat.batched)",
    description=(
        'Body: `{"queries": [ChatRequest, ...]}`. `responses` come in input order; a failed query is '
        "`{chat_id, error, code}` and sets `partial_success` and `message`. Every query failed: 400 (or the "
        "queries' common code) with each query's error in `responses`. With `\"stream\": true` the answer is "
        "`text/event-stream`: one `data: {index, result}` event per query as soon as it is ready (invalid ones first), "
        "then `data: {done: true, answered, failed, ...}`."
    ),
    responses=ERROR_RESPONSES,
)
async def chat_batched(request: Request, state: State) -> Response[BatchResponse]:
    batch = decode_batch(await request.body())
    if isinstance(batch, WireError):
        return bus_error_response(batch)
    items = batch.items
    valid = [item for item in items if isinstance(item, ChatRequest)]
    if batch.stream:
        return await stream_batch(
            request, items, valid, bus_of(state), config_of(state).request_timeout, tenant_headers(request)
        )
    answered: list[BatchResult] | None = []
    if valid:  # only valid queries travel; the invalid ones keep their local error, in place
        try:
            sending = sender_of(state).chat_batched(
                valid, config_of(state).request_timeout, headers=tenant_headers(request)
            )
            answered = (await unless_disconnected(request, sending)).responses
        except ClientGone:
            return client_gone()
        except BusError as exc:
            answered = batch_results_of(exc)
            if answered is None:
                return bus_error_response(exc)
    if len(answered) != len(valid):
        return error_response(502, f"the worker answered {len(answered)} results for {len(valid)} queries")
    return batch_response(merge_batch(items, answered))


def merge_batch(items: list[ChatRequest | BatchItemError], answered: list[BatchResult]) -> list[BatchResult]:
    """Each query's result in input order: the worker's for the queries sent, the local error for the others."""
    results = iter(answered)
    return [BatchResult.failed(item) if isinstance(item, BatchItemError) else next(results) for item in items]


def batch_results_of(exc: BusError) -> list[BatchResult] | None:
    """The per-query results a worker's whole-batch error carries in its body (a BatchResponse), if any."""
    if not exc.body:
        return None
    try:
        return msgspec.json.decode(exc.body, type=BatchResponse).responses
    except msgspec.DecodeError:
        return None


def batch_response(results: list[BatchResult]) -> Response[Any]:
    """200 with `partial_success` when some failed; when all failed, their common code (else 400) and each error."""
    failed = [result for result in results if result.error is not None]
    if len(failed) == len(results):
        codes = {result.code or 400 for result in failed}
        code = http_status(codes.pop()) if len(codes) == 1 else 400
        error = f"{all_failed(len(failed))}; see `responses`"
        return Response(BatchErrorBody(error=error, code=code, responses=results), status_code=code)
    return Response(BatchResponse.of(results))


async def stream_batch(
    request: Request,
    items: list[ChatRequest | BatchItemError],
    valid: list[ChatRequest],
    bus: BusClient,
    idle_timeout: float,
    headers: dict[str, str],
) -> Stream | Response[Any]:
    """SSE of a streamed batch; a failure before the first result (no worker...) is an HTTP error instead. The
    first result can take a whole generation, so a client that leaves meanwhile cancels the batch then, and one
    that leaves later cancels it when the response is closed (its background task)."""
    positions = [index for index, item in enumerate(items) if isinstance(item, ChatRequest)]
    local = [
        BatchItemDone(index=i, result=BatchResult.failed(item))
        for i, item in enumerate(items)
        if not isinstance(item, ChatRequest)
    ]
    remote = bus.stream_batch(valid, idle_timeout, headers=headers) if valid else None
    first: BatchItemDone | BatchDone | None = None
    if remote is not None:
        try:
            first = await unless_disconnected(request, anext(remote))
        except ClientGone:
            await remote.aclose()
            return client_gone()
        except BusError as exc:
            await remote.aclose()
            return bus_error_response(exc)

    async def events() -> AsyncGenerator[bytes, None]:
        answered = 0
        for done in local:
            yield sse_event(msgspec.json.encode(done))
        try:
            message = first
            while message is not None and not isinstance(message, BatchDone):
                answered += message.result.error is None
                yield sse_event(
                    msgspec.json.encode(BatchItemDone(index=positions[message.index], result=message.result))
                )
                message = await anext(remote)
        except (BusError, StopAsyncIteration) as exc:
            error = (
                exc if isinstance(exc, BusError) else BusError(502, "the batch stream ended early", name="bad_reply")
            )
            yield sse_event(msgspec.json.encode(ErrorBody(error=error.message, code=error.code)), event="error")
            return
        finally:
            if remote is not None:
                await remote.aclose()
        failed = len(items) - answered
        yield sse_event(msgspec.json.encode(BatchDone.of(answered, failed)))

    body = events()
    return Stream(body, media_type="text/event-stream", headers=SSE_HEADERS, background=BackgroundTask(body.aclose))
