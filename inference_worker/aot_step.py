"""The CPU step (decode steps, and prefills of short prompts) compiled ahead of time (AOTInductor) and kept on disk,
so that a restart loads it in under a second instead of compiling it for two minutes.

`torch.compile` could not give a warm start: the bf16 step is compiled with freezing (its weights folded into the
graph and pre-packed for oneDNN), and inductor's graph cache does not keep frozen graphs, so every start paid about
110 s of compile. Here the step is exported (`torch.export`) and compiled by AOTInductor into a package: a shared
library, with the packed weights inside when frozen. A SmolLM2 package took 97 s to build on this 2-core machine,
330 MB on disk, 0.3 s to load. Its step ran at batch 2 in 18.4 ms against 22.3 ms under `torch.compile` (no guards
or Python wrapper at each step).

The build runs in a child process, one at a time per package among the workers that share the cache directory
(`step_builds.py`).

The step takes its tokens ragged (`llama.LlamaFamilyModel.ragged`): the number of tokens, of logits asked for, the
attended length and the cache's rows and length are symbolic, so one package serves every engine and configuration
of a model, and both decode steps and short prefills. A second, `single` package is built for the decode step of one
row, with one token and one logit fixed in its shapes: SmolLM2's bf16 step took 15.3-17.4 ms there against
16.1-18.7 ms through the general package (alternating in one process, three runs), with bit-equal logits, while both
called oneDNN. Its projections are now broadcast sums (`llama.project_one_row`): on the AMX Xeon, 23.5 ms against
28.3 through oneDNN (medians, alternating in one process), and 39.8-40.2 tok/s at 1 client against 33.2-39.0. A
quantized model's is also built with `max_autotune`, which picked inductor's own C++ GEMM template over aten's
`_weight_int8pack_mm` for every projection: its int8 step took 11.2 ms against 12.8 (12.0 without autotune). In
bf16 autotune made no steady difference (faster in two runs, slower in the third).

The packages on disk, their names, their loading and their removal are `step_packages.py`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from inference_worker import llama, quantize, step_builds, step_packages

log = logging.getLogger("llmbus.engine")

DecodeFn = Callable[..., torch.Tensor]
_MAX = 1 << 20


class DecodeStep(nn.Module):
    """The step as export sees it: the decoder's ragged form (`llama.LlamaFamilyModel.ragged`),
    `(tokens, positions, rows, last, kv_columns, *keys, *values) -> logits of the tokens last`: a decode step (one
    token a row) or a prefill of short prompts (their tokens one after another)."""

    def __init__(self, decoder: nn.Module, attention: Callable, one_row: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.attention = attention
        self.projection = llama.project_one_row if one_row else llama.project

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        last: torch.Tensor,
        kv_columns: torch.Tensor,
        *kv: torch.Tensor,
    ) -> torch.Tensor:
        layers = len(kv) // 2
        keys, values = list(kv[:layers]), list(kv[layers:])
        return self.decoder.ragged(
            tokens, positions, rows, last, kv_columns, keys, values, self.attention, self.projection
        )


def load_or_build(
    decoder: nn.Module,
    attention: Callable,
    keys: list,
    values: list,
    directory: Path,
    frozen: bool,
    stop: threading.Event | None = None,
    on_build: Callable[[], None] | None = None,
    single: bool = False,
) -> tuple[DecodeFn, bool]:
    """The compiled step, and whether it was built now (True, in a child process) or loaded from `directory`
    (False); `on_build` is called when a build starts, here or in another worker that this one waits for. Frozen:
    the weights are folded in and packed. Not frozen: the package holds no weights, and the step reads the
    decoder's own tensors (no second copy). `single`: the step of one token and one logit."""
    step = DecodeStep(decoder, attention, one_row=single)
    name = step_packages.package_name(decoder, attention, frozen, single, cache_dtype=keys[0].dtype)
    path = directory / f"decode-{name}.pt2"
    step_packages.tidy(directory, keep=path)
    seen = _modified(path)
    if seen is not None:
        try:
            return _load_marked_used(path, step, frozen), False
        except Exception:
            log.warning("the compiled decode step in %s did not load; building it again", path, exc_info=True)
    with step_builds.build_lock(path, stop, on_wait=on_build):
        if _modified(path) not in (None, seen):  # another worker built it while this one waited for the lock
            with contextlib.suppress(Exception):
                return _load_marked_used(path, step, frozen), False
        if on_build is not None:
            on_build()
        step_builds.build_in_child(step, keys, values, path, frozen, single, stop)
    return step_packages.load(path, step, frozen), True


def _load_marked_used(path: Path, step: DecodeStep, frozen: bool) -> DecodeFn:
    loaded = step_packages.load(path, step, frozen)
    with contextlib.suppress(OSError):  # a read-only cache: its owner prunes it
        os.utime(path)  # used now: kept by `tidy` for another week
    return loaded


def _modified(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def build(step: DecodeStep, keys: list, values: list, path: Path, frozen: bool, single: bool = False) -> None:
    device, example_rows = keys[0].device, 1 if single else min(2, keys[0].shape[0])
    tokens = torch.zeros(example_rows, dtype=torch.long, device=device)
    positions = torch.full((example_rows,), keys[0].shape[2] - 1, dtype=torch.long, device=device)
    rows, last = torch.arange(example_rows, device=device), torch.arange(example_rows, device=device)
    kv_columns = torch.arange(min(64, keys[0].shape[2] - 1), device=device)
    flat = None if single else {0: torch.export.Dim("tokens", min=1, max=_MAX)}
    outputs = None if single else {0: torch.export.Dim("outputs", min=1, max=_MAX)}
    columns = torch.export.Dim("columns", min=2, max=_MAX - 1)  # a step attends to 2 columns or more
    cache_rows = torch.export.Dim("rows", min=1, max=_MAX)
    length = torch.export.Dim("length", min=3, max=_MAX)
    cache_dims = tuple({0: cache_rows, 2: length} for _ in (*keys, *values))
    options = {"freezing": frozen, "aot_inductor.package_constants_in_so": frozen}
    if single and quantized(step):
        options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    with torch.inference_mode():  # inductor freezes only where gradients are off
        program = torch.export.export(
            step,
            (tokens, positions, rows, last, kv_columns, *keys, *values),
            dynamic_shapes=(flat, flat, flat, outputs, {0: columns}, cache_dims),
        )
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)


def quantized(module: nn.Module) -> bool:
    linears = tuple(linear for linear in quantize.QUANTIZERS.values() if linear is not None)
    return any(isinstance(m, linears) for m in module.modules())
