"""The closed loop: C clients, each sending its next request when the previous one is fully answered. The same
loop drives every target; a target is just `send(prompt) -> RequestRecord`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from llmbus.bench.options import BenchError, progress
from llmbus.bench.stats import RequestRecord
from llmbus.bench.workload import prompt_for

Send = Callable[[str, int], Awaitable[RequestRecord]]  # (prompt, max_tokens) -> the timed request


@dataclass(slots=True)
class LoopRun:
    records: list[RequestRecord]
    wall_s: float
    time_capped: bool


async def closed_loop(
    send: Send, prompts: list[str], concurrency: int, per_client: int, max_tokens: int, time_cap: float
) -> LoopRun:
    """`per_client` requests from each of `concurrency` clients; no new request starts after `time_cap` seconds."""
    records: list[RequestRecord] = []
    start = time.perf_counter()
    cap = start + time_cap
    capped = False

    async def client(index: int) -> None:
        nonlocal capped
        for j in range(per_client):
            if time.perf_counter() >= cap:
                capped = True
                return
            records.append(await send(prompt_for(prompts, index, j, concurrency), max_tokens))

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return LoopRun(records, time.perf_counter() - start, capped)


async def warm_up(send: Send, prompts: list[str], count: int, label: str) -> float:
    """`count` untimed short requests at once, so that first forwards and connection set-up are not measured."""
    if count < 1:
        return 0.0
    start = time.perf_counter()
    records = await asyncio.gather(*(send(prompts[i % len(prompts)], 8) for i in range(count)))
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise BenchError(f"{len(failed)} of {count} warm-up requests to {label} failed: {failed[0]}")
    seconds = time.perf_counter() - start
    progress(f"warm-up ({label}): {count} requests in {seconds:.1f} s")
    return seconds
