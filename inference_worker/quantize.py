"""Weight-only int8 and int4 (`--quantize int8|int4`): decode at small batches reads every weight once per step, so
a half or a quarter of the bytes is up to two or four times the speed there.

int8: symmetric per-output-channel scales; the matmul is torch's own `_weight_int8pack_mm` (int8 weights,
activations in the model's dtype; oneDNN/AVX512 on CPU, and inductor lowers it when compiled), so no hand-written
kernels. The LM head is int8 in both modes (`head_for`); the embedding stays in the model's dtype (a step reads one
row of it). `llmbus.quality` measures what it costs: perplexity and exact match against the unquantized model.

int4 is asymmetric, in groups of 32 inputs (a scale and a zero per group, in the model's dtype), through torch's
`_weight_int4pack_mm_for_cpu`, which inductor also lowers (CPU only). It is the layout of GGUF's Q4_1, so the
shipped SmolLM2, whose projections are Q4_1, quantizes back to its own 4-bit values: its int4 projections differ
from its bf16 ones by rounding only.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights [out, in] and their scales [out] with weight ~= int8 * scale (symmetric, round to nearest)."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    return (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        int8, scales = quantize_per_channel(weight)
        self.weight = nn.Parameter(int8, requires_grad=False)
        self.scales = nn.Parameter(scales.to(weight.dtype), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch._weight_int8pack_mm(flat, self.weight, self.scales).view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


INT4_GROUP = 32


def quantize_groups(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes [out, in] (0..15, as int32) and the scales and zeros [in / group, out, 2], with
    weight ~= (code - 8) * scale + zero per group of `group` inputs (rounded between the group's min and max)."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"--quantize int4 needs layers whose inputs are a multiple of {group}, got {in_features}")
    w = weight.float().reshape(out_features, -1, group)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-8)
    codes = ((w - low) / scales).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    scales_and_zeros = torch.cat([scales, low + 8 * scales], dim=-1).transpose(0, 1).contiguous()
    return codes, scales_and_zeros.to(weight.dtype)


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError(f"--quantize int4 runs on CPU only, not on {weight.device.type}: use int8 or none")
        codes, scales_and_zeros = quantize_groups(weight)
        self.weight = nn.Parameter(torch._convert_weight_to_int4pack_for_cpu(codes, 1), requires_grad=False)
        self.scales_and_zeros = nn.Parameter(scales_and_zeros, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.scales_and_zeros.dtype)
        out = torch._weight_int4pack_mm_for_cpu(flat, self.weight, INT4_GROUP, self.scales_and_zeros)
        out = out.view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


QUANTIZERS: dict[str, type[nn.Module] | None] = {"none": None, "int8": Int8Linear, "int4": Int4Linear}


def linear_for(mode: str) -> type[nn.Module] | None:
    if mode not in QUANTIZERS:
        raise ValueError(f"unknown quantize mode {mode!r}: use one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[mode]


def head_for(mode: str) -> type[nn.Module] | None:
    """The LM head's quantized linear: int8 in both modes. SmolLM2's head (49,152 x 576) is a sixth of its weights;
    in int8 the one-row step took 4.98 ms against 5.99 with it in bf16 (AMD EPYC, alternating in one process), for
    a perplexity of 21.37 against 21.29. An int4 head gave int4 mode no more speed (5.33 against 5.35 ms)."""
    return None if linear_for(mode) is None else Int8Linear
