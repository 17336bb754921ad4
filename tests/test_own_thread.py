"""Blocking torch work run from the event loop leaves no OpenMP threads behind when it runs in a thread of its own
(`own_thread.py`); run in asyncio's executor, it does, and the engine's steps then lose libgomp's spinning."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from inference_worker.own_thread import in_a_thread_of_its_own


def os_threads() -> set[str]:
    """The process's OS threads, by id: sets, not counts, so that another test's thread ending meanwhile (a
    nats-server's log reader, a pool's idle thread) is not taken for one of these (CI once saw 22 for 21 + 2)."""
    return set(os.listdir("/proc/self/task"))


async def threads_settle_at(threads: set[str]) -> set[str]:
    """The OS threads started since `threads` was taken that are still alive once exiting ones are gone (polled:
    the OS gives no event for it)."""
    for _ in range(500):
        if not os_threads() - threads:
            break
        await asyncio.sleep(0.01)
    return os_threads() - threads


def parallel_cast() -> threading.Thread:
    """A torch op that runs an OpenMP parallel region (a cast of 8M elements), in the calling thread."""
    torch.ones(8 << 20).to(torch.bfloat16)
    return threading.current_thread()


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    """torch's thread count for the test: a new thread's parallel regions take the count the process last set (on
    any thread), so after another test's `set_num_threads(1)` the executor's cast started no OpenMP pool and the
    test failed (seen with two pytest processes, whose files run in another order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: torch runs no OpenMP pool")
async def test_torch_work_in_its_own_thread_leaves_no_openmp_pool_behind_unlike_the_executor(
    two_torch_threads: None,
) -> None:
    before = os_threads()
    ran_in = await in_a_thread_of_its_own(parallel_cast)
    assert ran_in is not threading.main_thread()
    ran_in.join()
    assert await threads_settle_at(before) == set()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as executor:
        await loop.run_in_executor(executor, parallel_cast)
        # the executor's idle thread, and the OpenMP pool its cast started, which lives as long as that thread
        assert len(os_threads() - before) >= 2
    assert await threads_settle_at(before) == set()


async def test_an_exception_in_its_own_thread_reaches_the_awaiting_task() -> None:
    def fail() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        await in_a_thread_of_its_own(fail)
