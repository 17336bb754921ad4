"""A tiny random Llama with SmolLM2's tokenizer, for fast engine tests and fault injection (no SmolLM2 weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from inference_worker.model_loader import LoadedModel, load_tokenizer

TINY_SHAPE = {  # 2 layers, hidden 64, GQA 4/2 heads: the tiny model's, and other tiny test models' shape
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_model(
    dtype: torch.dtype = torch.float32, max_context: int = 1024, eos_token_ids: frozenset[int] = frozenset({2})
) -> LoadedModel:
    """2 layers, hidden 64, GQA 4/2 heads; float32 by default, so batched and solo greedy runs are bit-equal.
    With `eos_token_ids=frozenset()` its answers always run to `max_tokens`."""
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_context, **TINY_SHAPE)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return LoadedModel(model, tokenizer, "tiny", torch.device("cpu"), dtype, eos_token_ids, max_context)


def save_model_directory(loaded: LoadedModel, directory: Path, **options: object) -> Path:
    """`loaded` (an HF model and tokenizer) saved as a model directory, for `load_model(path)` and `--model`."""
    loaded.model.save_pretrained(directory, **options)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def chat_prompt(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.encode_chat([{"role": "user", "content": text}])
