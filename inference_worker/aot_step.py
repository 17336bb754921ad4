"""The CPU step (decode steps, and prefills of short prompts) compiled ahead of time (AOTInductor) and kept on disk,
so that a restart loads it in under a second instead of compiling it for two minutes.

`torch.compile` could not give a warm start: the bf16 step is compiled with freezing (its weights folded into the
graph and pre-packed for oneDNN), and inductor's graph cache does not keep frozen graphs, so every start paid about
110 s of compile. Here the step is exported (`torch.export`) and compiled by AOTInductor into a package: a shared
library, with the packed weights inside when frozen. A SmolLM2 package took 97 s to build on this 2-core machine,
330 MB on disk, 0.3 s to load. Its step ran at batch 2 in 18.4 ms against 22.3 ms under `torch.compile` (no guards
or Python wrapper at each step).

The build runs in a child process (`python -m inference_worker.aot_step JOB`), at a lower CPU priority, on the
decoder as pickled by the worker. In the worker's own process it broke and slowed serving: a non-strict export
running beside eager steps made them fail (`fake_mode.in_kernel_invocation must be False`), a strict one took
11 minutes beside them, and the steps after an in-process build ran at 22.7 ms instead of 17. The child dies with
its parent, and a stopped engine kills it.

The step takes its tokens ragged (`llama.LlamaFamilyModel.ragged`): the number of tokens, of logits asked for, the
attended length and the cache's rows and length are symbolic, so one package serves every engine and configuration
of a model, and both decode steps and short prefills. A second, `single` package is built for the decode step of one
row, with one token and one logit fixed in its shapes: SmolLM2's bf16 step took 15.3-17.4 ms there against
16.1-18.7 ms through the general package (alternating in one process, three runs), with bit-equal logits. A
quantized model's is also built with `max_autotune`, which picked inductor's own C++ GEMM template over aten's
`_weight_int8pack_mm` for every projection: its int8 step took 11.2 ms against 12.8 (12.0 without autotune). In
bf16 autotune made no steady difference (faster in two runs, slower in the third).

The packages on disk, their names, their loading and their removal are `step_packages.py`'s.
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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from inference_worker import quantize, step_packages

log = logging.getLogger("llmbus.engine")

DecodeFn = Callable[..., torch.Tensor]
CHILD_NICENESS = 5  # the build yields the CPU to serving (at 10 it starved under a steady load: over 8 minutes)
_MAX = 1 << 20


class DecodeStep(nn.Module):
    """The step as export sees it: the decoder's ragged form (`llama.LlamaFamilyModel.ragged`),
    `(tokens, positions, rows, last, kv_columns, *keys, *values) -> logits of the tokens last`: a decode step (one
    token a row) or a prefill of short prompts (their tokens one after another)."""

    def __init__(self, decoder: nn.Module, attention: Callable) -> None:
        super().__init__()
        self.decoder = decoder
        self.attention = attention

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
        return self.decoder.ragged(tokens, positions, rows, last, kv_columns, keys, values, self.attention)


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
    (False); `on_build` is called when a build starts. Frozen: the weights are folded in and packed. Not frozen:
    the package holds no weights, and the step reads the decoder's own tensors (no second copy). `single`: the
    step of one token and one logit."""
    step = DecodeStep(decoder, attention)
    name = step_packages.package_name(decoder, attention, frozen, single, cache_dtype=keys[0].dtype)
    path = directory / f"decode-{name}.pt2"
    step_packages.tidy(directory, keep=path)
    if path.exists():
        try:
            loaded = step_packages.load(path, step, frozen)
            with contextlib.suppress(OSError):  # a read-only cache: its owner prunes it
                os.utime(path)  # used now: kept by `tidy` for another week
            return loaded, False
        except Exception:
            log.warning("the compiled decode step in %s did not load; building it again", path, exc_info=True)
    if on_build is not None:
        on_build()
    build_in_child(step, keys, values, path, frozen, single, stop)
    return step_packages.load(path, step, frozen), True


class BuildStopped(Exception):
    pass


def build_in_child(
    step: DecodeStep,
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
        torch.save(job_spec, job)
        threads = str(torch.get_num_threads())
        command = [sys.executable, "-m", "inference_worker.aot_step", str(job), str(built), str(os.getpid()), threads]
        with output.open("wb") as sink:
            child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            while child.poll() is None:
                if stop is None:
                    child.wait()
                elif stop.wait(0.5):
                    child.kill()
                    child.wait()
                    raise BuildStopped(f"the build of {path.name} was stopped")
        if child.returncode != 0:
            tail = output.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"building {path.name} failed (exit code {child.returncode}):\n{tail}")
        os.chmod(built, 0o644)
        os.replace(built, path)  # whole or not at all, for the workers that share the directory


def _example(cache: torch.Tensor) -> torch.Tensor:
    """Two rows whatever the cache has: export specializes a dimension of size 1 (a `--max-batch-size 1` worker's
    cache), and the build failed."""
    _, kv_heads, _, head_dim = cache.shape
    return torch.zeros((2, kv_heads, 66, head_dim), dtype=cache.dtype, device=cache.device)


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


def main(job: str, package: str, parent: str, threads: str) -> None:
    """The child's side: die with the parent, yield the CPU to it, build the package from the pickled job. With the
    parent's threads: inductor writes the kernels for that many (built on one thread, a package had no parallel
    loops, and SmolLM2's step took 24 ms at batch 1 instead of 17)."""
    _die_with_parent(int(parent))
    os.nice(CHILD_NICENESS)
    torch.set_num_threads(int(threads))
    spec = torch.load(job, weights_only=False)  # our own pickle, written a moment ago into a private directory
    Path(job).unlink()  # the weights' bytes, not needed any more
    build(spec["step"], spec["keys"], spec["values"], Path(package), spec["frozen"], spec["single"])


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the child may outlive a killed parent
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
