"""The just-in-time side of compiling a step: `torch.compile` of a decoder's step (CUDA graphs on CUDA; on CPU the
fallback when no ahead-of-time package can be built, see `aot_step.py`), the compiler's per-thread settings and
inductor's on-disk cache. `compiled_decode.CompiledDecode` decides when each runs."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn

_steps: weakref.WeakKeyDictionary[nn.Module, Callable[..., torch.Tensor]] = weakref.WeakKeyDictionary()
_settings = threading.local()


def use_compile_cache(directory: str) -> None:
    """Keep inductor's compiled artifacts under `directory` (unless TORCHINDUCTOR_CACHE_DIR says otherwise)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", directory)


def configure_compiler(device_type: str, freezing: bool) -> None:
    """Set the compiler's options on this thread, for the graph about to run. torch keeps them per thread (a setting
    made on one thread is not seen by a compile on another), so `_run` calls this before every step; it touches
    torch's config only when a value changes."""
    if not getattr(_settings, "done", False):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._inductor.config.compile_threads = 1  # no pool of compile processes competing with the steps
        _settings.done = True
    if device_type == "cpu" and getattr(_settings, "freezing", None) != freezing:
        torch._inductor.config.freezing = freezing  # torch.compile(options=...) does not apply it
        _settings.freezing = freezing


def compiled_step(decoder: nn.Module, attention: Callable, device_type: str) -> Callable[..., torch.Tensor]:
    """One compiled step per decoder and process, shared by every engine on the decoder. The decoder is captured,
    not passed: freezing folds only the weights the graph captures. On CPU it is the decoder's ragged form; on CUDA
    it decodes rows 0... in the padded form (the inputs are then one token a row, and rows and last are their
    indices), which is what its CUDA graphs were measured with."""
    if decoder in _steps:
        return _steps[decoder]

    def ragged(keys, values, tokens, positions, rows, last, kv_columns) -> torch.Tensor:
        return decoder.ragged(tokens, positions, rows, last, kv_columns, keys, values, attention)

    def padded(keys, values, tokens, positions, rows, last, kv_columns) -> torch.Tensor:
        return decoder(tokens[:, None], positions[:, None], 0, kv_columns, keys, values, attention)

    # dynamic=False: no automatic dynamic shapes; only the dimensions `_run` marks are symbolic
    if device_type == "cuda":
        compiled = torch.compile(padded, fullgraph=True, dynamic=False, mode="reduce-overhead")
    else:
        compiled = torch.compile(ragged, fullgraph=True, dynamic=False)
    _steps[decoder] = compiled
    return compiled
