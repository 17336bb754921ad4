"""The engine on CUDA: greedy equality, then decode step times at batch 1/64/256 against the transformers loop.

    python scripts/gpu_check.py [--model DIR] [--batches 1,64,256] [--steps 48] [--skip-times]
                                [--skip-float32-compiled]

1. float32: the engine's greedy text (eager, and compiled with CUDA graphs) equals `model.generate` on real prompts
   (fails loudly if not);
2. bfloat16: the eager and the compiled engine's greedy text against float32 `model.generate` and against each
   other, prompt by prompt (agreement printed, with the first differing character);
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


def check_float32(model: str | None, max_tokens: int, compiled_too: bool) -> tuple[bool, list[str]]:
    """Whether the float32 engine's greedy text equals `model.generate`'s, and `generate`'s texts."""
    loaded = load_model(model, device="cuda", dtype="float32", backend="transformers")
    prompts = [loaded.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    expected = []
    for ids in prompts:
        out = loaded.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=max_tokens, do_sample=False)
        expected.append(loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    ok = True
    for compile in (False, True) if compiled_too else (False,):
        texts = engine_texts(loaded, prompts, compile, max_tokens)
        equal = sum(a == b for a, b in zip(texts, expected, strict=True))
        print(f"float32 engine ({'compiled' if compile else 'eager'}) == generate: {equal}/{len(prompts)}")
        ok &= equal == len(prompts)
    del loaded
    torch.cuda.empty_cache()
    return ok, expected


def check_bfloat16(model: str | None, max_tokens: int, float32_texts: list[str]) -> None:
    loaded = load_model(model, device="cuda", dtype="bfloat16")
    prompts = [loaded.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    eager = engine_texts(loaded, prompts, False, max_tokens)
    compare("bfloat16 eager engine", eager, "float32 generate", float32_texts, max_tokens)
    compiled = engine_texts(loaded, prompts, True, max_tokens)
    compare("bfloat16 compiled engine", compiled, "float32 generate", float32_texts, max_tokens)
    compare("bfloat16 compiled engine", compiled, "bfloat16 eager engine", eager, max_tokens)


def compare(name: str, texts: list[str], reference_name: str, reference: list[str], max_tokens: int) -> None:
    equal = sum(a == b for a, b in zip(texts, reference, strict=True))
    print(f"{name} == {reference_name} (greedy, {max_tokens} tokens): {equal}/{len(texts)}")
    for question, a, b in zip(QUESTIONS, texts, reference, strict=True):
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            print(f"  differs at character {first}: {question!r}\n    {a!r}\n    {b!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skip-times", action="store_true")
    parser.add_argument("--skip-float32-compiled", action="store_true", help="check only the eager engine in float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok, float32_texts = check_float32(args.model, args.max_tokens, compiled_too=not args.skip_float32_compiled)
    check_bfloat16(args.model, args.max_tokens, float32_texts)
    if not args.skip_times:
        step_argv = ["--device", "cuda", "--dtype", "bfloat16", "--batches", args.batches, "--steps", str(args.steps)]
        model_argv = ["--model", args.model] if args.model else []
        step_times.main([*step_argv, *model_argv, "--variants", "hf,eager,compiled"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
