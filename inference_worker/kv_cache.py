"""A KV cache of fixed slots with per-row positions, for a batch whose rows join and leave at every step.

Layout per layer: keys/values `[max_slots, kv_heads, capacity, head_dim]`. A sequence owns one slot (row) and its
token i lives in column i, so rows never move when others join or leave, except that the engine keeps the live
rows packed in `[0, n)` (a finished row is replaced by the last one: one row copy). Attention then reads plain
views `[:n, :, :kv_len]` and the per-row 4D mask hides each row's unused columns.
The capacity (columns) grows by doubling up to the context window.

It offers the one method transformers' attention layers call on a cache, `update`.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_len: int = 256,
    ) -> None:
        self.max_len = max_len
        self.shape = (max_slots, kv_heads, min(initial_len, max_len), head_dim)
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._rows = slice(0, 0)
        self._row_index: torch.Tensor | None = None
        self._columns: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @torch.inference_mode()
    def ensure_capacity(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache's {self.max_len}")
        if length <= self.capacity:
            return
        new_len = min(self.max_len, max(length, 2 * self.capacity))
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                grown = old.new_zeros((*old.shape[:2], new_len, old.shape[3]))
                grown[:, :, : old.shape[2]] = old
                cache[i] = grown

    @property
    def kv_len(self) -> int:
        return self._kv_len

    def bind(self, rows: slice, columns: torch.Tensor) -> None:
        """Set where the next forward writes: rows `rows`, and for row r the columns `columns[r]` (shape [b, q])."""
        self.ensure_capacity(int(columns.max()) + 1)
        self._rows = rows
        self._row_index = torch.arange(columns.shape[0], device=columns.device)[:, None]
        self._columns = columns
        self._kv_len = int(columns.max()) + 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx][self._rows], self.values[layer_idx][self._rows]
        keys[self._row_index, :, self._columns] = key_states.transpose(1, 2)
        values[self._row_index, :, self._columns] = value_states.transpose(1, 2)
        return keys[:, :, : self._kv_len], values[:, :, : self._kv_len]

    @torch.inference_mode()
    def read_prefix(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (k[row, :, :length].clone(), v[row, :, :length].clone())
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    @torch.inference_mode()
    def write_prefix(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        length = kv[0][0].shape[1]
        self.ensure_capacity(length)
        for (k, v), keys, values in zip(kv, self.keys, self.values, strict=True):
            keys[row, :, :length] = k
            values[row, :, :length] = v

    @torch.inference_mode()
    def move_row(self, src: int, dst: int, length: int) -> None:
        for cache in (self.keys, self.values):
            for layer in cache:
                layer[dst, :, :length] = layer[src, :, :length]
