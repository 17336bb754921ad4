"""The NATS side of the load: requests through `BusClient.stream`, timed as its chunks arrive, and what the
workers say about themselves on `$SRV.PING` / `$SRV.INFO` / `$SRV.STATS`."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bus_gateway import discovery
from bus_gateway.client import BusClient, BusError
from llmbus.bench.options import BenchError
from llmbus.bench.stack import Stack
from llmbus.bench.stats import RequestRecord
from schemas import SERVICE_NAME, ChatRequest

STATS_WINDOW_S = 2.0  # the longest wait for every worker's `$SRV.STATS` answer around a point


async def stream_over_bus(
    bus: BusClient, prompt: str, max_tokens: int, timeout: float, model: str | None = None
) -> RequestRecord:
    """One greedy streaming chat naming `model` (the one the HTTP requests name too; None: the bus default); each
    chunk's arrival time is taken as `BusClient.stream` yields it. `timeout` is the stream's idle timeout."""
    request = ChatRequest(
        chat_id=uuid.uuid4().hex,
        user_prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        model=model,
    )
    record = RequestRecord(sent=time.perf_counter())
    try:
        async with contextlib.aclosing(bus.stream(request, timeout)) as chunks:
            async for chunk in chunks:
                now = time.perf_counter()
                record.arrived(now, chunk.delta)
                if chunk.done:
                    record.end = now
                    record.finish_reason = chunk.finish_reason
                    record.usage_tokens = chunk.usage.completion_tokens if chunk.usage else None
    except BusError as exc:
        record.error = f"{exc.code} {exc.message}"
    if record.error is None and record.end is None:
        record.error = "the stream ended without its last chunk"
    return record


async def wait_for_workers(bus: BusClient, stack: Stack, count: int, timeout: float) -> list[dict[str, Any]]:
    """The `$SRV.PING` replies once `count` workers answer; BenchError when a worker dies or time runs out."""
    deadline = time.monotonic() + timeout
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        stack.check_alive()
        seen = {str(reply.get("id")): reply for reply in on_prefix(await bus.ping(), bus.subjects.prefix)}
        if len(seen) >= count:
            return list(seen.values())
        await asyncio.sleep(0.2)
    raise BenchError(f"{len(seen)} of {count} workers answered $SRV.PING.{SERVICE_NAME} after {timeout:.0f}s")


async def wait_for_compiled(bus: BusClient, stack: Stack, count: int, timeout: float) -> float:
    """Wait until `count` workers answer `$SRV.STATS` and none reports `compile: compiling` (workers serve eagerly
    while their decode step compiles, and the bench measures the engine as it runs once compiled); the seconds
    waited. A worker loading its compiled step can miss a `$SRV` request (the load holds the GIL for seconds), so
    a missing answer means not yet."""
    started = time.monotonic()
    answers: list[dict] = []
    compiling: list[dict] = []
    while time.monotonic() - started < timeout:
        stack.check_alive()
        answers = on_prefix(await bus.stats(), bus.subjects.prefix)
        compiling = [answer for answer in answers if _endpoint_data(answer).get("compile") == "compiling"]
        if len(answers) >= count and not compiling:
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise BenchError(
        f"after {timeout:.0f}s, {len(answers)} of {count} workers answered $SRV.STATS and {len(compiling)} of them "
        "were still compiling their decode step"
    )


async def worker_options(bus: BusClient) -> list[dict[str, Any]]:
    """Each worker's `$SRV.INFO` metadata (model, device, dtype, batch size and whatever options it reports)."""
    infos = on_prefix(await bus.info(), bus.subjects.prefix)
    return sorted((dict(info.get("metadata") or {}) for info in infos), key=lambda m: str(m.get("pid", "")))


def measured_model(options: list[dict[str, Any]], named: str | None = None) -> str | None:
    """The model every target is asked for, by NATS and HTTP alike, from the workers' `$SRV.INFO` metadata:
    `named` (--served-model) when a worker serves it; else the one model that claims `default_model`, else the only
    model (the bench's own workers serve one); None when no worker names its model. BenchError when the bus serves
    several and none is the default (or several claim it), or `named` is not served: the bench does not guess."""
    models = sorted({str(o["model"]) for o in options if o.get("model")})
    if named is not None:
        if named not in models:
            raise BenchError(f"--served-model {named}: no worker serves it (models: {', '.join(models) or 'none'})")
        return named
    defaults = sorted({str(o["model"]) for o in options if o.get("model") and o.get("default_model") == "true"})
    if len(defaults) == 1:
        return defaults[0]
    if len(models) <= 1 and not defaults:
        return models[0] if models else None
    claim = f"{', '.join(defaults)} all claim to be" if defaults else "none is"
    raise BenchError(
        f"the bus serves several models ({', '.join(models)}) and {claim} the default: name the one to measure "
        "with --served-model NAME"
    )


