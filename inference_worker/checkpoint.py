"""A Llama-family checkpoint read without transformers: config.json and safetensors into a tree with the HF names.

Importing transformers 5 takes about 2 s on a 2-core machine (it imports torch.distributed, sympy and dynamo for
any model class), longer than everything else a warm worker does before it serves. So a worker reads the
checkpoints it can read exactly on its own: the Llama, Mistral and Qwen2 families that `llama.py` runs, with the
default, linear or Llama 3 RoPE, SiLU and safetensors weights. The tree has the attributes `llama.LlamaFamilyModel`
reads from an HF model (`model.layers[i].self_attn.q_proj`, `lm_head`, `config`, ...) and nothing else: no
`generate`, no HF forward. For anything else (other families, other RoPE types, a missing field, `.bin` weights)
`load_llama` raises `Unsupported` with the reason, and `model_loader` loads it through transformers, as before.
A checkpoint without one of the tensors the model needs is refused (`Unreadable`, naming the tensor and the
directory), whichever loader reads it: transformers would fill the tensor with random values and serve garbage.

The weights are the checkpoint's, cast to the asked dtype as transformers casts them (`Tensor.to`), and the RoPE
tables come from the same arithmetic as transformers' `LlamaRotaryEmbedding`; `tests/test_checkpoint.py` checks
both loaders give equal logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Mistral's and Qwen2's config classes default these to their large models' values; such a checkpoint must say them
STATED = {"llama": (), "mistral": ("num_key_value_heads", "max_position_embeddings", "sliding_window")}
STATED["qwen2"] = ("num_key_value_heads", "max_position_embeddings")
QKV_BIAS = frozenset({"qwen2"})  # Qwen2's q, k and v projections always have biases
# the RoPE types read here, with the settings each needs (their tables do not change with the sequence)
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


class Unsupported(Exception):
    """Why a checkpoint is left to transformers."""


class Unreadable(RuntimeError):
    """A damaged checkpoint file (not a choice for transformers to make): the message names it and what is wrong."""


class CheckpointConfig(SimpleNamespace):
    """config.json's fields as attributes, with the defaults of transformers' LlamaConfig for the optional ones
    this module reads, and the RoPE settings in transformers 5's form (`rope_parameters`)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def read_config(directory: Path) -> CheckpointConfig:
    raw = read_json(directory / "config.json")
    family = raw.get("model_type")
    if family not in STATED:
        raise Unsupported(f"model_type {family!r} (read without transformers: {', '.join(STATED)})")
    missing = [name for name in REQUIRED if raw.get(name) is None]  # STATED ones may be null (no window)
    if missing := missing + [name for name in STATED[family] if name not in raw]:
        raise Unsupported(f"config.json has no {', '.join(missing)}")
    if family == "qwen2" and raw.get("use_sliding_window"):
        raise Unsupported("a Qwen2 sliding window (it may apply to some layers only)")
    if len(set(raw.get("layer_types") or ())) > 1:
        raise Unsupported("attention types that differ between layers")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("pretraining_tp", 1) != 1:
        raise Unsupported("an activation other than silu, or pretraining_tp > 1")
    if raw.get("attention_bias") or raw.get("mlp_bias") or "partial_rotary_factor" in raw:
        raise Unsupported("biases or a partial rotary factor")
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})  # transformers' order
    rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")
    rope["rope_theta"] = float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    if rope["rope_type"] not in ROPE_TYPES:
        raise Unsupported(f"RoPE type {rope['rope_type']!r}")
    if missing := [name for name in ROPE_TYPES[rope["rope_type"]] if name not in rope]:
        raise Unsupported(f"RoPE settings without {', '.join(missing)}")
    heads = raw["num_attention_heads"]
    defaults = {"num_key_value_heads": heads, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
    defaults["tie_word_embeddings"] = False
    fields = {
        **defaults,
        **{name: value for name, value in raw.items() if value is not None or name not in defaults},
        "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads,
        "rope_parameters": rope,
        "qkv_bias": family in QKV_BIAS,
    }
    if family == "qwen2":
        fields["sliding_window"] = None  # as transformers' Qwen2Config sets it without use_sliding_window
    fields.pop("rope_scaling", None)
    fields.pop("rope_theta", None)
    return CheckpointConfig(**fields)


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; raises `Unreadable` naming the file if it is not one."""
    try:
        value = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Unreadable(f"{file} is not valid JSON, damaged or cut short ({exc})") from exc
    if not isinstance(value, dict):
        raise Unreadable(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; raises `Unreadable` naming the file if it is cut short or damaged."""
    try:
        return load_file(file)
    except SafetensorError as exc:
        raise Unreadable(f"{file} is not a readable safetensors file, cut short or damaged ({exc})") from exc


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: `model.safetensors`, or the shards its index names."""
    single = directory / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        raise Unsupported("no safetensors weights (model.safetensors or its index)")
    shards = sorted(set(read_json(index)["weight_map"].values()))
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(read_safetensors(directory / shard))
    return weights


def inverse_frequencies(rope: dict[str, Any], dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies, as transformers' `modeling_rope_utils` computes them for these three types."""
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope["rope_type"] == "linear":
        return inv_freq / rope["factor"]
    if rope["rope_type"] == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        context = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < context / high) * ~(wavelen > context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos and sin of RoPE, computed as transformers' LlamaRotaryEmbedding computes them."""

    def __init__(self, config: CheckpointConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(config.rope_parameters, config.head_dim), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def load_llama(directory: Path, config: CheckpointConfig, dtype: torch.dtype) -> nn.Module:
    """The checkpoint (its `read_config`) as a module tree with transformers' names, weights in `dtype`. Raises
    `Unsupported`, or `Unreadable` for a tensor the model needs that the checkpoint lacks."""
    weights = read_weights(directory)  # emptied as the tree takes its tensors: no tensor is held twice
    if weights and not any(name.startswith("model.") for name in weights):
        raise Unsupported("tensor names without the `model.` prefix (transformers maps them)")
    take = _Taker(weights, dtype, directory)
    inner = nn.Module()
    inner.embed_tokens = _holder(take("model.embed_tokens.weight"))
    inner.layers = nn.ModuleList(_layer(take, f"model.layers.{i}.", config) for i in range(config.num_hidden_layers))
    inner.norm = _holder(take("model.norm.weight"))
    inner.rotary_emb = RotaryEmbedding(config)
    model = nn.Module()
    model.config = config
    model.model = inner
    if config.tie_word_embeddings:
        head = inner.embed_tokens.weight
        weights.pop("lm_head.weight", None)  # a tied head saved anyway is the embedding's copy
    else:
        head = take("lm_head.weight")
    model.lm_head = _linear(head)
    if left := sorted(name for name in weights if "rotary_emb" not in name):
        raise Unsupported(f"tensors this reader does not know: {', '.join(left[:3])}")
    return model.eval()


def missing_tensors(directory: Path, names: list[str]) -> Unreadable:
    """The refusal of a checkpoint in `directory` that lacks the tensors `names` (a few named, then a count)."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    hint = ""
    if "lm_head.weight" in names:
        hint = " (an output head tied to the embeddings needs `tie_word_embeddings: true` in config.json)"
    return Unreadable(
        f"{directory} is an incomplete checkpoint: its weights have no {shown}{hint}; refusing to serve a model"
        " with missing weights filled with random values"
    )


class _Taker:
    """Takes tensors out of the checkpoint's dict (which then no longer holds them), cast to `dtype`. A missing
    one is `Unreadable` (`missing_tensors`), not `Unsupported`: transformers would fill it with random values."""

    def __init__(self, weights: dict[str, torch.Tensor], dtype: torch.dtype, directory: Path) -> None:
        self.weights, self.dtype, self.directory = weights, dtype, directory

    def __call__(self, name: str) -> nn.Parameter:
        if name not in self.weights:
            raise missing_tensors(self.directory, [name])
        return nn.Parameter(self.weights.pop(name).to(self.dtype), requires_grad=False)


def _holder(weight: nn.Parameter) -> nn.Module:
    module = nn.Module()
    module.weight = weight
    return module


def _linear(weight: nn.Parameter, bias: nn.Parameter | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = weight
    linear.bias = bias
    return linear


def _layer(take: _Taker, prefix: str, config: CheckpointConfig) -> nn.Module:
    attention = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        bias = take(f"{prefix}self_attn.{name}.bias") if config.qkv_bias and name != "o_proj" else None
        setattr(attention, name, _linear(take(f"{prefix}self_attn.{name}.weight"), bias))
    attention.head_dim = config.head_dim
    attention.scaling = config.head_dim**-0.5
    mlp = nn.Module()
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, _linear(take(f"{prefix}mlp.{name}.weight")))
    layer = nn.Module()
    layer.self_attn = attention
    layer.mlp = mlp
    layer.input_layernorm = _holder(take(f"{prefix}input_layernorm.weight"))
    layer.post_attention_layernorm = _holder(take(f"{prefix}post_attention_layernorm.weight"))
    return layer
