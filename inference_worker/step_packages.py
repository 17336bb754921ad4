"""The compiled steps' packages on disk: their names, loading one, and removing those left over (`aot_step.py`
builds them).

A package's name is a hash of everything that shapes the compiled code: the weights and buffers (their bytes, when
frozen), the modules' settings, the source of the forward, its attention and its quantized linear, torch's version
and the CPU's instruction sets. A package is written under a temporary name and renamed,
so workers that share the cache directory never load a half-written one; one that fails to load is built again.

Packages do not pile up: every package a worker loads or builds is marked used (its modification time), again
every day while it runs, and each start (`tidy`) removes the packages of its directory that no worker has used for
`UNUSED_PACKAGE_S` (a week). A warm-up marks all the packages it is about to load before its first load
(`mark_used`): that load's `tidy` keeps only its own, and removed the others after a week without a start. A package
name changes with every llmbus or torch upgrade, so the old ones went unused; a worker that needs one again
rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from inference_worker import attention, file_lock, llama, quantize
from inference_worker.hardware import cpu_flags

log = logging.getLogger("llmbus.engine")

STALE_BUILD_S = 86400
UNUSED_PACKAGE_S = 7 * 86400
MARK_USED_EVERY_S = 86400  # a running step marks its package used this often
# what shapes the compiled code: the forward, its attention, its quantized linear, and the step that exports them
_SOURCES = (
    Path(llama.__file__),
    Path(attention.__file__),
    Path(quantize.__file__),
    Path(__file__).with_name("aot_step.py"),
)


def package_name(
    decoder: nn.Module, attention: Callable, frozen: bool, single: bool = False, cache_dtype: torch.dtype | None = None
) -> str:
    """The hash that names the package of this decoder's step. A frozen package holds the weights, so their bytes
    are hashed (about 0.3 s for SmolLM2's 270 MB); an unfrozen one takes them at load, so only their shapes are.
    Buffers (the RoPE tables) are named by their shapes and the settings they are made from (`llama.py`'s `rope`),
    not by their bytes: the last bits of the float32 cos table differed between two processes in 2 of 5 tiny-model
    runs (the vectorized cos), which named a new package and rebuilt it at a warm start. The KV cache's dtype shapes
    the code too (a float32 decoder runs over bf16 caches in a bf16 worker's wide step, and over float32 ones in a
    float32 worker's), and the package does not check its inputs' dtypes: it is part of the name."""
    digest = hashlib.sha256()
    # the code is parallelized for the threads
    settings = f"frozen={frozen} single={single} threads={torch.get_num_threads()} cache={cache_dtype}"
    for part in (torch.__version__, attention.__qualname__, " ".join(sorted(cpu_flags())), settings):
        digest.update(part.encode() + b"\0")
    for source in _SOURCES:
        digest.update(source.read_bytes())
    for name, module in decoder.named_modules():
        settings = sorted((k, v) for k, v in vars(module).items() if isinstance(v, (bool, int, float, str)))
        digest.update(f"{name}:{type(module).__qualname__}:{settings}".encode())
    for name, tensor in decoder.named_parameters():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    if frozen:
        digest.update(_weights_digest(decoder))
    for name, tensor in decoder.named_buffers():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    return digest.hexdigest()[:32]


_hashing = threading.local()


@contextlib.contextmanager
def weights_hashed_once() -> Iterator[None]:
    """Within the block, this thread hashes each decoder's weights once: the packages loaded in one warm-up (a
    decoder's general and one-row steps) name the same weights, which nothing changes meanwhile. Hashing SmolLM2's
    took 0.19 s a package. Outside such a block every name hashes them again: a weight changed in place through
    another view of its storage leaves no trace on the decoder's own tensors."""
    _hashing.digests = {}
    try:
        yield
    finally:
        del _hashing.digests


def _weights_digest(decoder: nn.Module) -> bytes:
    digests: dict[nn.Module, bytes] | None = getattr(_hashing, "digests", None)
    if digests is not None and decoder in digests:
        return digests[decoder]
    digest = hashlib.sha256()
    for tensor in decoder.parameters():
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
    if digests is not None:
        digests[decoder] = digest.digest()
    return digest.digest()


def mark_used(packages: Iterable[Path]) -> None:
    """Mark these packages used now (those that exist), so that `tidy` keeps them for another week: a warm-up
    marks all of its packages before its first load, whose `tidy` keeps only the package it loads."""
    for package in packages:
        with contextlib.suppress(OSError):  # not built yet, or a read-only cache: its owner prunes it
            os.utime(package)


def tidy(directory: Path, keep: Path) -> None:
    """Remove what is left over in `directory`: the packages, other than `keep`, that nothing has loaded or built
    for `UNUSED_PACKAGE_S` (a worker that has one loaded keeps running on it: the file's data stays until it is
    unmapped), the extracted libraries whose package is gone, the scratch of builds and extractions whose worker
    was killed, and the build locks (all a day old: no build lasts that long, and a lock is touched when taken)."""
    unused = [p for p in _untouched_for(directory, "decode-*.pt2", UNUSED_PACKAGE_S) if p != keep]
    for package in unused:
        with contextlib.suppress(OSError):
            package.unlink()
    if unused:
        log.info("removed %d compiled decode step(s) unused for %d days", len(unused), UNUSED_PACKAGE_S // 86400)
    for library in directory.glob("decode-*.so"):
        if not library.with_suffix(".pt2").exists():
            with contextlib.suppress(OSError):
                library.unlink()
    for scratch in _untouched_for(directory, "build-*", STALE_BUILD_S):
        shutil.rmtree(scratch, ignore_errors=True)
    for partial in _untouched_for(directory, ".extract-*", STALE_BUILD_S):
        with contextlib.suppress(OSError):
            partial.unlink()
    for lock in _untouched_for(directory, "decode-*.lock", STALE_BUILD_S):
        file_lock.remove_if_free(lock)


def _untouched_for(directory: Path, pattern: str, seconds: float) -> list[Path]:
    """The entries of `directory` matching `pattern` whose modification time is more than `seconds` old."""
    now, old = time.time(), []
    for entry in directory.glob(pattern):
        with contextlib.suppress(OSError):  # another worker removed it first
            if now - entry.stat().st_mtime > seconds:
                old.append(entry)
    return old


def load(path: Path, step: nn.Module, frozen: bool) -> PackagedStep:
    """The package's step, run from its library (`library_of`). Unfrozen, it reads the step's own tensors."""
    compiled = _open(path)
    if not frozen:
        compiled.load_constants(dict(step.named_parameters()) | dict(step.named_buffers()))
    return compiled


def library_of(package: Path) -> Path:
    """Where a package's shared library is kept, extracted: beside the package, `decode-<name>.so`."""
    return package.with_suffix(".so")


def _open(package: Path) -> PackagedStep:
    """The package's step, loaded from its library, which the first load extracts beside the package.

    AOTInductor's own loader (`torch._inductor.aoti_load_package`) extracted the whole archive into the temp dir at
    every load: 0.2 s of every start for each of SmolLM2's two frozen packages (331 MB each), and a killed worker
    left its copy behind (a day of tests and benches here left 114 of them, 41 GB). Kept beside the package, the
    library costs as much disk again, and `tidy` removes it with its package. One that does not load is extracted
    again once; in a read-only cache directory the load takes a copy of its own in the temp dir, removed as soon
    as it is mapped (the mapping outlives the file)."""
    library = library_of(package)
    try:
        if not library.exists():
            _extract_library(package, library)
    except OSError:
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / library.name
            _extract_library(package, copy)
            return PackagedStep(copy, package)
    try:
        return PackagedStep(library, package)
    except Exception:
        log.warning("the library of %s did not load; extracting it again", package.name, exc_info=True)
        _extract_library(package, library)
        return PackagedStep(library, package)


def _extract_library(package: Path, target: Path) -> None:
    """Write the package's one shared library to `target`, whole or not at all (other workers may read it)."""
    with zipfile.ZipFile(package) as archive:
        (member,) = (name for name in archive.namelist() if name.endswith(".so"))
        handle, partial = tempfile.mkstemp(prefix=".extract-", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as sink, archive.open(member) as source:
                shutil.copyfileobj(source, sink, 1 << 22)
            os.chmod(partial, 0o644)
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise


class PackagedStep:
    """A package's step: `step(*tensors)` runs it on the flat tensors `DecodeStep.forward` takes and returns its one
    output. It runs the library through AOTInductor's CPU runner, as `torch._inductor.aoti_load_package` does, less
    three costs of that call:
    - the archive's extraction at every load (`_open`);
    - at load, a check of the CPU's vector instruction set that compiles and loads six probe libraries in child
      processes (1.0 s of every start here) only to warn when a package was built on another CPU: a package's name
      already holds this CPU's instruction sets (`package_name`);
    - at every step, flattening the call's arguments through pytree, which are flat already (26 µs a step)."""

    def __init__(self, library: Path, package: Path | None = None) -> None:
        self.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1)
        self.fqns = self.runner.get_constant_names_to_original_fqns()
        self.package = package
        self._mark_at = time.monotonic() + MARK_USED_EVERY_S

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if time.monotonic() >= self._mark_at:
            self._mark_used()
        (output,) = self.runner.run(tensors)
        return output

    def _mark_used(self) -> None:
        """Once a day, mark the package this step runs as used, so that `tidy` (at another worker's start, or at
        this one's restart after a week) keeps it: its load's mark alone is a week old after a week of serving."""
        self._mark_at = time.monotonic() + MARK_USED_EVERY_S
        if self.package is not None:
            with contextlib.suppress(OSError):  # gone, or a read-only cache: its owner prunes it
                os.utime(self.package)

    def get_constant_fqns(self) -> list[str]:
        return list(self.fqns.values())

    def load_constants(self, tensors: dict[str, torch.Tensor]) -> None:
        """Point the step at tensors it reads but does not hold (an unfrozen package): from `tensors`, by fully
        qualified name, every one it needs; they must outlive the step."""
        self.runner.update_constant_buffer({name: tensors[fqn] for name, fqn in self.fqns.items()}, False, True, True)
