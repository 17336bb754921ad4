"""A tiny random Llama with SmolLM2's tokenizer, for fast engine and worker tests and for fault injection.

Only the tokenizer is read from the SmolLM2 directory (never the weights), so tests that use it stay fast.
The model's vocabulary is the tokenizer's, its weights are random (seeded), and it never stops on its own
before `max_tokens` in practice (its chance of sampling EOS is about one in 49,000 per token).
"""

from __future__ import annotations

from functools import cache

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from inference_worker.model_loader import LoadedModel, converted_smollm2


@cache
def smollm_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(converted_smollm2())


def tiny_llama(seed: int = 0, max_context: int = 1024) -> LoadedModel:
    tokenizer = smollm_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
    )
    model = LlamaForCausalLM(config).eval()
    eos = frozenset({tokenizer.eos_token_id})
    return LoadedModel(model, tokenizer, "tiny-llama", torch.device("cpu"), torch.float32, eos, max_context)
