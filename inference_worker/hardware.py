"""Pick the device, dtype and thread count from the hardware; each can be overridden in Config."""

from __future__ import annotations

import os
import time
from functools import cache

import torch

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction sets as Linux lists them; empty where it does not (macOS, Windows)."""
    return flags_in("/proc/cpuinfo")


def flags_in(cpuinfo: str) -> frozenset[str]:
    """The first `flags` line (x86) or `Features` line (Arm) of a /proc/cpuinfo."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"unknown dtype {requested!r}: use one of {sorted(_DTYPES)}")
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def pick_threads(requested: int = 0) -> int:
    return requested if requested > 0 else len(os.sched_getaffinity(0))


WIDE_BATCH = 64
WIDE_SPEEDUP = 1.25
WIDE_ROUNDS = 32


@cache
def float32_wins_wide_matmuls(hidden: int, intermediate: int) -> bool:
    """Whether this CPU multiplies a batch of 64 rows faster in float32 than in bfloat16, timed here on the model's
    widest projection with oneDNN's pre-packed weights (the layout compiled code uses). CPUs with AVX512-BF16 but no
    AMX can be slower in bf16 at that size: on the 2-core Xeon this was written on, float32 took 0.74 ms where bf16
    took 1.25 ms (and 16 vs 22 ms for SmolLM2's LM head).

    Each matmul runs on one thread and is timed by that thread's CPU time (`time.thread_time_ns`), in alternation,
    best of rounds 3 to 32: time spent preempted by other work on the machine does not count. (Wall time did: timed
    one after the other, 6 of 15 decisions with two busy processes on the 2 cores were wrong; alternated, a CI run
    still saw one wrong in 5.) By CPU time the bf16/float32 ratio was 1.63-1.73 idle and 1.58-1.77 in 15 tries
    beside two busy processes, against the threshold of 1.25."""
    if not torch.backends.mkldnn.is_available():
        return False
    cases = {}
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(2 * intermediate, hidden).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, WIDE_BATCH)
        cases[dtype] = (torch.randn(WIDE_BATCH, hidden).to(dtype), packed)
    best = dict.fromkeys(cases, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread's own CPU time is then the whole matmul's
    try:
        for round_ in range(WIDE_ROUNDS):
            for dtype, (x, packed) in cases.items():
                started = time.thread_time_ns()
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                if round_ >= 2:  # the first rounds warm up
                    best[dtype] = min(best[dtype], time.thread_time_ns() - started)
    finally:
        torch.set_num_threads(threads)
    return best[torch.bfloat16] > WIDE_SPEEDUP * best[torch.float32]
