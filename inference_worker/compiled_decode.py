"""The compiled decode step, compiled (or loaded) in the background while the engine serves eagerly. On CPU it also
runs short prefills: its inputs are ragged (`step_inputs.py`), so a prefill is several tokens in each of a few rows
(`takes` says which forwards it runs). The README's "The compiled decode step" has the measurements.

- CPU: AOTInductor packages kept on disk (`aot_step.py`: built once by a child process, loaded in seconds at every
  later start). The narrow step (below `WIDE_FROM` rows) is frozen for oneDNN; a decode step of one row runs its
  own package (`SINGLE`, one token and one logit fixed in its shapes, its projections broadcast sums rather than
  oneDNN's: `llama.project_one_row`), or the narrow one where that did not build.
  With a `wide` decoder (a bf16 model's float32 copy), prefills run a third package on it, and so do batches of
  `WIDE_FROM` rows or more with `wide_decode` (where this CPU's bf16 matmuls lose at large batches, hardware.py);
  frozen only under `freeze_wide` (`model_runner.fit_runner`), else it reads the copy's weights.
  Should a package fail to build, `torch.compile` compiles the step just in time and pads a batch of 1 to 2, since
  dynamo specializes size 1. The batch size, the attended length and the cache's shape are symbolic, so one step
  serves every batch and every engine of the process.
- CUDA: `mode="reduce-overhead"` (CUDA graphs), one inductor graph with a symbolic batch; a batch is padded to the
  next bucket and the attended length to a multiple of 256, and every such graph is recorded during the warm-up.

Warm-ups run off the engine thread (`warm_up.py`), with the compiler settings set on that thread (torch keeps
them per thread). A compiled step that raises turns this engine eager (`compile: failed`). Padding rows run token
0 at the cache's scratch column, which no real query reads (kv_cache.py); their logits are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from inference_worker import aot_step, graph_packages, step_packages, warm_up
from inference_worker.graph_packages import Graph
from inference_worker.jit_step import compiled_step, configure_compiler
from inference_worker.kv_cache import SlotKVCache
from inference_worker.step_inputs import StepInputs

log = logging.getLogger("llmbus.engine")

CUDA_BUCKETS = (2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
CUDA_COLUMN_BLOCK = 256
SINGLE = 1  # the warm-up size of the CPU package of one token (a decode step of one row)
MIN_CPU_ROWS = 2
WIDE_FROM = 16
WARM_UP_COLUMNS = 64
MIN_WARM_UP_COLUMNS = 2  # a step attends to 2 columns or more in its package (`aot_step.build`)
PREFILL_SCORES = 32768  # a prefill runs compiled up to this many tokens x attended columns (see `takes`)


def on_wide_copy(sequences: int, tokens: int, wide_decode: bool = True) -> bool:
    """Whether a forward of `tokens` tokens over `sequences` sequences runs on a bf16 model's float32 copy (where it
    has one; eagerly or on the wide graph): every prefill, and with `wide_decode` decode steps of `WIDE_FROM` rows
    or more. Prefills, even short ones, because a prompt's keys and values serve every token after it: through the
    bf16 step, the 13 tokens after a cached system turn made SmolLM2 answer "What is the capital of France?" with
    "L'Étoile, la Marseillaise", and agree less often with float32 greedy text than the eager engine."""
    return tokens > sequences or (wide_decode and sequences >= WIDE_FROM)


def cuda_buckets(max_rows: int) -> tuple[int, ...]:
    """Batch sizes recorded as CUDA graphs. No bucket of 1: dynamo specializes size 1, which would cost a second
    compile; a single row runs padded to 2 (a decode step on a GPU is bound by reading the weights, not by rows)."""
    return (*(b for b in CUDA_BUCKETS if b < max_rows), max_rows)


class CompiledDecode:
    def __init__(
        self,
        decoder: nn.Module,
        cache: SlotKVCache,
        attention: Callable,
        max_rows: int,
        wide: nn.Module | None = None,
        package_dir: Path | None = None,
        freeze_wide: bool = False,
        wide_decode: bool = True,
    ) -> None:
        self.attention = attention
        self.cache = cache
        self.device = cache.keys[0].device
        self.on_cuda = self.device.type == "cuda"
        self.max_rows = max_rows
        self.wide_decode = wide_decode
        self.wide_from = WIDE_FROM if wide is not None and not self.on_cuda and max_rows >= WIDE_FROM else None
        # prefills run on the float32 copy where there is one (`on_wide_copy`); with no wide graph, eagerly
        self.compiles_prefills = not self.on_cuda and (wide is None or self.wide_from is not None)
        self.package_dir = None if self.on_cuda else package_dir
        self.threads = torch.get_num_threads()  # the warm-up's too: packages are named and built for a count
        if self.on_cuda:
            self.sizes = cuda_buckets(max_rows)
        else:
            single = (SINGLE,) if self.package_dir is not None else ()
            self.sizes = (MIN_CPU_ROWS, *(() if self.wide_from is None else (self.wide_from,)), *single)
        self.column_block = CUDA_COLUMN_BLOCK if self.on_cuda else 1
        self.freeze_wide = freeze_wide
        self.decoders = {s: decoder for s in self.sizes if s != self.wide_from} | (
            {self.wide_from: wide} if self.wide_from else {}
        )
        self.packaged: dict[int, aot_step.DecodeFn] = {}  # the packages loaded, by graph
        if self.package_dir is not None:
            loaded = {size: graph_packages.loaded_here(self._graph(size)) for size in self.decoders}
            self.packaged = {size: step for size, step in loaded.items() if step is not None}
        self.compile_seconds: dict[int, float] = {}
        self._ready: set[int] = set()
        self._stop = threading.Event()
        self._done: threading.Event | None = None
        self.settled = threading.Event()  # the packages are loaded, or one is being built: the engine may start
        self.failed = False
        self.prefills = 0  # prefill forwards run compiled (see `takes`)
        if self.on_cuda:
            for tensor in (*cache.keys, *cache.values):
                torch._dynamo.mark_static_address(tensor)

    def padded(self, tokens: int, sequences: int | None = None) -> int:
        """The tokens a step of `tokens` tokens (of `sequences` sequences, default one each) runs with: a bucket on
        CUDA; the tokens themselves in the ahead-of-time step; under `torch.compile` on CPU, enough padding for at
        least 2 tokens and 2 logits (dynamo specializes a size of 1, and each padding token adds a logit)."""
        if self.on_cuda:
            return next(b for b in self.sizes if b >= tokens)
        sequences = tokens if sequences is None else sequences
        return self._padded(tokens, sequences, self.graph_size(tokens, sequences))

    def _padded(self, tokens: int, sequences: int, graph: int) -> int:
        if graph in self.packaged:
            return tokens
        return max(tokens, MIN_CPU_ROWS, tokens + MIN_CPU_ROWS - sequences)

    def graph_size(self, tokens: int, sequences: int | None = None) -> int:
        """The warm-up size of the graph that runs `tokens` tokens of `sequences` sequences (default one each): on
        CPU the wide graph, where there is one, for what runs on the float32 copy (`on_wide_copy`); the `SINGLE`
        one for one token, once it is ready; else the narrow one."""
        if self.on_cuda:
            return self.padded(tokens)
        if self.wide_from and on_wide_copy(tokens if sequences is None else sequences, tokens, self.wide_decode):
            return self.wide_from
        return SINGLE if tokens == 1 and SINGLE in self._ready else MIN_CPU_ROWS

    def ready(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows (one token each) can run compiled now."""
        return not self.failed and rows <= self.max_rows and self.graph_size(rows) in self._ready

    def takes(self, first_row: int, lengths: list[int], kv_len: int) -> bool:
        """Whether this forward runs compiled: a decode step (rows from 0, one token each) once its graph is ready,
        and on CPU also a prefill whose attention is small (tokens x attended columns at most `PREFILL_SCORES`);
        a longer one runs eagerly, where SDPA's attention is faster than the step's loops."""
        tokens = sum(lengths)
        if max(lengths) == 1 and first_row == 0:
            return self.ready(tokens)
        if not self.compiles_prefills or self.failed or tokens * kv_len > PREFILL_SCORES:
            return False
        return self.graph_size(tokens, len(lengths)) in self._ready

    @property
    def all_ready(self) -> bool:
        return len(self._ready) == len(self.sizes)

    @property
    def state(self) -> str:
        """compiling, ready, or failed (decoding stays eager): reported in `$SRV.STATS` as `compile`."""
        if self.failed:
            return "failed"
        return "ready" if self.all_ready else "compiling"

    def __call__(self, first_row: int, chunks: list[list[int]], starts: list[int], kv_len: int) -> torch.Tensor:
        """The logits of each chunk's last token (what `takes` accepted)."""
        tokens, sequences = sum(map(len, chunks)), len(chunks)
        self.prefills += tokens > sequences
        graph = self.graph_size(tokens, sequences)  # once: the warm-up thread may make another one ready meanwhile
        size = self.padded(tokens) if self.on_cuda else self._padded(tokens, sequences, graph)
        inputs = StepInputs.of(first_row, chunks, starts, self.cache.scratch, size)
        columns = min(-(-kv_len // self.column_block) * self.column_block, self.cache.row_len)
        logits = self._run(inputs, columns, graph)
        return logits[: len(chunks)].clone() if self.on_cuda else logits[: len(chunks)]

    def _run(self, inputs: StepInputs, columns: int, graph: int) -> torch.Tensor:
        """Run the graph of warm-up size `graph` on these inputs."""
        kv_columns = torch.arange(columns, device=self.device)
        inputs = inputs.to(self.device)
        tensors = (inputs.tokens, inputs.positions, inputs.rows, inputs.last, kv_columns)
        packaged = self.packaged.get(graph)
        if packaged is not None:
            return packaged(*tensors, *self.cache.keys, *self.cache.values)
        for tensor in tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        if not self.on_cuda:
            for tensor in (*self.cache.keys, *self.cache.values):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
                torch._dynamo.maybe_mark_dynamic(tensor, 2)
        configure_compiler(self.device.type, freezing=graph != self.wide_from)
        step = compiled_step(self.decoders[graph], self.attention, self.device.type)  # made at its first use
        return step(self.cache.keys, self.cache.values, *tensors)

    def warm_up(self, sizes: tuple[int, ...] | None = None) -> None:
        """Compile each size now, on a warm-up thread as `start_background` does (`warm_up.py`), and wait for it;
        a failure is raised here instead of turning the engine eager."""
        failure: list[BaseException] = []
        self._submit(sizes, failure.append).wait()
        if failure:
            raise failure[0]

    def start_background(self) -> None:
        """Warm up on a warm-up thread; `ready(n)` turns true as the graphs arrive. With packages, it returns once
        they are loaded, or as soon as one must be built: a load holds the GIL for seconds (2.8-4.4 s for SmolLM2's
        two here), so a worker joins the bus after it rather than miss requests just after joining (`llmbus status`
        right after `llmbus up` did); a build takes minutes, and the worker serves eagerly meanwhile."""
        self._done = self._submit(None, self._turn_eager)
        if self.package_dir is not None:
            self.settled.wait()

    def _turn_eager(self, failure: BaseException) -> None:
        self.failed = True
        log.error("compiling the decode step failed; decoding stays eager", exc_info=failure)

    def _submit(self, sizes: tuple[int, ...] | None, on_failure: Callable[[BaseException], None]) -> threading.Event:
        """Run `_warm_up(sizes)` on a warm-up thread; the event is set when it ends."""
        done = threading.Event()

        def job() -> None:
            try:
                torch.set_num_threads(self.threads)  # a new thread's count is the one last set anywhere
                self._warm_up(sizes)
            except BaseException as exc:
                on_failure(exc)
            finally:
                self.settled.set()
                done.set()

        warm_up.submit(job, self.on_cuda)
        return done

    @torch.inference_mode()
    def _warm_up(self, sizes: tuple[int, ...] | None = None) -> None:
        """Compile (or load from the cache) and run each size once; padding rows only, so no sequence is touched.
        In inference mode, as the engine's steps run: dynamo guards on it, so a warm-up outside would not count."""
        sizes = tuple(s for s in sizes or self.sizes if s not in self._ready)
        started = time.perf_counter()
        how = dict.fromkeys(sizes, "compiled")
        if self.package_dir is not None:  # every package before any step: see the docstring of warm_up.py
            with step_packages.weights_hashed_once():
                graph_packages.mark_used(self.package_dir, map(self._graph, sizes), self.attention, self.cache)
                for size in sizes:
                    how[size], packaged = graph_packages.load_or_build(
                        self._graph(size), self.attention, self.cache, self.package_dir, self._stop, self.settled.set
                    )
                    if how[size] == "stopped":
                        return
                    if packaged is not None:
                        self.packaged[size] = packaged
            self.settled.set()
            if how.get(SINGLE) == "not built":  # one-row steps run the narrow package
                self.sizes = tuple(s for s in self.sizes if s != SINGLE)
                sizes = tuple(s for s in sizes if s != SINGLE)
        for size in sizes:
            if self._stop.is_set():
                return
            padding = StepInputs.of(0, [], [], self.cache.scratch, size)
            for columns in self._warm_up_columns():
                self._run(padding, columns, size)
            self.compile_seconds[size] = time.perf_counter() - started
            self._ready.add(size)
            log.info("decode step %s for batch %d in %.1f s", how[size], size, self.compile_seconds[size])

    def _graph(self, size: int) -> Graph:
        """What names the package of graph `size` (CPU)."""
        return Graph(self.decoders[size], self.freeze_wide or size != self.wide_from, size == SINGLE)

    def _warm_up_columns(self) -> tuple[int, ...]:
        """CPU: one length (it is symbolic), within the cache's rows (with `--max-seq-len 32` a warm-up of 64 columns
        ran past the cache's, and the step failed) and at least 2 (the least a package is exported for). CUDA: every
        block of 256 columns, each its own CUDA graph."""
        row_len = self.cache.row_len
        if self.on_cuda:
            block = self.column_block
            return tuple(sorted({min(c, row_len) for c in range(block, row_len + block, block)}))
        return (max(MIN_WARM_UP_COLUMNS, min(WARM_UP_COLUMNS, row_len)),)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background warm-up; True once every size is compiled."""
        if self._done is not None:
            self._done.wait(timeout)
        return self.all_ready

    def stop(self) -> None:
        self._stop.set()
