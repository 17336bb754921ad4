"""A hand-written decoder for the Llama family (Llama, Mistral, Qwen2) that reads and writes the slot KV cache.

Per layer: one fused QKV projection, RoPE from tables computed once, attention over the rows' own cache columns,
one fused gate/up projection; RMSNorm, residuals and SiLU are left to the compiler to fuse. The weights are the
loaded HF model's own tensors (the fused projections are concatenated once, and the HF modules are pointed at
views of them, so nothing is stored twice and `model.generate` keeps working).

Two ways to call it, on the same layers:
- `forward(tokens, positions, first_row, kv_columns, ...)`, padded: rows `first_row + b` of the cache run
  `tokens[b]` (a [rows, width] tensor, padded on the right) at columns `positions[b]`. The eager path.
- `ragged(tokens, positions, rows, last, kv_columns, ...)`: one flat list of tokens, token n in cache row `rows[n]`
  at column `positions[n]`, so several prompts (and decode rows) run together without padding; the logits are
  those of the tokens `last`. The compiled step's form: a decode step is the case of one token a row.
Either way each token's key and value are written at its column first, then it attends over columns
`[0, len(kv_columns))`, where column c is visible to a query at position p when c <= p (and p - c < the sliding
window, if the model has one): a prompt's tokens see each other's keys, written in the same layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from inference_worker.attention import Attention, in_memory

FAMILY = frozenset({"llama", "mistral", "qwen2"})

Rows = slice | torch.Tensor  # the cache rows of a forward's entries: a run of them, or one per entry


def supports(config) -> bool:
    """Whether the hand-written forward reproduces this HF config exactly (else the runner uses the HF modules)."""
    return (
        getattr(config, "model_type", None) in FAMILY
        and getattr(config, "hidden_act", "silu") == "silu"
        and not getattr(config, "pretraining_tp", 1) > 1
        and len(set(getattr(config, "layer_types", None) or ())) <= 1  # one window for all layers, or none
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the weight's dtype, the output cast back to the input's (float32 activations over bf16 weights)."""
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def fuse(*modules: nn.Linear, share: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (and bias) of one projection whose output is the modules' outputs side by side. With `share`, the
    HF modules are pointed at views of it, so the weights are stored once."""
    weight = torch.cat([m.weight.data for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.data for m in modules])
    if share:
        start = 0
        for m in modules:
            end = start + m.out_features
            m.weight.data = weight[start:end]
            if m.bias is not None:
                m.bias.data = bias[start:end]
            start = end
    return weight, bias


MakeLinear = Callable[[torch.Tensor, torch.Tensor | None], nn.Module]
Projection = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # how a forward applies its projections


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linear(x)


def project_one_row(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A `Linear` of one row as a broadcast product and a sum over its inputs: the form of the CPU step of one row
    (`aot_step`). Inductor makes each projection one loop that reads the bf16 weights once, at memory speed, where
    oneDNN's one-row matmul reached about half of it on the AMX Xeon (SmolLM2's 121 projections: 11.6 against 24.6
    ms). The input is written out first, so that its norm or SiLU is not recomputed for every output. Any other
    projection (a quantized one) runs as its module does."""
    if type(linear) is not Linear:
        return linear(x)
    weight, bias = linear.weight, linear.bias
    rows = in_memory(x.to(weight.dtype)).float()[..., None, :]
    out = (rows * weight).sum(-1)  # float32: the weight is widened as it is read, never stored so (frozen or not)
    if bias is not None:
        out = out + bias.float()
    return out.to(weight.dtype).to(x.dtype)


def _cast(tensors: tuple[torch.Tensor, torch.Tensor | None], dtype: torch.dtype | None):
    weight, bias = tensors
    if dtype is None:
        return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _param(tensor: torch.Tensor, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(tensor if dtype is None else tensor.to(dtype), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        hf_layer: nn.Module,
        config,
        make_linear: MakeLinear = Linear,
        dtype: torch.dtype | None = None,
        projections: DecoderLayer | None = None,
    ) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        if projections is not None:
            self.qkv, self.o = projections.qkv, projections.o
            self.gate_up, self.down = projections.gate_up, projections.down
        else:
            share = make_linear is Linear and dtype is None
            self.qkv = make_linear(*_cast(fuse(attn.q_proj, attn.k_proj, attn.v_proj, share=share), dtype))
            self.o = make_linear(*_cast(_weight_and_bias(attn.o_proj), dtype))
            self.gate_up = make_linear(*_cast(fuse(mlp.gate_proj, mlp.up_proj, share=share), dtype))
            self.down = make_linear(*_cast(_weight_and_bias(mlp.down_proj), dtype))
        self.input_norm = _param(hf_layer.input_layernorm.weight.data, dtype)
        self.post_norm = _param(hf_layer.post_attention_layernorm.weight.data, dtype)
        self.eps = config.rms_norm_eps
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.intermediate = mlp.gate_proj.out_features

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: Rows,
        positions: torch.Tensor,
        visible: torch.Tensor,
        attention: Attention,
        projection: Projection = project,
    ) -> torch.Tensor:
        """x: [B, width, hidden]; entry b is cache row `rows[b]` (a slice of rows is read as a view, a tensor of
        them gathered, which the compiler folds into the attention's loops)."""
        batch, width, _ = x.shape
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = projection(self.qkv, rms_norm(x, self.input_norm, self.eps))
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = rotate(q.view(batch, width, self.heads, self.head_dim), cos, sin)
        k = rotate(k.view(batch, width, self.kv_heads, self.head_dim), cos, sin)
        at = _row_index(rows, x.device)[:, None]
        k_cache[at, :, positions] = k.to(k_cache.dtype)
        v_cache[at, :, positions] = v.view(batch, width, self.kv_heads, self.head_dim).to(v_cache.dtype)
        kv_len = visible.shape[-1]
        keys = k_cache[rows, :, :kv_len]
        values = v_cache[rows, :, :kv_len]
        x = x + projection(self.o, attention(q, keys, values, visible, self.scale))
        gate, up = projection(self.gate_up, rms_norm(x, self.post_norm, self.eps)).split(self.intermediate, dim=-1)
        return x + projection(self.down, F.silu(gate) * up)


class LlamaFamilyModel(nn.Module):
    """Built from a loaded HF `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` (sharing its weights).
    `make_linear` builds the layers' projections (`Linear`, or a quantized one), `make_head` the LM head.
    With `dtype`, it computes in that dtype on copies of the weights (the KV cache keeps its own dtype). With
    `projections` (another decoder of the same model), its embedding and projections are that decoder's modules,
    shared, and its norms, RoPE tables and LM head are its own, in `dtype`: float32 activations over bf16 matmuls,
    for prefills (model_runner.py). The head is not shared: its logits would be rounded to bf16, which ties near
    ties (SmolLM2's first tokens "L" and "The" both at 25.125 for "What is the capital of France?")."""

    def __init__(
        self,
        hf_model: nn.Module,
        max_len: int,
        make_linear: MakeLinear = Linear,
        dtype: torch.dtype | None = None,
        make_head: MakeLinear = Linear,
        projections: LlamaFamilyModel | None = None,
    ) -> None:
        super().__init__()
        config = hf_model.config
        inner = hf_model.model
        shared = [None] * len(inner.layers) if projections is None else projections.layers
        self.layers = nn.ModuleList(
            DecoderLayer(layer, config, make_linear, dtype, same)
            for layer, same in zip(inner.layers, shared, strict=True)
        )
        self.norm = _param(inner.norm.weight.data, dtype)
        self.embed = projections.embed if projections is not None else _param(inner.embed_tokens.weight.data, dtype)
        self.lm_head = make_head(*_cast((hf_model.lm_head.weight.data, None), dtype))
        self.eps = config.rms_norm_eps
        self.window = getattr(config, "sliding_window", None) if _uses_sliding_window(config) else None
        cos, sin = _rope_tables(inner.rotary_emb, max_len + 1, self.norm.dtype, self.norm.device)
        self.rope = _rope_settings(config)  # what the tables are made from (a compiled step's package is named by it)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        first_row: int,
        kv_columns: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        attention: Attention,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32) of row b's token `last[b]` (default: its last), writing K/V at `positions`.

        tokens/positions: [B, T]; rows first_row + b of the cache; kv_columns: arange(L), the columns read.
        """
        rows = slice(first_row, first_row + tokens.shape[0])
        x = self.hidden_states(tokens, positions, rows, kv_columns, keys, values, attention)
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.head(x)

    def ragged(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        last: torch.Tensor,
        kv_columns: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        attention: Attention,
        projection: Projection = project,
    ) -> torch.Tensor:
        """Logits (float32) of the tokens `last` [S]; token n of tokens/positions/rows [N] runs in cache row
        `rows[n]` at column `positions[n]`. Each token is a row of width 1 here, with its own row's columns."""
        x = self.hidden_states(
            tokens[:, None], positions[:, None], rows, kv_columns, keys, values, attention, projection
        )
        return self.head(x[last, 0], projection)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        rows: Rows,
        kv_columns: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        attention: Attention,
        projection: Projection = project,
    ) -> torch.Tensor:
        x = F.embedding(tokens, self.embed).to(self.norm.dtype)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]
        visible = kv_columns[None, None, :] <= positions[:, :, None]
        if self.window is not None:
            visible &= kv_columns[None, None, :] > positions[:, :, None] - self.window
        for layer, k_cache, v_cache in zip(self.layers, keys, values, strict=True):
            x = layer(x, cos, sin, k_cache, v_cache, rows, positions, visible, attention, projection)
        return x

    def head(self, x: torch.Tensor, projection: Projection = project) -> torch.Tensor:
        return projection(self.lm_head, rms_norm(x, self.norm, self.eps)).float()


