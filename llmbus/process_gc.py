"""The garbage collector of a serving process (`llmbus up`, `llmbus worker`, `llmbus gateway`): off while the process
starts, then one collection, and what survives it frozen.

Starting a worker makes about 420,000 Python objects (torch, transformers, the model, the engine) that live as long
as the process, and each of CPython's full collections walks all of them. A SmolLM2 worker ran 7 full collections
while it started, the last ones 144-198 ms each and 0.78 s in all, and none in the 22 s of serving that followed
(AMD EPYC, timed with `gc.callbacks`). So:
- `pause()` turns the collector off at the process's entry (`cli.serve`, which calls `resume()` on its way out
  should the parts never get ready);
- `freeze_imports()` runs once the parts' modules are imported (`stack.serve_parts`): `gc.freeze()` moves their
  objects (about 590,000 for a worker and the bridge) to the permanent generation, uncollected. Their garbage,
  about 9,400 objects and 7.8 MB (traced), is kept for the life of the process: collecting it walked every module
  object and took 0.3-0.5 s of every start. Nothing else exists yet, so no tensor or model object is among it;
- `settle()` runs when the worker's engine is built, before it joins the bus (`Worker.start`), so that no request
  waits on it; else once every part is ready (`stack.announce_when_ready`: the bridge alone), or after
  `START_LIMIT_S` if one never is. One full collection reclaims the garbage made since the imports (loading the
  model and building the engine: about 39,000 objects for SmolLM2, walked in 5 ms alone and 0.08-0.22 s in
  `llmbus up`, beside the packages' first steps), `gc.freeze()` moves the survivors to the permanent generation
  too, and the collector is on again: a later full collection walks only what was made since.

Only the process entry calls these. Library code, tests and in-process workers never touch the collector: frozen
objects that later become cyclic garbage are never reclaimed, which a long test session would feel.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("llmbus")

START_LIMIT_S = 300.0  # the collector comes back on after this long even if a part never became ready

_paused = False


def pause() -> None:
    """Turn the collector off until `settle()`."""
    global _paused
    gc.disable()
    _paused = True


def resume() -> None:
    """Turn the collector back on if `settle()` never ran (a process that stops before its parts are ready)."""
    global _paused
    if _paused:
        _paused = False
        gc.enable()


def freeze_imports() -> None:
    """After `pause()`, once the modules are imported: freeze every object so far without collecting it first (see
    the module's docstring). Does nothing otherwise."""
    if _paused:
        gc.freeze()


def settle() -> None:
    """After `pause()`: collect once, freeze what survives and turn the collector back on. Does nothing otherwise,
    so it is safe to call twice (when the parts become ready and when the start limit passes)."""
    global _paused
    if not _paused:
        return
    _paused = False
    started = time.perf_counter()
    unreachable = gc.collect()
    gc.freeze()
    gc.enable()
    log.info(
        "garbage collector: %d objects frozen, %d unreachable ones collected, in %.2f s",
        gc.get_freeze_count(),
        unreachable,
        time.perf_counter() - started,
    )
