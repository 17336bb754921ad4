"""Decode step time of the engine's model runner against the transformers eager loop, in one process.

    python scripts/step_times.py [--batches 1,64] [--variants hf,eager,compiled] [--context 150] [--steps 40]

Variants: `hf` is the transformers DynamicCache loop that `llmbus bench` calls the eager ceiling; `eager` and
`compiled` are the engine's ModelRunner (hand-written forward, static slot cache) without and with the compiled
decode step; `int8`, `int8-compiled`, `int4` and `int4-compiled` the same with `--quantize int8|int4`. Every
variant decodes greedily from a random prompt of `--context` tokens. Rounds of steps alternate between the
variants, so that a machine whose load changes affects them alike; the figures are medians, and the ratios are
against the first variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import DynamicCache

from inference_worker.hardware import pick_threads
from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.model_runner import ModelRunner
from inference_worker.quantize import QUANTIZERS

Step = Callable[[], None]
ROWS = 64  # cache rows, as a default worker has: a batch of 1 runs as the engine runs it there


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_loop(loaded: LoadedModel, prompts: torch.Tensor) -> Step:
    model, batch = loaded.model, prompts.shape[0]
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=prompts, cache=cache, logits_to_keep=1)
    state = {"token": out.logits[:, -1].argmax(-1, keepdim=True), "mask": torch.ones_like(prompts)}

    @torch.inference_mode()
    def step() -> None:
        ones = torch.ones((batch, 1), dtype=state["mask"].dtype, device=prompts.device)
        state["mask"] = torch.cat([state["mask"], ones], dim=1)
        out = model(input_ids=state["token"], attention_mask=state["mask"], cache=cache, logits_to_keep=1)
        state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)

    return step


def runner_loop(loaded: LoadedModel, prompts: torch.Tensor, compile: bool, quantize: str) -> tuple[Step, float]:
    batch, context = prompts.shape
    rows = max(batch, ROWS)
    runner = ModelRunner(
        loaded, rows, 2048, compile=compile, quantize=quantize, background_compile=False, freeze_wide=compile
    )
    started = time.perf_counter()
    if runner.compiled is not None:
        runner.compiled.warm_up((runner.compiled.padded(batch),) if runner.compiled.on_cuda else None)
    compile_s = time.perf_counter() - started
    logits = runner.forward(0, prompts.tolist(), [0] * batch)
    state = {"tokens": logits.argmax(-1).tolist(), "length": context}

    def step() -> None:
        logits = runner.forward(0, [[t] for t in state["tokens"]], [state["length"]] * batch)
        state["tokens"] = logits.argmax(-1).tolist()
        state["length"] += 1

    return step, compile_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--variants", default="hf,eager,compiled")
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant and batch")
    parser.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(pick_threads(args.threads))
    variants = args.variants.split(",")
    backend = "transformers" if "hf" in variants else "auto"  # the hf loop runs transformers' own modules
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, backend=backend)
    threads = torch.get_num_threads()
    print(f"{loaded.name} on {loaded.device}, {loaded.dtype}, {threads} threads, torch {torch.__version__}")
    generator = torch.Generator().manual_seed(0)
    for batch in map(int, args.batches.split(",")):
        prompts = torch.randint(100, 40000, (batch, args.context), generator=generator).to(loaded.device)
        steps: dict[str, Step] = {}
        for name in variants:
            if name == "hf":
                steps[name] = hf_loop(loaded, prompts)
                continue
            mode = name.removesuffix("-compiled")
            quantize = mode if mode in QUANTIZERS else "none"
            steps[name], compile_s = runner_loop(loaded, prompts, name.endswith("compiled"), quantize)
            if compile_s > 0.01:
                print(f"  {name} batch {batch}: compile + first run {compile_s:.1f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for step in steps.values():
            for _ in range(3):
                step()
        rounds = 8
        for _ in range(rounds):
            for name, step in steps.items():
                for _ in range(max(1, args.steps // rounds)):
                    sync(loaded.device)
                    started = time.perf_counter()
                    step()
                    sync(loaded.device)
                    times[name].append(time.perf_counter() - started)
        base = statistics.median(times[variants[0]])
        for name in variants:
            median = statistics.median(times[name])
            print(
                f"batch {batch:4d}  {name:14s} {median * 1000:8.2f} ms/step {batch / median:9.1f} tok/s  "
                f"x{base / median:.2f} vs {variants[0]}  (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
