"""Any other HF causal LM behind the runner's decoder interface: its own modules, with the slot cache plugged in as
its `cache` (the attention layers call `cache.update`, which writes the new columns and returns the rows' views).

The decoder gets ready masks, which transformers uses as they are, so they carry what its own mask functions would
add: a query at position p sees columns c <= p, and on a sliding-window layer only p - window < c (transformers'
`sliding_window_overlay`). A model whose layers differ (Qwen2's `max_window_layers`, Gemma 2's alternating layers)
gets a mask per layer type, the mapping those models accept. The LM head's output is then scaled or capped as the
model's own forward does it (Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2 caps
at `final_logit_softcapping`); a model type that sets such a field in a way this module does not know is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from inference_worker.kv_cache import SlotKVCache

MASKED_KINDS = frozenset({"full_attention", "sliding_attention"})
# model types whose causal LM scales the LM head's output by a config field: (field, whether it divides)
_GRANITES = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa")
SCALED_LOGITS = dict.fromkeys(_GRANITES, ("logits_scaling", True))
SCALED_LOGITS |= dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), ("logit_scale", False))
SCALED_LOGITS["hyperclovax"] = ("logits_scaling", False)
# model types whose causal LM caps its logits at `final_logit_softcapping` (cap * tanh(logits / cap))
SOFTCAPPED_LOGITS = frozenset({"gemma2", "gemma3_text", "vaultgemma", "nanochat"})
# fields that change the logits somewhere in transformers; set on any other model type, it is refused
LOGIT_FIELDS = ("logits_scaling", "logit_scale", "final_logit_softcapping", "output_multiplier", "lm_head_multiplier")


def mask_kinds(config: Any) -> list[str]:
    """The attention layer types of the model: its `layer_types`, or one type for all layers (a model without
    them, such as Mistral or Phi-3, windows every layer when its config has a `sliding_window`)."""
    if types := getattr(config, "layer_types", None):
        kinds = sorted(set(types))
    else:
        kinds = ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"]
    if unknown := [kind for kind in kinds if kind not in MASKED_KINDS]:
        raise ValueError(f"the HF decoder cannot mask layers of type {', '.join(unknown)}")
    if "sliding_attention" in kinds and not getattr(config, "sliding_window", None):
        raise ValueError("sliding-window layers without a `sliding_window` size")
    return kinds


def logit_transform(config: Any) -> tuple[float, bool, float | None]:
    """(scale, whether the logits are divided by it, softcap) of the model's forward after its LM head."""
    model_type = getattr(config, "model_type", None)
    scale, divides, cap = 1.0, False, None
    if model_type in SCALED_LOGITS:
        field, divides = SCALED_LOGITS[model_type]
        scale = getattr(config, field)
    if model_type in SOFTCAPPED_LOGITS:
        cap = getattr(config, "final_logit_softcapping", None)
    elif model_type not in SCALED_LOGITS and (fields := [f for f in LOGIT_FIELDS if getattr(config, f, None)]):
        raise ValueError(f"model type {model_type!r} sets {', '.join(fields)}: the HF decoder does not know its logits")
    return scale, divides, cap


class HFDecoder(nn.Module):
    """`forward` has the signature of `llama.LlamaFamilyModel.forward`; the caches come from `slot_cache`. Raises
    ValueError for a model whose masks or logits it cannot reproduce."""

    def __init__(self, hf_model: nn.Module, slot_cache: SlotKVCache) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.slot_cache = slot_cache
        config = hf_model.config
        self.kinds = mask_kinds(config)
        self.window: int | None = getattr(config, "sliding_window", None)
        self.scale, self.divides, self.cap = logit_transform(config)
        implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"the HF decoder masks for sdpa or eager attention, not {implementation}")
        self.additive = implementation == "eager"  # eager attention adds its mask to the scores

    def masks(self, positions: torch.Tensor, kv_columns: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The [rows, 1, width, columns] mask of each layer type (the one mask if all layers share a type): True
        where a query sees a column, or for eager attention 0 there and the dtype's minimum elsewhere."""
        columns, queries = kv_columns[None, None, :], positions[:, :, None]
        masks = {}
        for kind in self.kinds:
            visible = columns <= queries
            if kind == "sliding_attention":
                visible &= columns > queries - self.window
            if self.additive:
                dtype = self.hf_model.dtype
                additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
                visible = additive.masked_fill_(~visible, torch.finfo(dtype).min)
            masks[kind] = visible[:, None]
        return masks if len(masks) > 1 else masks[self.kinds[0]]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf_model.get_output_embeddings()(hidden)
        logits = logits / self.scale if self.divides else logits * self.scale
        if self.cap is not None:
            logits = torch.tanh(logits.float() / self.cap) * self.cap
        return logits.float()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        first_row: int,
        kv_columns: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        attention=None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.slot_cache.bind(first_row, positions, kv_columns.shape[0])
        hidden = self.hf_model.get_decoder()(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=self.masks(positions, kv_columns),
            cache=self.slot_cache,
            use_cache=True,
        ).last_hidden_state
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        hidden = hidden[:, -1] if last is None else hidden[rows, last]
        return self.logits(hidden)
