"""What a bf16 worker's prefill precision costs: prompts prefilled three ways, then decoded greedily in bf16 as the
worker decodes them, against a float32 model that prefills and decodes in float32.

    python scripts/prefill_precision.py [--chat-tokens 64]

Prefills: `float32 copy` (a float32 copy of the weights: the Xeon's way), `float32 activations` (the bf16
weights' matmuls, everything else float32: the AMD EPYC's way, `model_runner.float32_activations`) and `bf16`.
Each decodes on the bf16 decoder, eagerly, one prompt at a time. Printed per prefill:
- the 32 questions of `llmbus/data/qa.json` (as `llmbus.quality` asks them): exact matches, and replies equal to
  the float32 model's;
- the bench's 32 chat prompts: replies of `--chat-tokens` tokens equal to the float32 model's, and the mean number
  of leading tokens they share with it;
- perplexity on `llmbus.quality`'s text, computed by the prefill alone (its windows of 512 tokens);
- against the float32 copy, over all 64 prompts: the largest logit error at a prompt's last token (the mean over
  the prompts), and the prompts whose first reply token changes.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from inference_worker.attention import matmul_attention, sdpa_attention
from inference_worker.kv_cache import SlotKVCache
from inference_worker.llama import LlamaFamilyModel
from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.model_runner import family_decoder, float32_activations
from llmbus.bench.workload import PROMPTS
from llmbus.quality import EXAMPLES, QA, SYSTEM, TEXT, data_file, normalize

ROW_LEN = 1024


def cache_for(loaded: LoadedModel, row_len: int, dtype: torch.dtype) -> SlotKVCache:
    config = loaded.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return SlotKVCache(config.num_hidden_layers, 1, config.num_key_value_heads, head_dim, row_len, dtype, loaded.device)


def greedy(
    loaded: LoadedModel, prefill: LlamaFamilyModel, decode: LlamaFamilyModel, ids: list[int], tokens: int, kv_dtype
) -> list[int]:
    cache = cache_for(loaded, ROW_LEN, kv_dtype)
    columns = torch.arange(ROW_LEN)
    positions = torch.arange(len(ids))[None]
    logits = prefill(torch.tensor([ids]), positions, 0, columns[: len(ids)], cache.keys, cache.values, sdpa_attention)
    out: list[int] = []
    for at in range(len(ids), len(ids) + tokens):
        token = int(logits[0].argmax())
        if token in loaded.eos_token_ids:
            break
        out.append(token)
        step = torch.tensor([[token]]), torch.tensor([[at]]), 0, columns[: at + 1]
        logits = decode(*step, cache.keys, cache.values, matmul_attention)
    return out


def last_logits(loaded: LoadedModel, prefill: LlamaFamilyModel, ids: list[int]) -> torch.Tensor:
    cache = cache_for(loaded, len(ids), torch.bfloat16)
    positions = torch.arange(len(ids))[None]
    return prefill(torch.tensor([ids]), positions, 0, positions[0], cache.keys, cache.values, sdpa_attention)[0]


def perplexity(loaded: LoadedModel, prefill: LlamaFamilyModel, kv_dtype: torch.dtype, window: int = 512) -> float:
    ids = loaded.tokenizer(data_file(TEXT), add_special_tokens=False)["input_ids"]
    cache = cache_for(loaded, window, kv_dtype)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]])
        positions = torch.arange(chunk.shape[1])[None]
        hidden = prefill.hidden_states(
            chunk, positions, slice(0, 1), positions[0], cache.keys, cache.values, matmul_attention
        )
        total += F.cross_entropy(prefill.head(hidden[0, :-1]), chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat-tokens", type=int, default=64)
    args = parser.parse_args()
    bf16, float32 = load_model(dtype="bfloat16"), load_model(dtype="float32")
    reference = family_decoder(float32, ROW_LEN)
    decode = family_decoder(bf16, ROW_LEN)
    prefills = {
        "float32 copy": family_decoder(bf16, ROW_LEN, "none", torch.float32),
        "float32 activations": float32_activations(bf16, ROW_LEN),
        "bf16": decode,
    }
    questions = json.loads(data_file(QA))
    shots = [{"role": r, "content": t} for pair in EXAMPLES for r, t in zip(("user", "assistant"), pair, strict=True)]
    system = [{"role": "system", "content": SYSTEM}, *shots]
    asked = [bf16.encode_chat([*system, {"role": "user", "content": q["question"]}]) for q in questions]
    chats = [bf16.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    with torch.inference_mode():
        truth_qa = [greedy(float32, reference, reference, ids, 16, torch.float32) for ids in asked]
        truth_chat = [greedy(float32, reference, reference, ids, args.chat_tokens, torch.float32) for ids in chats]
        print(f"float32 model: perplexity {perplexity(float32, reference, torch.float32):.3f}")
        exact_logits = [last_logits(bf16, prefills["float32 copy"], ids) for ids in asked + chats]
        for name, prefill in prefills.items():
            qa = [greedy(bf16, prefill, decode, ids, 16, torch.bfloat16) for ids in asked]
            chat = [greedy(bf16, prefill, decode, ids, args.chat_tokens, torch.bfloat16) for ids in chats]
            exact = sum(
                " ".join(normalize(bf16.tokenizer.decode(reply))) in q["answers"]
                for reply, q in zip(qa, questions, strict=True)
            )
            shared = [
                next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
                for x, y in zip(chat, truth_chat, strict=True)
            ]
            logits = [last_logits(bf16, prefill, ids) for ids in asked + chats]
            errors = [(a - b).abs().max().item() for a, b in zip(logits, exact_logits, strict=True)]
            changed = sum(int(a.argmax() != b.argmax()) for a, b in zip(logits, exact_logits, strict=True))
            print(
                f"{name}: against the float32 copy, largest logit error {sum(errors) / len(errors):.3f} (mean), "
                f"first token changed in {changed}/{len(logits)}"
            )
            print(
                f"{name}: QA exact {exact}/{len(questions)}, equal to float32 "
                f"{sum(a == b for a, b in zip(qa, truth_qa, strict=True))}/{len(qa)}; "
                f"chat equal to float32 {sum(a == b for a, b in zip(chat, truth_chat, strict=True))}/{len(chat)}, "
                f"{sum(shared) / len(shared):.1f} leading tokens shared; "
                f"perplexity {perplexity(bf16, prefill, torch.bfloat16):.3f}"
            )


if __name__ == "__main__":
    main()
