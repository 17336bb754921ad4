"""Ahead-of-time packages of the tiny model's decode step (`aot_step.load_or_build`), built once per session or module
and shared by the tests that need one built, side by side in child processes.

A build takes 25-45 s on the 2-core test machine. tests/test_aot_step.py and tests/test_engine_compiled.py built the
same float32 packages again and again, each for a test about what a package does rather than about its build: the
frozen general step three times and the unfrozen (wide) one twice a session, and the general and one-row steps once
more in the user's cache where they were not there yet. `tiny_steps` builds each once, and all builds run on one
pool, three at a time (`build_pool`): a build is mostly one process's Python, then one g++ at a time, so builds side
by side keep both cores busy. A test copies the packages it loads (`copy_packages`) into a directory of its own: a
load marks its package used, extracts its library and tidies its directory, and several tests edit theirs. What a
build itself must show (that it happened, what it logged, what it left in its directory) is in its `Build`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import cache_dir

from helpers.tiny_model import tiny_model
from inference_worker import aot_step, step_packages
from inference_worker.attention import reduction_attention
from inference_worker.hardware import pick_threads
from inference_worker.kv_cache import SlotKVCache
from inference_worker.model_loader import LoadedModel
from inference_worker.model_runner import family_decoder

ROW_LEN = 1024  # the tiny model's decoder length in an engine, so that an engine loads the packages built here
TORN = b"half a package"  # what the general package's build found under its name: a start after a crash
THREADS = pick_threads()  # a test process's torch threads, which names and builds its packages
BUILDS_AT_ONCE = 3  # three float32 builds: 65 s side by side here, 72 s two at a time, 93 s one after another


class Build(NamedTuple):
    """One package as its build left it: `directory` holds only the build's lock, the package and the library its
    load extracted; `step` is the step the build returned; `compiler_cache` is inductor's cache directory the
    build's child compiled in; `log` is what `llmbus.engine` said at WARNING or above meanwhile, where recorded."""

    directory: Path
    package: Path
    step: Any
    was_built: bool
    decoder: nn.Module
    compiler_cache: Path
    log: str = ""


class TinySteps(NamedTuple):
    """The frozen general step (built over a torn package of its name), the frozen one-row step (`SINGLE`) and the
    unfrozen step, which reads a float32 decoder's weights (the wide step of a model that keeps its copy unfrozen).
    The same names as an engine's of the tiny float32 model with 1024-token rows: it loads them."""

    general: Build
    single: Build
    unfrozen: Build


def slot_cache(loaded: LoadedModel, rows: int = 4, row_len: int = 64) -> SlotKVCache:
    config = loaded.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return SlotKVCache(
        config.num_hidden_layers, rows, config.num_key_value_heads, head_dim, row_len, loaded.dtype, loaded.device
    )


@contextmanager
def warnings_of_this_thread() -> Iterator[list[str]]:
    """The messages `llmbus.engine` logs at WARNING or above on this thread within the block (other builds log on
    other threads of the pool meanwhile)."""
    messages: list[str] = []
    thread = threading.get_ident()
    handler = logging.Handler(logging.WARNING)
    handler.addFilter(lambda record: record.thread == thread)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("llmbus.engine")
    assert logger.isEnabledFor(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def build(
    decoder: nn.Module,
    cache: SlotKVCache,
    directory: Path,
    frozen: bool = True,
    single: bool = False,
    torn: bool = False,
) -> Build:
    """Build `decoder`'s step into `directory` (made here, empty), over a torn package of its name if `torn`. With
    the test process's threads: torch gives a thread, at its first use, the count last set anywhere, so a pool
    thread started while an in-process worker of one thread ran named and built its packages for one thread (a
    CI run: packages the tests could not find by name, and a bf16 one without parallel loops)."""
    torch.get_num_threads()  # this thread's first use, which takes the count last set
    torch.set_num_threads(THREADS)
    directory.mkdir(parents=True)
    name = step_packages.package_name(decoder, reduction_attention, frozen, single, cache.keys[0].dtype)
    package = directory / f"decode-{name}.pt2"
    if torn:
        package.write_bytes(TORN)
    compiler_cache = Path(cache_dir())
    with warnings_of_this_thread() as messages:
        step, was_built = aot_step.load_or_build(
            decoder, reduction_attention, cache.keys, cache.values, directory, frozen, single=single
        )
    return Build(directory, package, step, was_built, decoder, compiler_cache, "\n".join(messages))


@pytest.fixture(scope="session")
def build_pool() -> Iterator[ThreadPoolExecutor]:
    """The session's builds run here, `BUILDS_AT_ONCE` at a time, in the order queued: a module queues its own
    behind the ones its first tests need, and they build while those tests run. Its teardown waits for every build
    (no child left compiling at exit; a failed test may leave its module's builds unread)."""
    with ThreadPoolExecutor(BUILDS_AT_ONCE, thread_name_prefix="package-build") as pool:
        yield pool


def queue(pool: ThreadPoolExecutor, builds: dict[str, Callable[[], Build]]) -> dict[str, Future[Build]]:
    return {key: pool.submit(make) for key, make in builds.items()}


def results(futures: dict[str, Future[Build]]) -> dict[str, Build]:
    return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="session")
def tiny_step_builds(build_pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    """The three float32 builds of `tiny_steps`, queued. Their decoders are of a tiny model of their own each (the
    same seed, so the same weights and names as any other `tiny_model()`), made here: the seed is global, and the
    pool's threads would race for it. Each build has a directory of its own, and a one-row cache: its rows are
    symbolic, and workers of four rows load it."""
    root = tmp_path_factory.mktemp("tiny-steps")

    def float32_build(directory: str, **options: bool) -> Callable[[], Build]:
        tiny = tiny_model()
        decoder, cache = family_decoder(tiny, ROW_LEN), slot_cache(tiny, rows=1)
        return lambda: build(decoder, cache, root / directory, **options)

    return queue(
        build_pool,
        {
            "general": float32_build("general", torn=True),
            "single": float32_build("single", single=True),
            "unfrozen": float32_build("unfrozen", frozen=False),
        },
    )


@pytest.fixture(scope="session")
def tiny_steps(tiny_step_builds: dict[str, Future]) -> TinySteps:
    """The three float32 packages, built once for the session: test_aot_step.py asserts what their builds did and
    loads them, test_engine_compiled.py's engines load them."""
    return TinySteps(**results(tiny_step_builds))


def copy_packages(builds: Iterable[Build], directory: Path) -> list[Path]:
    """Copies of the builds' packages (not their libraries, nor locks) in `directory`, as a later start finds them,
    newly written."""
    directory.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(b.package, directory / b.package.name)) for b in builds]


def copy_build(build: Build, directory: Path) -> Path:
    """A copy of the build's whole directory, for a test that edits it; the package's copy."""
    shutil.copytree(build.directory, directory)
    return directory / build.package.name


def warm_compiler_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep inductor's cache where it is now for the rest of the test. An engine that compiles points it at
    `LLMBUS_CACHE_DIR/inductor` unless it is set (`jit_step.use_compile_cache`, `os.environ.setdefault`), and a
    test's own LLMBUS_CACHE_DIR left it on an empty directory for the rest of the process: the next build's child
    then checked the CPU's vector instruction sets from scratch (compiling the probes again, about 15 s)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", cache_dir())
