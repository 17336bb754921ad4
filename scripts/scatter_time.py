"""Time one batch of 32 queries (`llm.chat.batched`) served by 1 worker, then by 2 workers of the same model.

    python scripts/scatter_time.py [--queries 32] [--max-tokens 32] [--rounds 3]

Each worker is a `llmbus worker` process; with 2 they share the host's cores (each takes its fair share of threads).
The batch is spread over the queue group by the worker that takes it (scatter-gather); the figure is the wall time
of the whole batch, the median of --rounds, after one warm-up batch, once every worker's decode step is compiled.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import nats

from bus_gateway.client import BusClient
from llmbus.nats_server import NatsServer
from schemas import ChatRequest


async def time_batches(url: str, workers: int, queries: int, max_tokens: int, rounds: int) -> list[float]:
    nc = await nats.connect(url)
    bus = BusClient(nc)
    while len(await bus.ping(2.0, expect=workers)) < workers:
        await asyncio.sleep(0.5)
    while any(s["endpoints"][0]["data"].get("compile") == "compiling" for s in await bus.stats(2.0, expect=workers)):
        await asyncio.sleep(1.0)  # measure the workers as they run once their decode step is compiled
    batch = [
        ChatRequest(chat_id=f"q{i}", user_prompt=f"Write a sentence about the number {i}.", max_tokens=max_tokens)
        for i in range(queries)
    ]
    times = []
    for round_ in range(rounds + 1):
        started = time.perf_counter()
        answer = await bus.chat_batched(batch, timeout=600)
        assert not answer.partial_success, answer.message
        if round_:
            times.append(time.perf_counter() - started)
    await nc.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with NatsServer() as server:
        for workers in (1, 2):
            procs = [
                subprocess.Popen([sys.executable, "-m", "llmbus.cli", "worker", "--nats-url", server.url])
                for _ in range(workers)
            ]
            try:
                times = asyncio.run(time_batches(server.url, workers, args.queries, args.max_tokens, args.rounds))
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(120)
            print(
                f"{workers} worker(s): batch of {args.queries} x {args.max_tokens} tokens in "
                f"{statistics.median(times):.2f} s (median of {len(times)}: {', '.join(f'{t:.2f}' for t in times)})",
                flush=True,
            )


if __name__ == "__main__":
    main()
