"""Memory planned at start: the KV token budget, the rows it buys, the prefix cache inside it, and a check that
the whole plan fits the memory this process can have, so running out shows up at start, not at peak load.

The slot cache gives every row the whole context window, so the KV part of the budget is rows x window. A
budget (`kv_cache_tokens`) below `max_batch_size` x window buys fewer rows, i.e. fewer sequences decoded
together (admission waits for a free row); it never shortens the window. The prefix cache's tokens
(`prefix_cache_tokens`) are counted inside the budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from inference_worker import llama
from inference_worker.quantize import INT4_GROUP, linear_for

log = logging.getLogger("llmbus.engine")

ROPE_TABLE_COPIES = 2  # the runner's decoder and its wide one (`model_runner.wide_decoder`) each hold their own
MEMORY_HEADROOM = 0.9  # of the available memory the plan may take (the rest: activations, allocator slack)
CGROUP = Path("/sys/fs/cgroup")  # this process's cgroup v2 (the container's own, in a cgroup namespace)


class MemoryPlanError(RuntimeError):
    pass


@dataclass(slots=True, frozen=True)
class MemoryPlan:
    rows: int
    window: int
    prefix_tokens: int
    bytes_per_token: int
    weight_bytes: int
    runner_bytes: int
    rope_bytes: int
    available_bytes: int | None
    device: str

    @property
    def kv_tokens(self) -> int:
        return self.rows * self.window + self.prefix_tokens

    @property
    def kv_bytes(self) -> int:
        return self.kv_tokens * self.bytes_per_token

    def describe(self) -> str:
        available = "unknown" if self.available_bytes is None else _gb(self.available_bytes)
        copies = f" + {_gb(self.runner_bytes)} of float32 and compiled copies" if self.runner_bytes else ""
        return (
            f"memory plan ({self.device}): KV cache {self.rows} rows x {self.window} tokens + prefix cache "
            f"{self.prefix_tokens} tokens = {self.kv_tokens} tokens x {self.bytes_per_token / 1024:.1f} KiB = "
            f"{_gb(self.kv_bytes)}; weights {_gb(self.weight_bytes)}{copies}; RoPE tables {_gb(self.rope_bytes)}; "
            f"available {available}"
        )


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * dtype.itemsize


def rope_table_bytes(config, window: int) -> int:
    """The hand-written decoders' RoPE tables (`llama.LlamaFamilyModel`): cos and sin for every position of the
    window, at most `head_dim` wide, in float32 at most, in each decoder a runner may hold: 8 MiB for SmolLM2's 8192
    positions, 256 MiB for a 128k-token window of 128-wide heads."""
    return ROPE_TABLE_COPIES * 2 * (window + 1) * head_dim_of(config) * 4


def plan_memory(
    model: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    max_rows: int,
    window: int,
    kv_cache_tokens: int = 0,
    prefix_cache_tokens: int = 0,
    runner_bytes: int = 0,
) -> MemoryPlan:
    """Rows and prefix tokens within the budget (0: `max_rows` full rows plus the prefix cache), checked with the
    memory the runner adds (`runner_bytes`: copies of the weights, not yet made) against the memory available now.
    Raises `MemoryPlanError` with the settings to change when it cannot fit."""
    budget = kv_cache_tokens or max_rows * window + prefix_cache_tokens
    if prefix_cache_tokens >= budget:
        raise MemoryPlanError(
            f"prefix_cache_tokens ({prefix_cache_tokens}) leaves nothing of kv_cache_tokens ({budget}) for the rows"
        )
    rows = min(max_rows, (budget - prefix_cache_tokens) // window)
    if rows < 1:
        raise MemoryPlanError(
            f"kv_cache_tokens ({budget}) cannot hold one row of the {window}-token context window plus "
            f"{prefix_cache_tokens} prefix-cache tokens: raise kv_cache_tokens or lower max_seq_len"
        )
    plan = MemoryPlan(
        rows,
        window,
        prefix_cache_tokens,
        kv_bytes_per_token(model.config, dtype),
        weight_bytes(model),
        runner_bytes,
        rope_table_bytes(model.config, window),
        available_memory(device),
        str(device),
    )
    needed = plan.kv_bytes + runner_bytes + plan.rope_bytes
    if plan.available_bytes is not None and needed > MEMORY_HEADROOM * plan.available_bytes:
        raise MemoryPlanError(
            f"{plan.describe()}: the KV cache does not fit; lower kv_cache_tokens, max_batch_size, max_seq_len "
            "or prefix_cache_tokens" + (", or run with --no-compile" if runner_bytes else "")
        )
    if rows < max_rows:
        log.warning("kv_cache_tokens %d buys %d of max_batch_size %d rows", budget, rows, max_rows)
    return plan


def available_memory(device: torch.device, cgroup: Path = CGROUP) -> int | None:
    """Bytes this process could still allocate: free GPU memory, or MemAvailable (within the limit of `cgroup`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    available = _meminfo_available()
    limit = cgroup_room(cgroup)
    if available is None:
        return limit
    return available if limit is None else min(available, limit)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_room(root: Path = CGROUP) -> int | None:
    """Bytes left under the cgroup v2 memory limit in `root` (None: no limit, or no cgroup v2). Page cache that can
    be dropped (`inactive_file`: the weights just read, say) is room, as the kernel reclaims it before it would
    refuse this process; `memory.current` counts it as used."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text())
        limit_bytes = int(limit)
    except (OSError, ValueError):
        return None
    return max(0, limit_bytes - max(0, used - _inactive_file(root)))


def _inactive_file(root: Path) -> int:
    try:
        for line in (root / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "inactive_file":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def quantized_bytes(model: nn.Module, quantize: str) -> int:
    """The quantized decoder's own weights (`--quantize`), held beside the model's dense ones: per projection (q, k
    and v fused, gate and up fused) int8 weights and a scale per output, or int4 ones two to a byte and a scale and
    a zero per group of 32 inputs (`quantize.py`), and a fused projection's bias; the int8 LM head."""
    if linear_for(quantize) is None or not llama.supports(model.config):
        return 0
    head = model.lm_head.weight
    total = head.shape[0] * (head.shape[1] + head.element_size())
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj)):
            total += _projection_bytes(group, quantize)
        total += _projection_bytes((mlp.down_proj,), quantize)
    return total


def _projection_bytes(group: tuple[nn.Linear, ...], quantize: str) -> int:
    outputs, inputs = sum(m.weight.shape[0] for m in group), group[0].weight.shape[1]
    itemsize = group[0].weight.element_size()
    if quantize == "int4":
        weights = outputs * inputs // 2 + (inputs // INT4_GROUP) * outputs * 2 * itemsize
    else:
        weights = outputs * (inputs + itemsize)
    fused_bias = len(group) > 1 and any(m.bias is not None for m in group)  # a single one's is the model's own
    return weights + (outputs * itemsize if fused_bias else 0)
