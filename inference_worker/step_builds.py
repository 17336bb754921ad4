"""Building a compiled step's package in a child process (`aot_step.build` is the compiling itself): one build of a
package at a time among the workers that share the cache directory, stoppable, and leaving no process behind.

- **A child process.** `python -m inference_worker.build_child JOB ...` builds from the step the worker pickled, at
  a lower CPU priority. In the worker's own process a build broke and slowed serving: a non-strict export running
  beside eager steps made them fail (`fake_mode.in_kernel_invocation must be False`), a strict one took 11 minutes
  beside them, and the steps after an in-process build ran at 22.7 ms instead of 17.
- **One build per package.** A worker takes the package's lock (`flock` on `decode-<name>.lock`) before it builds.
  Another worker that needs the same package meanwhile (two workers started together on one host) waits for the
  lock and then loads the package built, rather than building it a second time beside the first.
- **No copy left behind.** AOTInductor compiles a package's files in inductor's cache, then copies them into the
  package, and compiles afresh at every build: the child removes its files from the cache once the package is
  written. Each SmolLM2 build left its library there before, 330 MB. Builds of one package that share inductor's
  cache take turns there (`build_child.compiler_cache_lock`), so that one's removal cannot delete the other's files.
- **No process left behind.** The child leads a process group of its own, which holds the compilers it runs (g++):
  a stopped build kills the whole group. If the worker dies, the child gets SIGTERM (`PR_SET_PDEATHSIG`) and kills
  its group. Killing the child alone, as before, left its g++ running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from inference_worker import file_lock

log = logging.getLogger("llmbus.engine")

CHILD_MODULE = "inference_worker.build_child"  # named, not imported: it imports aot_step, which imports this


class BuildStopped(Exception):
    pass


@contextlib.contextmanager
def build_lock(
    package: Path, stop: threading.Event | None = None, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Held while this worker builds `package` (`file_lock.exclusive` on `decode-<name>.lock`). Waits while another
    worker holds it, calling `on_wait` once, and raises `BuildStopped` if `stop` is set meanwhile. Makes the
    package's directory first: in a new cache directory no lock file could be made, and two workers starting
    together on a fresh host both built the same package."""

    def waiting() -> None:
        log.info("waiting for another worker's build of %s", package.name)
        if on_wait is not None:
            on_wait()

    with contextlib.suppress(OSError):  # a read-only cache: the lock says so below
        package.parent.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock.exclusive(package.with_suffix(".lock"), stop, waiting) as locked:
            if not locked:
                log.warning("no lock file can be made beside %s: another worker may build it too", package.name)
            yield
    except file_lock.Stopped:
        raise BuildStopped(f"waiting for the build of {package.name} was stopped") from None


def build_in_child(
    step: nn.Module,
    keys: list,
    values: list,
    path: Path,
    frozen: bool,
    single: bool = False,
    stop: threading.Event | None = None,
) -> None:
    """Build the package in a child process, which gets the step pickled with small example caches of the same
    layout; raises with the tail of the child's output if it fails, and `BuildStopped` if `stop` is set first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = [[_example(t) for t in tensors] for tensors in (keys, values)]
    with tempfile.TemporaryDirectory(prefix="build-", dir=path.parent) as scratch:
        job, output, built = (Path(scratch) / name for name in ("job.pt", "output.txt", "package.pt2"))
        job_spec = {"step": step, "keys": examples[0], "values": examples[1], "frozen": frozen, "single": single}
        job_spec["name"] = path.stem
        torch.save(job_spec, job)
        threads = str(torch.get_num_threads())
        command = [sys.executable, "-m", CHILD_MODULE, str(job), str(built), str(os.getpid()), threads]
        returncode = run_child(command, output, stop)
        if returncode is None:
            raise BuildStopped(f"the build of {path.name} was stopped")
        if returncode != 0:
            tail = output.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"building {path.name} failed (exit code {returncode}):\n{tail}")
        os.chmod(built, 0o644)
        os.replace(built, path)  # whole or not at all, for the workers that share the directory


def run_child(command: list[str], output: Path, stop: threading.Event | None = None) -> int | None:
    """Run `command` in a process group of its own, its output to `output`; its exit code, or None if `stop` was
    set first. However it ends (stopped, or this thread interrupted), the whole group is killed."""
    with output.open("wb") as sink:
        child = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            while child.poll() is None:
                if stop is None:
                    child.wait()
                elif stop.wait(file_lock.POLL_S):
                    return None
            return child.returncode
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)  # what the child left running in its group (compilers)
            child.wait()


def _example(cache: torch.Tensor) -> torch.Tensor:
    """Two rows whatever the cache has: export specializes a dimension of size 1 (a `--max-batch-size 1` worker's
    cache), and the build failed."""
    _, kv_heads, _, head_dim = cache.shape
    return torch.zeros((2, kv_heads, 66, head_dim), dtype=cache.dtype, device=cache.device)