@dataclass(slots=True)
class EngineCounters:
    """From `$SRV.STATS`, one worker's or summed over workers: what the engines did (during one point)."""

    decode_steps: int = 0
    decode_tokens: int = 0
    prefill_forwards: int = 0
    prompt_tokens: int = 0
    prefix_tokens_reused: int = 0
    decode_s: float = 0.0  # seconds the engines spent in decode steps
    prefill_s: float = 0.0  # and in prefill forwards
    compile_failed: int = 0  # workers whose compiled decode step failed (they decode eagerly): a state, not a count

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_tokens / self.decode_steps if self.decode_steps else math.nan

    def minus(self, before: EngineCounters) -> EngineCounters:
        return EngineCounters(
            self.decode_steps - before.decode_steps,
            self.decode_tokens - before.decode_tokens,
            self.prefill_forwards - before.prefill_forwards,
            self.prompt_tokens - before.prompt_tokens,
            self.prefix_tokens_reused - before.prefix_tokens_reused,
            self.decode_s - before.decode_s,
            self.prefill_s - before.prefill_s,
            self.compile_failed,
        )

    def plus(self, other: EngineCounters) -> EngineCounters:
        return EngineCounters(
            self.decode_steps + other.decode_steps,
            self.decode_tokens + other.decode_tokens,
            self.prefill_forwards + other.prefill_forwards,
            self.prompt_tokens + other.prompt_tokens,
            self.prefix_tokens_reused + other.prefix_tokens_reused,
            self.decode_s + other.decode_s,
            self.prefill_s + other.prefill_s,
            self.compile_failed + other.compile_failed,
        )


@dataclass(slots=True)
class CountersDuring:
    """The engines' work during a point, over the workers that answered `$SRV.STATS` both before and after it;
    `missing`: the ids of those that answered only once (their share is not in the sums)."""

    counters: EngineCounters
    missing: list[str]


def counters_of(data: dict[str, Any]) -> EngineCounters:
    """One worker's counters from its `$SRV.STATS` endpoint data."""
    batches = data.get("decode_batch_sizes", {})
    return EngineCounters(
        decode_steps=int(data.get("decode_steps", 0)),
        decode_tokens=sum(int(size) * int(count) for size, count in batches.items()),
        prefill_forwards=int(data.get("prefill_forwards", 0)),
        prompt_tokens=int(data.get("prompt_tokens", 0)),
        prefix_tokens_reused=int(data.get("prefix_tokens_reused", 0)),
        decode_s=float(data.get("decode_seconds", 0.0)),
        prefill_s=float(data.get("prefill_seconds", 0.0)),
        compile_failed=int(data.get("compile") == "failed"),
    )


def on_prefix(replies: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """The `$SRV` replies of the workers on `prefix` (`$SRV` subjects are shared by every prefix on a server); a
    reply whose metadata names no prefix is kept."""
    return [reply for reply in replies if discovery.on_prefix(discovery.prefix_of(reply), prefix)]


async def engine_counters(bus: BusClient, expect: int | None = None) -> dict[str, EngineCounters]:
    """Each worker's counters now, by worker id (`expect`: stop waiting once that many answered; None on a server
    other prefixes share, whose workers answer too and would count before `on_prefix` drops them)."""
    replies = on_prefix(await bus.stats(STATS_WINDOW_S, expect=expect), bus.subjects.prefix)
    return {str(reply.get("id")): counters_of(_endpoint_data(reply)) for reply in replies}


def counters_during(before: dict[str, EngineCounters], after: dict[str, EngineCounters]) -> CountersDuring:
    """Per worker, after minus before, summed; a worker missing from either snapshot adds nothing but its id."""
    total = EngineCounters()
    for worker_id in before.keys() & after.keys():
        total = total.plus(after[worker_id].minus(before[worker_id]))
    total.compile_failed = sum(c.compile_failed for c in after.values())  # a state: whoever answered last
    return CountersDuring(total, sorted(before.keys() ^ after.keys()))


def _endpoint_data(stats_answer: dict[str, Any]) -> dict[str, Any]:
    endpoints = stats_answer.get("endpoints") or [{}]
    return endpoints[0].get("data") or {}
