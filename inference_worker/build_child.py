"""The child process that builds a compiled step's package (`step_builds.build_in_child` starts it): it dies with its
worker, yields the CPU to it, builds the package from the pickled job (`aot_step.build`), and removes the compiler's
copies of the package's files from inductor's cache, taking turns there with any other build of the same package.

    python -m inference_worker.build_child JOB PACKAGE PARENT_PID THREADS
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from inference_worker import aot_step, file_lock

CHILD_NICENESS = 5  # the build yields the CPU to serving (at 10 it starved under a steady load: over 8 minutes)
PR_SET_PDEATHSIG = 1


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
    die_with_parent(int(parent))
    os.nice(CHILD_NICENESS)
    torch.set_num_threads(int(threads))
    no_autotuning_from_the_environment()
    spec = torch.load(job, weights_only=False)  # our own pickle, written a moment ago into a private directory
    Path(job).unlink()  # the weights' bytes, not needed any more
    with compiler_cache_lock(spec["name"]):
        aot_step.build(spec["step"], spec["keys"], spec["values"], Path(package), spec["frozen"], spec["single"])
        remove_compiler_copies(Path(package))


def no_autotuning_from_the_environment() -> None:
    """Build what the package's name says, whatever `TORCHINDUCTOR_MAX_AUTOTUNE*` the worker's environment holds:
    the name does not hash inductor's settings, so a package built under them would be loaded by every worker that
    shares the directory. With `TORCHINDUCTOR_MAX_AUTOTUNE=1` on the AMX Xeon, the 2-row int4 package held AMX tile
    instructions, and the process that ran it died with SIGILL: it had not asked the kernel for AMX state. The
    one-row quantized step turns autotuning on in its own build options (`aot_step.build`); the packages it made
    here held no AMX instruction."""
    torch._inductor.config.max_autotune = False
    torch._inductor.config.max_autotune_gemm = False
    torch._inductor.config.max_autotune_pointwise = False


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
