"""Scatter-gather batches: the worker that receives a batch sends each query as its own request on the chat subject,
so the queue group spreads the queries over every worker of the model, then gathers the answers.

The receiving worker coordinates, so a raw NATS client that sends one message to `llm.chat.batched` gets the
spreading too. A query that a busy worker refuses (503 overloaded) is retried with backoff within its own timeout,
so a batch never fails for capacity reasons while its deadline allows. Answers keep the input order, with
`partial_success` when some queries failed; with `stream: true` each result is sent as soon as it is ready, with its
index, in completion order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from bus_gateway.bus_errors import BusError, not_served
from bus_gateway.client import BusClient
from inference_worker.held import Replier
from inference_worker.replies import SENTINEL, headers_for
from schemas import (
    Batch,
    BatchDone,
    BatchItemDone,
    BatchItemError,
    BatchResponse,
    BatchResult,
    ChatRequest,
    WireError,
    encode,
)
from schemas.errors import ERRORS, error_spec
from schemas.subjects import REQUEST_ID, STREAM, STREAM_CHUNK, STREAM_END

Item = ChatRequest | BatchItemError
Named = tuple[int, BatchResult, str]  # a query's index, its result, and (when it failed) its error's name
Headers = Mapping[str, str] | None
Knows = Callable[[str], Awaitable[bool]]
Listing = Callable[[], str]


class BatchCoordinator:
    def __init__(self, client: BusClient, default_timeout: float, knows: Knows, listing: Listing) -> None:
        self.client = client
        self.default_timeout = default_timeout
        self.knows = knows  # is a model on the bus? (a query for an unknown model fails at once, not after retries)
        self.listing = listing  # the models on the bus, as an unknown model's error names them

    async def answer(
        self, req: Replier, kind: str, batch: Batch, batch_id: str, headers: Headers, age: float = 0.0
    ) -> int | None:
        """Run `batch` and answer `req`: one message in input order, or (with `stream`) each result as it is ready,
        then the end message and the sentinel. Returns the error code it answered when every query failed. `age`:
        seconds since the batch was sent (a durable job's wait in the queue), taken off each query's timeout."""
        if not batch.stream:
            answer, names = await self._gather_named(batch.items, headers, age)
            if all(r.error is not None for r in answer.responses):
                code = common_code(answer.responses)
                failure = WireError(code, answer.message or "every query failed", common_name(names, code))
                await req.respond_error(failure, encode(answer, kind), headers_for(kind))
                return failure.code
            await req.respond(encode(answer, kind), headers_for(kind))
            return None
        answered = failed = 0
        async for index, result in self.as_completed(batch.items, headers, age):
            failed += result.error is not None
            answered += result.error is None
            chunk = encode(BatchItemDone(index=index, result=result), kind)
            await req.respond(chunk, headers_for(kind, {STREAM: STREAM_CHUNK, REQUEST_ID: batch_id}), final=False)
        end = encode(BatchDone.of(answered, failed), kind)
        await req.respond(end, headers_for(kind, {STREAM: STREAM_END, REQUEST_ID: batch_id}))
        await req.respond(SENTINEL.data, None, final=False)
        return None

    async def gather(self, items: list[Item], headers: Headers = None, age: float = 0.0) -> BatchResponse:
        """Every query's result in input order."""
        return (await self._gather_named(items, headers, age))[0]

    async def _gather_named(self, items: list[Item], headers: Headers, age: float) -> tuple[BatchResponse, list[str]]:
        """Every query's result in input order, and the name of each query's error ("" for an answered one)."""
        results: list[BatchResult | None] = [None] * len(items)
        names = [""] * len(items)
        async with contextlib.aclosing(self._completed(items, headers, age)) as completed:
            async for index, result, name in completed:
                results[index], names[index] = result, name
        return BatchResponse.of([r for r in results if r is not None]), names

    async def as_completed(
        self, items: list[Item], headers: Headers = None, age: float = 0.0
    ) -> AsyncIterator[tuple[int, BatchResult]]:
        """(index, result) of each query as it finishes; the invalid ones first. Closing the iterator early (or
        cancelling the task that reads it) cancels the queries still running, on their workers too."""
        async with contextlib.aclosing(self._completed(items, headers, age)) as completed:
            async for index, result, _ in completed:
                yield index, result

    async def _completed(self, items: list[Item], headers: Headers, age: float) -> AsyncIterator[Named]:
        """`as_completed`, with each failed query's error name (a `BatchResult` carries only its code), so that a
        batch whose every query failed is answered with their error, not the default one for its code."""
        sent, items = items, await self._unknown_models_failed(items)
        tasks = {
            asyncio.ensure_future(self._one(index, item, headers, age))
            for index, item in enumerate(items)
            if isinstance(item, ChatRequest)
        }
        try:
            for index, item in enumerate(items):
                if isinstance(item, BatchItemError):
                    # one that was a query named a model nobody serves; the others could not be read
                    name = "model_not_found" if isinstance(sent[index], ChatRequest) else error_spec(item.code).name
                    yield index, BatchResult.failed(item), name
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _unknown_models_failed(self, items: list[Item]) -> list[Item]:
        """Queries that name a model nobody serves become a 404 at once (the others are sent, and retried while their
        model's workers are busy or restarting). Every name is asked about at once, so the names share one look at
        the bus (`routing.ModelDirectory.refresh`) rather than taking one each."""
        named = sorted({item.model for item in items if isinstance(item, ChatRequest) and item.model})
        served = await asyncio.gather(*(self.knows(model) for model in named))
        unknown = {model for model, known in zip(named, served, strict=True) if not known}
        if not unknown:
            return items
        return [
            unknown_model(item, self.listing()) if isinstance(item, ChatRequest) and item.model in unknown else item
            for item in items
        ]

    async def _one(self, index: int, query: ChatRequest, headers: Headers, age: float) -> Named:
        """One query, retried with backoff while its model's workers are busy or restarting (within its timeout);
        when no worker answers at all, it is retried only while its model is still on the bus. A query whose
        timeout passed before it started (`age`: it waited that long) is a 504 at once, as a chat job is."""
        loop = asyncio.get_running_loop()
        timeout = query.timeout - age if query.timeout else self.default_timeout
        if timeout <= 0:
            expired = "deadline exceeded before generation started"
            return index, BatchResult.failed(BatchItemError(chat_id=query.chat_id, error=expired, code=504)), "timeout"
        deadline = loop.time() + timeout
        for attempt in itertools.count():
            try:
                answer = await self.client.chat(query, max(deadline - loop.time(), 0.001), retries=0, headers=headers)
            except BusError as exc:
                delay = self.client.backoff_delay(attempt)
                gone = exc.name == "no_responders" and query.model is not None and not await self.knows(query.model)
                if gone:
                    return index, BatchResult.failed(unknown_model(query, self.listing())), "model_not_found"
                if not exc.come_back_later or loop.time() + delay >= deadline:
                    failed = BatchItemError(chat_id=query.chat_id, error=exc.message, code=exc.code)
                    return index, BatchResult.failed(failed), exc.name
                await asyncio.sleep(delay)
                continue
            return index, BatchResult.ok(answer), ""
        raise AssertionError("unreachable")


def unknown_model(query: ChatRequest, listing: str) -> BatchItemError:
    return BatchItemError(chat_id=query.chat_id, error=not_served(str(query.model), listing), code=404)


def common_code(results: list[BatchResult]) -> int:
    """The code of a batch whose every query failed: theirs when they share one, else 400."""
    codes = {r.code for r in results}
    return (codes.pop() or 400) if len(codes) == 1 else 400


def common_name(names: list[str], code: int) -> str:
    """The error name of a batch whose every query failed with `code` (`common_code`): theirs when they share one
    that has that code, else "" (the default name for the code, `schemas.errors.BY_CODE`). A shared `shutting_down`
    is a stopping worker's, not this one's: it stays "" (the same header), so that a durable batch is charged a
    delivery rather than stored again as if its coordinator stopped (`durable.Job.respond_error`)."""
    shared = set(names)
    name = shared.pop() if len(shared) == 1 else ""
    if name == "shutting_down" or (spec := ERRORS.get(name)) is None or spec.code != code:
        return ""
    return name
