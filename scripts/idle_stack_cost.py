"""Does an idle llmbus stack slow the eager ceiling down? The check behind `llmbus bench --rounds N`, which measures
the eager ceiling between the points while its stack (nats-server, worker, bridge) waits idle.

    python scripts/idle_stack_cost.py [--batch 1] [--steps 64] [--pairs 6]

Starts the bench's stack, waits until the worker's decode step is compiled and one request was answered, then
measures the transformers eager decode loop (`llmbus.bench.baselines.CeilingMeter`) in pairs: once with every
process of the stack stopped (SIGSTOP: no CPU at all, its memory still held), once with them running idle
(SIGCONT), the order alternating pair by pair (ABBA), so that a drift of the machine's speed cancels out. Prints
each measurement, and the median of the running-over-stopped ratios of the pairs: 1.0 means the idle stack costs
the eager loop nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import statistics
import tempfile
from pathlib import Path

from bus_gateway.client import BusClient
from llmbus.bench.baselines import CeilingMeter
from llmbus.bench.bus_load import wait_for_compiled, wait_for_workers
from llmbus.bench.eager import EagerModel
from llmbus.bench.http_load import wait_until_ready
from llmbus.bench.options import BenchOptions
from llmbus.bench.stack import Stack
from llmbus.bench.workload import workload
from schemas import ChatRequest


async def ready(stack: Stack, opts: BenchOptions) -> None:
    bus = await BusClient.from_config(dataclasses.replace(opts.connection, nats_url=stack.url), name="idle-cost")
    try:
        await wait_for_workers(bus, stack, 1, opts.ready_timeout)
        await wait_for_compiled(bus, stack, 1, opts.compile_timeout)
        await bus.chat(ChatRequest(chat_id="warm", user_prompt="Say hello.", max_tokens=8), timeout=120)
    finally:
        await bus.close()
    if stack.http_url:
        await wait_until_ready(stack.http_url, stack.check_alive, opts.ready_timeout)


def stack_pids(stack: Stack) -> list[int]:
    procs = [w.proc for w in stack.workers] + [p for p in (stack.bridge, stack.server and stack.server.proc) if p]
    return [p.pid for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    import torch

    from inference_worker.hardware import pick_threads

    torch.set_num_threads(pick_threads())
    model = EagerModel.load(None)
    encoded = [model.encode(p)[0] for p in workload(0)]
    meter = CeilingMeter(model, encoded, args.steps, 600.0, "hf")
    with tempfile.TemporaryDirectory() as out:
        opts = BenchOptions(http=True, out=Path(out))
        stack = Stack(opts).start()
        try:
            asyncio.run(ready(stack, opts))
            ratios = []
            for pair in range(args.pairs):
                measured = {}
                for state in ("stopped", "running") if pair % 2 == 0 else ("running", "stopped"):
                    for pid in stack_pids(stack):
                        os.kill(pid, signal.SIGSTOP if state == "stopped" else signal.SIGCONT)
                    measured[state] = meter.measure(args.batch).ceiling_tokens_per_s
                ratios.append(measured["running"] / measured["stopped"])
                print(f"pair {pair}: stopped {measured['stopped']:.1f}, running {measured['running']:.1f} tok/s")
            print(f"running idle / stopped, median of {args.pairs} pairs: {statistics.median(ratios):.3f}")
        finally:
            for pid in stack_pids(stack):
                os.kill(pid, signal.SIGCONT)
            stack.stop()


if __name__ == "__main__":
    main()
