"""The engine's compiled decode step and the transformers eager step at batch 1, sampled over time beside three
probes of the machine's state, in one process: why the 1-client ratio moves on a shared machine.

    python scripts/step_phases.py [--seconds 240] [--steps 8] [--out samples.json]

Each sample times `--steps` eager steps and `--steps` compiled steps (medians), and probes the machine around them:
- `dram_gbps`: a 2-thread sum over 1 GiB of bf16, far larger than any L3 (memory read rate);
- `l3_gbps`: the same over 64 MiB, read four times after one read to warm it (what a cache-sized buffer gets);
- `cpu_ms`: 2,000 float32 128x128 matmuls on one thread, from L1/L2 (how fast a core runs now).
Both loops restart from the same 150-token prompt every ten samples, so their context stays short. The summary
prints each figure's spread, the correlations between them, and the medians of blocks of 20 samples (about 20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from step_times import hf_loop

from inference_worker.model_loader import load_model
from inference_worker.model_runner import ModelRunner

FIGURES = ("dram_gbps", "l3_gbps", "cpu_ms", "eager_ms", "compiled_ms", "ratio")


def median_time(step: Callable[[], object], times: int) -> float:
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def read_rate(buffer: torch.Tensor, reads: int) -> float:
    buffer.sum()
    seconds = median_time(buffer.sum, reads)
    return buffer.numel() * buffer.element_size() / seconds / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each loop per sample")
    parser.add_argument("--out", type=Path, default=None, help="write the samples here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_model(None, device="cpu", dtype="auto", backend="transformers")
    prompt = torch.randint(100, 40000, (1, 150), generator=torch.Generator().manual_seed(0))
    runner = ModelRunner(loaded, 64, 2048, compile=True, quantize="none", background_compile=False, freeze_wide=True)
    runner.compiled.warm_up(None)
    first = runner.forward(0, prompt.tolist(), [0]).argmax(-1).tolist()
    state = {"tokens": first, "length": prompt.shape[1]}

    def compiled_step() -> None:
        logits = runner.forward(0, [[token] for token in state["tokens"]], [state["length"]])
        state["tokens"], state["length"] = logits.argmax(-1).tolist(), state["length"] + 1

    dram, l3 = torch.ones(1 << 29, dtype=torch.bfloat16), torch.ones(1 << 25, dtype=torch.bfloat16)
    small = torch.randn(128, 128)

    def cpu_probe() -> None:
        for _ in range(2000):
            small @ small

    samples: list[dict[str, float]] = []
    ends = time.monotonic() + args.seconds
    while time.monotonic() < ends:
        if len(samples) % 10 == 0:
            eager_step = hf_loop(loaded, prompt)
            state.update(tokens=first, length=prompt.shape[1])
            eager_step(), compiled_step()
        eager, compiled = median_time(eager_step, args.steps), median_time(compiled_step, args.steps)
        samples.append(
            {
                "dram_gbps": read_rate(dram, 3),
                "l3_gbps": read_rate(l3, 4),
                "cpu_ms": median_time(cpu_probe, 3) * 1e3,
                "eager_ms": eager * 1e3,
                "compiled_ms": compiled * 1e3,
                "ratio": eager / compiled,
            }
        )
    if args.out:
        args.out.write_text(json.dumps(samples, indent=1))
    report(samples)


def report(samples: list[dict[str, float]]) -> None:
    column = {name: [sample[name] for sample in samples] for name in FIGURES}
    print(f"{len(samples)} samples")
    for name, values in column.items():
        deciles = statistics.quantiles(values, n=10)
        print(f"{name:12s} p10 {deciles[0]:7.2f}  p50 {statistics.median(values):7.2f}  p90 {deciles[-1]:7.2f}")
    for a, b in (("compiled_ms", "eager_ms"), *((probe, loop) for probe in FIGURES[:3] for loop in FIGURES[3:])):
        print(f"correlation({a}, {b}) {statistics.correlation(column[a], column[b]):+.2f}")
    print("blocks of 20 samples, medians: " + " ".join(FIGURES))
    for start in range(0, len(samples), 20):
        block = samples[start : start + 20]
        print(f"{start:4d} " + " ".join(f"{statistics.median(s[name] for s in block):7.2f}" for name in FIGURES))


if __name__ == "__main__":
    main()
