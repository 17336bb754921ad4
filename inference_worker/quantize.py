"""Weight-only int8 for the layers' projections (`--quantize int8`): decode at small batches reads every weight once
per step, so half the bytes is up to twice the speed there.

Symmetric per-output-channel scales; the matmul is torch's own `_weight_int8pack_mm` (int8 weights, activations in
the model's dtype; oneDNN/AVX512 on CPU, and inductor lowers it when compiled), so no hand-written kernels. The
embedding and the LM head stay in the model's dtype (the head decides the next token; it is where int8 would hurt
most). `llmbus.quality` measures what it costs: perplexity and exact match against the unquantized model.
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


QUANTIZERS: dict[str, type[nn.Module] | None] = {"none": None, "int8": Int8Linear}


def linear_for(mode: str) -> type[nn.Module] | None:
    if mode not in QUANTIZERS:
        raise ValueError(f"unknown quantize mode {mode!r}: use one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[mode]
