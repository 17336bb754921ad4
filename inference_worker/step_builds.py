"""Building a compiled step's package in a child process (`aot_step.build` is the compiling itself): one build of a
package at a time among the workers that share the cache directory, stoppable, and leaving no process behind.

- **A child process.** `python -m inference_worker.step_builds JOB` builds from the step the worker pickled, at a
  lower CPU priority. In the worker's own process a build broke and slowed serving: a non-strict export running
  beside eager steps made them fail (`fake_mode.in_kernel_invocation must be False`), a strict one took 11 minutes
  beside them, and the steps after an in-process build ran at 22.7 ms instead of 17.
- **One build per package.** A worker takes the package's lock (`flock` on `decode-<name>.lock`) before it builds.
  Another worker that needs the same package meanwhile (two workers started together on one host) waits for the
  lock and then loads the package built, rather than building it a second time beside the first.
- **No copy left behind.** AOTInductor compiles a package's files in inductor's cache, then copies them into the
  package, and compiles afresh at every build: the child removes its files from the cache once the package is
  written. Each SmolLM2 build left its library there before, 330 MB. Builds of one package that share inductor's
  cache take turns there (`compiler_cache_lock`), so that one's removal cannot delete the other's files.
- **No process left behind.** The child leads a process group of its own, which holds the compilers it runs (g++):
  a stopped build kills the whole group. If the worker dies, the child gets SIGTERM (`PR_SET_PDEATHSIG`) and kills
  its group. Killing the child alone, as before, left its g++ running.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from inference_worker import file_lock

log = logging.getLogger("llmbus.engine")

CHILD_NICENESS = 5  # the build yields the CPU to serving (at 10 it starved under a steady load: over 8 minutes)
PR_SET_PDEATHSIG = 1


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
        command = [sys.executable, "-m", __name__, str(job), str(built), str(os.getpid()), threads]
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


def die_with_parent(parent: int) -> None:
    """In the child: when the parent dies, get SIGTERM and kill this process group (the child and its compilers);
    exit at once if the parent is gone already. Linux only: elsewhere a killed worker may leave its build running."""
    signal.signal(signal.SIGTERM, _kill_own_group)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above took effect
        _kill_own_group()


def _kill_own_group(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)


def main(job: str, package: str, parent: str, threads: str) -> None:
    """The child's side: die with the parent, yield the CPU to it, build the package from the pickled job. With the
    parent's threads: inductor writes the kernels for that many (built on one thread, a package had no parallel
    loops, and SmolLM2's step took 24 ms at batch 1 instead of 17)."""
    from inference_worker import aot_step

    die_with_parent(int(parent))
    os.nice(CHILD_NICENESS)
    torch.set_num_threads(int(threads))
    spec = torch.load(job, weights_only=False)  # our own pickle, written a moment ago into a private directory
    Path(job).unlink()  # the weights' bytes, not needed any more
    with compiler_cache_lock(spec["name"]):
        aot_step.build(spec["step"], spec["keys"], spec["values"], Path(package), spec["frozen"], spec["single"])
        remove_compiler_copies(Path(package))


@contextlib.contextmanager
def compiler_cache_lock(name: str) -> Iterator[None]:
    """Held by a child while it builds package `name` and removes its files from inductor's cache. Two builds of one
    package for two cache directories (two `LLMBUS_CACHE_DIR`s, so two build locks) that share one inductor cache
    (`TORCHINDUCTOR_CACHE_DIR`) compile the same files, named by their hash: one build's removal deleted the
    other's sources mid-compile (`cc1plus: ... wrapper.cpp: No such file`)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    directory = Path(cache_dir())
    directory.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:
        print(f"waiting for another build of {name} in the compiler cache {directory}", flush=True)

    with file_lock.exclusive(directory / f"{name}.build.lock", on_wait=waiting):
        yield


def remove_compiler_copies(package: Path) -> None:
    """Remove from inductor's cache the files that `package` holds copies of (named by their hash), and the
    directories that held only them."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    with zipfile.ZipFile(package) as archive:
        names = {Path(name).name for name in archive.namelist() if "/aotinductor/" in name}
    stems = {name.split(".")[0] for name in names}
    emptied: set[Path] = set()
    for path in list(Path(cache_dir()).rglob("*")):
        with contextlib.suppress(OSError):  # removed meanwhile
            if path.name in names and path.is_file():
                path.unlink()
                emptied.add(path.parent)
    for directory in emptied:
        with contextlib.suppress(OSError):  # not empty: another build's files are there too
            for stem in stems & {entry.name for entry in directory.iterdir()}:
                (directory / stem).rmdir()
            directory.rmdir()


if __name__ == "__main__":
    main(*sys.argv[1:])
