"""The engine on CUDA: greedy equality, then decode step times at batch 1/64/256 against the transformers loop.

    python scripts/gpu_check.py [--model DIR] [--batches 1,64,256] [--steps 48] [--skip-times]

1. float32: the engine's greedy text (eager, and compiled with CUDA graphs) equals `model.generate` on real prompts
   (fails loudly if not);
2. bfloat16: the compiled engine's greedy text against the eager engine's, prompt by prompt (agreement printed, with
   the first differing token position);
3. bfloat16 step times: `scripts/step_times.py` with variants hf, eager, compiled on cuda.
Needs only torch, transformers and this repository. Exits non-zero if float32 equality fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import step_times
import torch

from inference_worker.engine import EngineConfig, LLMEngine
from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about cats.",
    "List three colours.",
    "Explain in two sentences why the sky is blue.",
    "What is 12 times 12?",
    "Name a famous scientist and say what they discovered.",
]


def engine_texts(loaded: LoadedModel, prompts: list[list[int]], compile: bool, max_tokens: int) -> list[str]:
    engine = LLMEngine(loaded, EngineConfig(max_batch_size=len(prompts), compile=compile, prefix_cache=False))
    if compile:
        started = time.perf_counter()
        engine.runner.compiled.wait()
        print(f"  compiled every bucket in {time.perf_counter() - started:.1f} s")
    texts = [r.text for r in engine.generate(prompts, SamplingParams(max_tokens=max_tokens))]
    engine.close()
    return texts


def check_float32(model: str | None, max_tokens: int) -> bool:
    loaded = load_model(model, device="cuda", dtype="float32")
    prompts = [loaded.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    expected = []
    for ids in prompts:
        out = loaded.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=max_tokens, do_sample=False)
        expected.append(loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    ok = True
    for compile in (False, True):
        texts = engine_texts(loaded, prompts, compile, max_tokens)
        equal = sum(a == b for a, b in zip(texts, expected, strict=True))
        print(f"float32 engine ({'compiled' if compile else 'eager'}) == generate: {equal}/{len(prompts)}")
        ok &= equal == len(prompts)
    return ok


def check_bfloat16(model: str | None, max_tokens: int) -> None:
    loaded = load_model(model, device="cuda", dtype="bfloat16")
    prompts = [loaded.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    eager = engine_texts(loaded, prompts, False, max_tokens)
    compiled = engine_texts(loaded, prompts, True, max_tokens)
    equal = sum(a == b for a, b in zip(eager, compiled, strict=True))
    print(f"bfloat16 compiled == eager (greedy, {max_tokens} tokens): {equal}/{len(prompts)}")
    for question, a, b in zip(QUESTIONS, eager, compiled, strict=True):
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            print(f"  differs at character {first}: {question!r}\n    eager:    {a!r}\n    compiled: {b!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skip-times", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = check_float32(args.model, args.max_tokens)
    check_bfloat16(args.model, args.max_tokens)
    if not args.skip_times:
        step_argv = ["--device", "cuda", "--dtype", "bfloat16", "--batches", args.batches, "--steps", str(args.steps)]
        model_argv = ["--model", args.model] if args.model else []
        step_times.main([*step_argv, *model_argv, "--variants", "hf,eager,compiled"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
