"""A static KV cache of fixed slots (rows), allocated once at start, for a batch whose rows join and leave each step.

Layout per layer: keys/values `[rows, kv_heads, row_len + 1, head_dim]`, one tensor each per layer (so compiled
code writes one layer's new columns in place instead of copying a stacked cache). A sequence owns one row and its
token i lives in column i. The engine keeps the live rows packed in `[0, n)`: a finished row is replaced by the
last one (one row copy). Attention reads plain views `[:n, :, :kv_len]` and masks each row's later columns.
Column `row_len` is scratch: padding tokens (of a padded prefill or a bucketed decode batch) write there, and no
real query ever sees it, so padding never touches a column a sequence owns.

On CPU the memory comes from the OS as zero pages that are committed when first written, so an idle worker costs
little RAM; `memory.plan_memory` checks the whole plan against the available memory at start. On CUDA it is
allocated (and committed) at once.

It also offers the one method transformers' attention layers call on a cache, `update`, for models that run on
the HF modules.
"""

from __future__ import annotations

import math
import mmap

import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-filled memory. On CPU an anonymous mapping: the OS hands out zero pages and commits each 4 KiB page when
    it is first written (no huge pages, which would commit 2 MiB for one written column)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * dtype.itemsize
    if size == 0:
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        rows: int,
        kv_heads: int,
        head_dim: int,
        row_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.rows = rows
        self.row_len = row_len
        self.scratch = row_len
        shape = (rows, kv_heads, row_len + 1, head_dim)
        self.keys = [zeros(shape, dtype, device) for _ in range(num_layers)]
        self.values = [zeros(shape, dtype, device) for _ in range(num_layers)]
        self._first_row = 0
        self._row_index: torch.Tensor | None = None
        self._columns: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def max_len(self) -> int:
        return self.row_len

    @torch.inference_mode()
    def read_prefix(self, row: int, length: int) -> LayerKV:
        return [
            (k[row, :, :length].clone(), v[row, :, :length].clone())
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    @torch.inference_mode()
    def write_prefix(self, row: int, kv: LayerKV) -> None:
        length = kv[0][0].shape[1]
        for (k, v), keys, values in zip(kv, self.keys, self.values, strict=True):
            keys[row, :, :length] = k
            values[row, :, :length] = v

    @torch.inference_mode()
    def move_row(self, src: int, dst: int, length: int) -> None:
        for cache in (self.keys, self.values):
            for layer in cache:
                layer[dst, :, :length] = layer[src, :, :length]

    # --- the transformers cache interface (models that run on the HF modules) ---------------------------------

    def bind(self, first_row: int, columns: torch.Tensor, kv_len: int) -> None:
        """Where the next HF forward writes: row `first_row + b` at columns `columns[b]`; it reads `[:kv_len]`."""
        self._first_row = first_row
        self._row_index = torch.arange(first_row, first_row + columns.shape[0], device=columns.device)[:, None]
        self._columns = columns
        self._kv_len = kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._row_index, :, self._columns] = key_states.transpose(1, 2)
        values[self._row_index, :, self._columns] = value_states.transpose(1, 2)
        rows = slice(self._first_row, self._first_row + self._columns.shape[0])
        return keys[rows, :, : self._kv_len], values[rows, :, : self._kv_len]
