"""The ahead-of-time packages of a `CompiledDecode`'s graphs on CPU (`aot_step.py`): each graph's package loaded from
the cache directory, or built there first, and shared by every engine of the process on the same decoder (a second
engine of one model loads nothing again)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from torch import nn

from inference_worker import aot_step, step_builds, step_packages
from inference_worker.kv_cache import SlotKVCache

log = logging.getLogger("llmbus.engine")

_loaded: weakref.WeakKeyDictionary[nn.Module, dict[bool, aot_step.DecodeFn]] = weakref.WeakKeyDictionary()


class Graph(NamedTuple):
    """What names a graph's package: its decoder, whether its weights are frozen in, and whether it is the step of
    one token and one logit."""

    decoder: nn.Module
    frozen: bool
    single: bool


def loaded_here(graph: Graph) -> aot_step.DecodeFn | None:
    """The package of `graph` that an engine of this process already loaded, if any."""
    return _loaded.get(graph.decoder, {}).get(graph.single)


def mark_used(directory: Path, graphs: Iterable[Graph], attention: Callable, cache: SlotKVCache) -> None:
    """Mark used, before any of them loads, the packages of every graph a warm-up loads: each load tidies the
    directory (`step_packages.tidy`) and keeps only its own package, so after a week without a start the first
    load removed the others, and each was built again (minutes)."""
    packages = []
    for graph in graphs:
        if loaded_here(graph) is None:
            try:
                packages.append(directory / f"decode-{_name(graph, attention, cache)}.pt2")
            except Exception:  # its load fails the same way, and says so
                log.debug("no package name for a decode step", exc_info=True)
    step_packages.mark_used(packages)


def _name(graph: Graph, attention: Callable, cache: SlotKVCache) -> str:
    """The name of `graph`'s package, as `aot_step.load_or_build` names it."""
    dtype = cache.keys[0].dtype
    return step_packages.package_name(graph.decoder, attention, graph.frozen, graph.single, cache_dtype=dtype)


def load_or_build(
    graph: Graph,
    attention: Callable,
    cache: SlotKVCache,
    directory: Path,
    stop: threading.Event,
    on_build: Callable[[], None],
) -> tuple[str, aot_step.DecodeFn | None]:
    """Load `graph`'s package, building it first if no package has it, and say which happened: the step, or None
    where it is to be compiled just in time instead ("compiled": the build failed), where the one-row step did not
    build ("not built": the general step runs one row) or where the warm-up was stopped ("stopped")."""
    if shared := loaded_here(graph):
        return "shared", shared
    try:
        packaged, built = aot_step.load_or_build(
            graph.decoder, attention, cache.keys, cache.values, directory, graph.frozen, stop, on_build, graph.single
        )
    except step_builds.BuildStopped:
        return "stopped", None
    except Exception:
        if graph.single:
            log.warning("the one-row decode step did not build; the general step runs it", exc_info=True)
            return "not built", None
        log.warning("compiling the decode step ahead of time failed; compiling it just in time", exc_info=True)
        return "compiled", None
    _loaded.setdefault(graph.decoder, {})[graph.single] = packaged
    return ("compiled ahead of time" if built else "loaded from its package"), packaged
