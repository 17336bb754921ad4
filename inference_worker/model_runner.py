"""Runs the model over rows of the slot cache: one call per prefill batch and one per decode step."""

from __future__ import annotations

import torch

from inference_worker.kv_cache import SlotKVCache
from inference_worker.model_loader import LoadedModel


class ModelRunner:
    def __init__(self, loaded: LoadedModel, max_slots: int, max_len: int) -> None:
        config = loaded.model.config
        self.model = loaded.model
        self.device = loaded.device
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = SlotKVCache(
            config.num_hidden_layers,
            max_slots,
            config.num_key_value_heads,
            head_dim,
            max_len,
            loaded.dtype,
            loaded.device,
        )

    @torch.inference_mode()
    def forward(self, first_row: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run row `first_row + r` on tokens `chunks[r]` placed at columns `starts[r]...`; return the float32
        logits of each row's last token, shape [rows, vocab]. Rows are right-padded to the longest chunk."""
        lengths = torch.tensor([len(c) for c in chunks], device=self.device)
        width = int(lengths.max())
        tokens = torch.zeros((len(chunks), width), dtype=torch.long)
        for r, chunk in enumerate(chunks):
            tokens[r, : len(chunk)] = torch.tensor(chunk)
        start = torch.tensor(starts, device=self.device)[:, None]
        offsets = torch.arange(width, device=self.device)[None, :]
        columns = (start + offsets).clamp(max=self.cache.max_len - 1)  # pads past the window: masked, never read
        self.cache.bind(slice(first_row, first_row + len(chunks)), columns)
        key_columns = torch.arange(self.cache.kv_len, device=self.device)[None, None, :]
        causal = key_columns <= columns[:, :, None]
        real = key_columns < (start + lengths[:, None])[:, :, None]
        mask = (causal & real)[:, None, :, :]
        hidden = self.model.model(
            input_ids=tokens.to(self.device),
            position_ids=columns,
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
        ).last_hidden_state
        last = hidden[torch.arange(len(chunks), device=self.device), lengths - 1]
        return self.model.lm_head(last).float()

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.cache.move_row(src, dst, length)
