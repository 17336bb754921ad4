"""Any other HF causal LM behind the runner's decoder interface: its own modules, with the slot cache plugged in as
its `cache` (the attention layers call `cache.update`, which writes the new columns and returns the rows' views)."""

from __future__ import annotations

import torch
from torch import nn

from inference_worker.kv_cache import SlotKVCache


class HFDecoder(nn.Module):
    """`forward` has the signature of `llama.LlamaFamilyModel.forward`; the caches come from `slot_cache`."""

    def __init__(self, hf_model: nn.Module, slot_cache: SlotKVCache) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.slot_cache = slot_cache

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
        visible = kv_columns[None, None, :] <= positions[:, :, None]
        hidden = self.hf_model.get_decoder()(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=visible[:, None],
            cache=self.slot_cache,
            use_cache=True,
        ).last_hidden_state
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        hidden = hidden[:, -1] if last is None else hidden[rows, last]
        return self.hf_model.get_output_embeddings()(hidden).float()
