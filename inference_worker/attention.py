"""Attention of a forward's queries over their rows' cache columns, four ways; each takes q [B, T, H, D], keys and
values [B, KV, L, D] (views or gathers of the slot cache) and visible [B, T, L], and returns [B, T, H * D].

Which runs where (`model_runner.py`): eager decode uses `matmul_attention`, eager prefill `sdpa_attention` (kept off
cuDNN on CUDA), and the compiled step `reduction_attention` on CPU and `matmul_attention` on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """Attention as two plain matmuls, queries grouped by their KV head (no repeated keys). On CPU this beat
    SDPA by 2.4x at batch 64 decode (one query per row): q [B, T, H, D], k/v [B, KV, L, D], visible [B, T, L]."""
    batch, width, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    k, v = k.to(q.dtype), v.to(q.dtype)
    q = q.view(batch, width, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * width, dim)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    visible = visible[:, None, None].expand(batch, 1, group, width, visible.shape[-1])
    scores = scores.masked_fill(~visible.reshape(batch, 1, group * width, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).view(batch, kv_heads, group, width, dim)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, width, heads * dim)


def reduction_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """The same maths as broadcast products and sums, for compiled steps on CPU: inductor turns each into one loop
    that reads the cache rows in place, where bf16 batched matmuls over the strided cache views copied them first
    (1.7x faster at batch 64, 2.7x at batch 1, measured here). Four choices shape those loops, each measured alone
    at batch 64 over 151 columns (0.90 ms a layer before the first three, 0.62 after them, 0.50 after the fourth):
    - the rotated queries are written out first (`in_memory`); inlined, their RoPE was recomputed for every column;
    - the mask is added as a bias of 0 or -inf, rather than selected;
    - the softmax's division is applied to the output (one per dimension), not to every column's probability;
    - each query head of a KV head's group is its own sum over the same keys and values: inductor fuses the
      group's sums into one loop that loads and widens each bf16 key and value once, not once per query head."""
    batch, width, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = in_memory(q).view(batch, width, kv_heads, group, dim)
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill(~visible, float("-inf"))
    bias = bias[:, None]  # [B, 1, T, L]
    keys, values = k[:, :, None].float(), v[:, :, None].float()  # [B, KV, 1, L, D]
    outputs = []
    for head in range(group):
        query = q[:, :, :, head].permute(0, 2, 1, 3)[:, :, :, None, :].float()  # [B, KV, T, 1, D]
        scores = (query * keys).sum(-1) * scale + bias  # [B, KV, T, L]
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        outputs.append((weights[..., None] * values).sum(-2) / weights.sum(-1, keepdim=True))  # [B, KV, T, D]
    out = torch.stack(outputs, dim=2).to(q.dtype)  # [B, KV, G, T, D]
    return out.permute(0, 3, 1, 2, 4).reshape(batch, width, heads * dim)


def in_memory(x: torch.Tensor) -> torch.Tensor:
    """`x` itself; under inductor, computed into a buffer of its own rather than inlined into every reader."""
    import torch._inductor.inductor_prims  # registers the op; imported here, as inductor loads slowly

    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """PyTorch's fused attention (flash / memory-efficient kernels on CUDA), GQA without repeating the keys."""
    batch, width, heads, dim = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=visible[:, None], scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(batch, width, heads * dim)


def sdpa_attention_without_cudnn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
):
    """`sdpa_attention` kept off the cuDNN backend, for eager forwards on CUDA. cuDNN plans every new shape once,
    and an eager prefill's shapes change with each prompt: on an H100 (torch 2.11) a first-seen shape cost 1.7 ms
    of CPU per layer call, about 50 ms a SmolLM2 prefill."""
    with sdpa_kernel(_NOT_CUDNN):
        return sdpa_attention(q, k, v, visible, scale)


_NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
