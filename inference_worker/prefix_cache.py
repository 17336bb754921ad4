"""KV of shared prompt prefixes (the chat template's system turn, a conversation's earlier turns).

A prefix is everything before the last message's content, so requests that share a system prompt
reuse its KV: the engine copies it into the new slot and prefills only the rest. Entries are kept
in LRU order, bounded by count and by total tokens (`prefix_cache_tokens`, counted inside the memory plan).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    def __init__(self, max_entries: int = 32, max_tokens: int = 4096, min_len: int = 8) -> None:
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.min_len = min_len
        self.entries: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self.num_tokens = 0

    def get(self, prefix: tuple[int, ...]) -> LayerKV | None:
        kv = self.entries.get(prefix)
        if kv is not None:
            self.entries.move_to_end(prefix)
        return kv

    def wants(self, prefix: tuple[int, ...]) -> bool:
        return self.min_len <= len(prefix) <= self.max_tokens and prefix not in self.entries

    def put(self, prefix: tuple[int, ...], kv: LayerKV) -> None:
        self.entries[prefix] = kv
        self.num_tokens += len(prefix)
        while len(self.entries) > self.max_entries or self.num_tokens > self.max_tokens:
            evicted, _ = self.entries.popitem(last=False)
            self.num_tokens -= len(evicted)