def _row_index(rows: Rows, device: torch.device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


def _weight_and_bias(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.weight.data, None if linear.bias is None else linear.bias.data


def _uses_sliding_window(config) -> bool:
    """Whether every layer attends through the sliding window (a config that mixes window and full-attention
    layers, as Qwen2 does from `max_window_layers` on, is not `supports`-ed: the HF modules run it)."""
    if getattr(config, "sliding_window", None) is None:
        return False
    if layer_types := getattr(config, "layer_types", None):
        return all(kind == "sliding_attention" for kind in layer_types)
    return getattr(config, "use_sliding_window", True)


def _rope_settings(config) -> str:
    """The config's fields that shape the RoPE tables, as text."""
    fields = {k: v for k, v in config.to_dict().items() if "rope" in k or k in ("head_dim", "partial_rotary_factor")}
    return json.dumps(fields, sort_keys=True, default=str)


def _rope_tables(rotary: nn.Module, length: int, dtype: torch.dtype, device: torch.device):
    """cos/sin for every position, from the HF model's own rotary module (so every RoPE scaling type matches)."""
    positions = torch.arange(length, device=device)[None]
    probe = torch.empty(0, dtype=dtype, device=device)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    assert math.prod(cos.shape[:2]) == length
    return cos[0], sin[0]
