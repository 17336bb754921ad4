"""Edits of a saved model directory's files, for tests of what the loaders do with them (single-file weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def change_json(file: Path, drop: tuple[str, ...] = (), **changes: Any) -> None:
    """Rewrite the JSON object in `file` without the keys `drop` and with `changes`."""
    value = json.loads(file.read_text())
    for name in drop:
        value.pop(name, None)
    file.write_text(json.dumps(value | changes))


def drop_tensors(directory: Path, *names: str) -> None:
    """Rewrite model.safetensors without the tensors `names` (each must be there)."""
    file = directory / "model.safetensors"
    weights = load_file(file)
    for name in names:
        del weights[name]
    save_file(weights, file, metadata={"format": "pt"})


def add_missing_biases(directory: Path) -> None:
    """Add zero biases to model.safetensors for those the config's transformers model has and the file lacks (a
    config edited to have biases, or a family that always has them, such as Qwen2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory)).state_dict()
    file = directory / "model.safetensors"
    weights = load_file(file)
    dtype = weights["model.embed_tokens.weight"].dtype
    for name, tensor in expected.items():
        if name.endswith(".bias") and name not in weights:
            weights[name] = torch.zeros(tensor.shape, dtype=dtype)
    save_file(weights, file, metadata={"format": "pt"})
