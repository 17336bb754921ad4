"""Where the compiled decode step is compiled and warmed up: off the engine thread, so the engine serves eagerly
meanwhile, on a thread chosen by device.

- CPU: a thread of its own per warm-up, which ends with it. A thread that stays alive after running compiled code
  kept the engine thread's compiled steps on 1.3 of 2 cores (32 ms a token, against 19 ms when the warm-up thread
  had ended and 24.5 ms eager; SmolLM2 in a worker on this machine): its OpenMP team outlives the warm-up. So a
  warm-up gets every package (`aot_step.py`) before it runs any step, and its team lives for those few steps only,
  not through minutes of waiting for a build.
- CUDA: the process's one compile thread, for every warm-up. CUDA graph trees keep their state per thread, and a
  second decoder warmed up on another thread failed to record (an AssertionError in cudagraph_trees, seen on an
  H200 with torch 2.11).

While a warm-up runs, the interpreter switches threads every 50 us instead of every 5 ms (`sys.setswitchinterval`).
A compile is Python that rarely lets go of the GIL, and the engine thread gives the GIL up at every torch op, then
waits a whole interval to get it back: with the default, an eager SmolLM2 worker on one thread managed 8 steps
in the 71 s of a frozen compile; with 50 us, 233 steps in 60 s (0.2 ms: 112). The default comes back when the last
warm-up ends.

A process must not exit while a warm-up runs (inductor's native code aborts the interpreter's exit: "terminate
called without an active exception"), so `compiling()` tells `llmbus.cli.run` to leave with `os._exit`.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

_lock = threading.Lock()
_running = 0
_cuda_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_cuda_thread: threading.Thread | None = None
_cpu_threads: list[threading.Thread] = []
WARM_UP_SWITCH_INTERVAL = 50e-6
_switch_interval = sys.getswitchinterval()


def submit(job: Callable[[], None], on_cuda: bool) -> None:
    """Run `job` in the background: on the CUDA compile thread, or on a daemon thread of its own (CPU)."""
    global _cuda_thread
    with _lock:
        if not on_cuda:
            thread = threading.Thread(target=_counted, args=(job,), name="llmbus-compile", daemon=True)
            _cpu_threads[:] = [t for t in _cpu_threads if t.is_alive()] + [thread]
            thread.start()
            return
        if _cuda_thread is None:
            _cuda_thread = threading.Thread(target=_run_cuda_jobs, name="llmbus-compile-cuda", daemon=True)
            _cuda_thread.start()
    _cuda_jobs.put(job)


def compiling() -> bool:
    """Whether a warm-up is running or queued now."""
    return _running > 0 or not _cuda_jobs.empty()


def wait_until_idle(timeout: float | None = None) -> bool:
    """Wait for every warm-up started so far (stopped engines skip theirs); True once none runs."""
    with _lock:
        threads = list(_cpu_threads)
        cuda = _cuda_thread is not None
    for thread in threads:
        thread.join(timeout)
    if cuda:
        done = threading.Event()
        _cuda_jobs.put(done.set)
        done.wait(timeout)
    return not compiling()


def _counted(job: Callable[[], None]) -> None:
    global _running, _switch_interval
    with _lock:
        if _running == 0:
            _switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(WARM_UP_SWITCH_INTERVAL)
        _running += 1
    try:
        job()
    finally:
        with _lock:
            _running -= 1
            if _running == 0:
                sys.setswitchinterval(_switch_interval)


def _run_cuda_jobs() -> None:
    while True:
        _counted(_cuda_jobs.get())
