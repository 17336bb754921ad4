"""CPU per streamed message of a stream's idle timeout: an `asyncio.timeout` around each wait (before) against
`bus_gateway.idle_watch.IdleWatch` (one timer per stream), for 64 streams read in one event loop.

    python scripts/idle_timeout_cost.py [--streams 64] [--messages 400] [--rounds 3]

Each round runs both, one after the other; the figure is process CPU time over the messages read, so other load on
the machine moves it less than wall time would.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nats.aio.msg import Msg

from bus_gateway.idle_watch import IdleWatch

IDLE_S = 60.0


async def per_message_timeout(answers: asyncio.Queue[Msg], count: int) -> None:
    for _ in range(count):
        if not answers.empty():
            answers.get_nowait()
            continue
        async with asyncio.timeout(IDLE_S):
            await answers.get()


async def one_timer(answers: asyncio.Queue[Msg], count: int) -> None:
    watch = IdleWatch(answers, IDLE_S)
    for _ in range(count):
        await watch.next()
    watch.stop()


async def cpu_us_per_message(read: str, streams: int, messages: int) -> float:
    queues: list[asyncio.Queue[Msg]] = [asyncio.Queue() for _ in range(streams)]
    reader = per_message_timeout if read == "asyncio.timeout" else one_timer
    readers = [asyncio.create_task(reader(queue, messages)) for queue in queues]
    await asyncio.sleep(0)
    chunk = Msg(_client=None, subject="_INBOX.bench.1", data=b"{}")  # type: ignore[arg-type]
    started = time.process_time()
    for _ in range(messages):  # one message per stream per round, as a decode step sends them
        for queue in queues:
            queue.put_nowait(chunk)
        for _ in range(3):
            await asyncio.sleep(0)
    await asyncio.gather(*readers)
    return (time.process_time() - started) / (streams * messages) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for round_ in range(1, args.rounds + 1):
        for read in ("asyncio.timeout", "IdleWatch"):
            cost = asyncio.run(cpu_us_per_message(read, args.streams, args.messages))
            print(f"round {round_}  {read:16s} {cost:6.2f} us of CPU a message", flush=True)


if __name__ == "__main__":
    main()
