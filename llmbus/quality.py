"""What a weight quantization costs in quality, measured on data shipped with llmbus (`llmbus/data/`):

- perplexity of the model on a fixed English text (chapter 1 of Jane Austen's *Pride and Prejudice*, 1813, public
  domain), computed by the engine's own decoder over windows of up to `--window` tokens;
- answers to 32 short factual questions (`qa.json`), asked after two one-word examples, greedy, through the engine
  (in batches below `WIDE_FROM` rows: a quantized mode decodes them on its quantized weights, its prompts on dense
  ones):
  `exact_match` counts replies that are exactly an accepted answer (lower case, punctuation and a leading article
  dropped), `contains_match` replies whose words include one.

`evaluate(loaded, "int8")` returns one mode's figures as a dict; `compare` runs several modes on one loaded model;
`main(argv)` prints them (and writes JSON with `--json`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch

from inference_worker.attention import matmul_attention
from inference_worker.compiled_decode import WIDE_FROM
from inference_worker.engine import EngineConfig, LLMEngine
from inference_worker.kv_cache import SlotKVCache
from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.model_runner import family_decoder
from inference_worker.quantize import QUANTIZERS
from inference_worker.sampling_params import SamplingParams

TEXT = "pride_and_prejudice_ch1.txt"
QA = "qa.json"
SYSTEM = "Answer with a single word."
EXAMPLES = [("What colour is grass?", "Green"), ("How many wheels does a bicycle have?", "Two")]
ARTICLES = {"a", "an", "the"}


def data_file(name: str) -> str:
    return resources.files("llmbus").joinpath("data", name).read_text(encoding="utf-8")


def perplexity(loaded: LoadedModel, quantize: str = "none", window: int = 512) -> tuple[float, int]:
    """exp(mean next-token negative log-likelihood) over the text, in consecutive windows; and the tokens scored."""
    ids = loaded.tokenizer(data_file(TEXT), add_special_tokens=False)["input_ids"]
    decoder = family_decoder(loaded, window, quantize)
    if decoder is None:
        raise ValueError("perplexity needs a Llama, Mistral or Qwen2 model (the engine's own decoder)")
    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = SlotKVCache(
        config.num_hidden_layers, 1, config.num_key_value_heads, head_dim, window, loaded.dtype, loaded.device
    )
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window]], device=loaded.device)
            width = chunk.shape[1]
            if width < 2:
                break
            positions = torch.arange(width, device=loaded.device)[None]
            hidden = decoder.hidden_states(
                chunk, positions, slice(0, 1), positions[0], cache.keys, cache.values, matmul_attention
            )
            logits = decoder.head(hidden[0, :-1])
            total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += width - 1
    return math.exp(total / count), count


def normalize(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[1:] if words and words[0] in ARTICLES and len(words) > 1 else words


def answer_questions(loaded: LoadedModel, quantize: str = "none", max_tokens: int = 16) -> dict[str, Any]:
    questions = json.loads(data_file(QA))
    shots = [
        {"role": role, "content": text}
        for pair in EXAMPLES
        for role, text in zip(("user", "assistant"), pair, strict=True)
    ]
    prompts = [
        loaded.encode_chat([{"role": "system", "content": SYSTEM}, *shots, {"role": "user", "content": q["question"]}])
        for q in questions
    ]
    # below WIDE_FROM rows, so that a quantized mode's answers are decoded on its quantized weights, as a worker decodes
    # a small batch (its prompts, and batches of WIDE_FROM rows or more, run on the dense weights: model_runner.py)
    rows = min(len(prompts), WIDE_FROM - 1)
    engine = LLMEngine(loaded, EngineConfig(max_batch_size=rows, prefix_cache=False, quantize=quantize))
    replies = [r.text for r in engine.generate(prompts, SamplingParams(max_tokens=max_tokens))]
    exact = contains = 0
    for question, reply in zip(questions, replies, strict=True):
        words = normalize(reply)
        answers = set(question["answers"])
        exact += " ".join(words) in answers
        contains += bool(answers & set(words))
    return {
        "questions": len(questions),
        "exact_match": exact / len(questions),
        "contains_match": contains / len(questions),
        "replies": replies,
    }


def evaluate(loaded: LoadedModel, quantize: str = "none", window: int = 512) -> dict[str, Any]:
    ppl, tokens = perplexity(loaded, quantize, window)
    return {
        "quantize": quantize,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "perplexity": ppl,
        "perplexity_tokens": tokens,
        **answer_questions(loaded, quantize),
    }


def compare(loaded: LoadedModel, modes: Sequence[str] = tuple(QUANTIZERS), window: int = 512) -> dict[str, Any]:
    return {mode: evaluate(loaded, mode, window) for mode in modes}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmbus quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default=",".join(QUANTIZERS), help="comma-separated modes to compare")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    loaded = load_model(args.model, args.device, args.dtype)
    results = compare(loaded, args.quantize.split(","), args.window)
    print(f"{loaded.name}, {loaded.dtype}, {loaded.device}")
    print(f"{'quantize':10s} {'perplexity':>10s} {'exact match':>12s} {'contains':>9s}")
    for mode, r in results.items():
        print(f"{mode:10s} {r['perplexity']:10.3f} {r['exact_match']:12.2f} {r['contains_match']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
