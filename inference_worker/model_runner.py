"""Runs the model over rows of the slot cache: one call per prefill batch and one per decode step.

The decoder is the hand-written Llama-family forward (`llama.py`) when the model is a Llama, Mistral or Qwen2,
else the HF modules with the slot cache plugged in (`hf_decoder.py`); both read and write the same cache. Prefill
chunks attend through PyTorch SDPA (on CPU 2-3x faster than two matmuls for a 211-token prompt; on CUDA kept off
cuDNN, which plans every new shape). Eager decode steps attend through two plain matmuls: on CPU 2.4x faster than
SDPA at batch 64, and on an H100 a SmolLM2 step at batch 1 took 27 ms against 80 through SDPA, which chose cuDNN
and planned each step's new length. Decode steps go through the compiled step (`compiled_decode.py`) once their
batch-size bucket is compiled, and run eagerly until then. On CPU short prefills go through it too, their prompts'
tokens one after another with no padding (`llama.LlamaFamilyModel.ragged`); long ones, whose attention the step's
loops would make slow, stay eager (`CompiledDecode.takes`). On CUDA the compiled step attends through the same two
matmuls, so no path of the worker calls cuDNN: with SDPA inside, the step's CUDA graphs failed at their first replay
on the engine thread (H100, torch 2.11: cuDNN could not allocate during the capture), and the engine fell back to
eager decode for good.

A bf16 Llama-family model on CPU prefills in float32, on a float32 copy of its weights, which writes the same bf16
KV cache: a prompt's keys and values serve every token after it, and with bf16 prefills SmolLM2 answered "What is
the capital of France?" with "L'Étoile, la Marseillaise" (`compiled_decode.on_wide_copy`). The copy costs 4 bytes a
parameter, and a tied embedding and LM head are two tensors in it (`float32_copy_bytes`). On CPUs whose float32
matmuls also beat bf16 ones at many rows (`hardware.py`), decode steps of `WIDE_FROM` rows or more run on the copy
too (`uses_wide_copy`), and a 344-token SmolLM2 prefill took 377 ms there instead of 600 ms. Elsewhere
`--prefill-matmuls bf16` trades some of that exactness for speed: a prefill's activations, norms, RoPE, attention
and LM head stay float32, and only its projections' matmuls are bf16, over the bf16 decoder's own weights
(`float32_activations`; no copy but the head's). SmolLM2's 176 prompt tokens in 8 rows took 125 ms compiled there,
against 255 ms on the copy; its prompt logits erred by half of bf16's, but it too answered "L'Étoile" to the
question above (README, The engine).

In a quantized mode (`--quantize int8|int4`) on CPU the same place, prefills and decode steps of `WIDE_FROM` rows or
more, goes to the model's own dense weights, which the HF model keeps anyway: the quantized kernels win only at a few
rows (at 64 rows SmolLM2's int8 projections took 95 ms against 43 ms in bf16, and 2.4-2.7x bf16 at 256 prompt
tokens). So a quantized worker decodes small batches on its quantized weights and everything wider on bf16 ones.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import nn

from inference_worker import attention, llama
from inference_worker.compiled_decode import WIDE_FROM, CompiledDecode, on_wide_copy
from inference_worker.disk_cache import cache_root
from inference_worker.hardware import float32_wins_wide_matmuls
from inference_worker.hf_decoder import HFDecoder
from inference_worker.jit_step import use_compile_cache
from inference_worker.kv_cache import SlotKVCache
from inference_worker.memory import MemoryPlan, MemoryPlanError, quantized_bytes, weight_bytes
from inference_worker.model_loader import LoadedModel
from inference_worker.quantize import head_for, linear_for

log = logging.getLogger("llmbus.engine")

ROPE_TABLE_MIN = 32768  # positions the shared RoPE tables cover at least (more if a runner asks for more)

_shared: weakref.WeakKeyDictionary[nn.Module, dict[str, llama.LlamaFamilyModel]] = weakref.WeakKeyDictionary()


def family_decoder(
    loaded: LoadedModel, row_len: int, quantize: str = "none", dtype: torch.dtype | None = None
) -> llama.LlamaFamilyModel | None:
    """The hand-written decoder of this loaded model, built once per process, quantize mode and dtype (it shares the
    HF weights unless it computes in another dtype, and every engine on it shares its compiled steps); None if the
    architecture is not of the family."""
    make_linear = linear_for(quantize)
    if not llama.supports(loaded.model.config):
        if make_linear is not None:
            raise ValueError(f"--quantize {quantize} needs a Llama, Mistral or Qwen2 model")
        return None
    built = _shared.setdefault(loaded.model, {})
    key = f"{quantize}/{dtype}"
    decoder = built.get(key)
    if decoder is None or decoder.cos.shape[0] <= row_len:
        length = max(row_len, min(loaded.max_context, ROPE_TABLE_MIN))
        make_head = head_for(quantize) or llama.Linear
        decoder = llama.LlamaFamilyModel(loaded.model, length, make_linear or llama.Linear, dtype, make_head).eval()
        built[key] = decoder
    return decoder


def float32_activations(loaded: LoadedModel, row_len: int) -> llama.LlamaFamilyModel:
    """The bf16 decoder's twin that computes in float32 over its projections (not copied) and a float32 LM head,
    built once."""
    projections = family_decoder(loaded, row_len)
    assert projections is not None
    built = _shared[loaded.model]
    decoder = built.get("float32 activations")
    if decoder is None or decoder.embed is not projections.embed:
        length = projections.cos.shape[0] - 1
        decoder = llama.LlamaFamilyModel(loaded.model, length, dtype=torch.float32, projections=projections).eval()
        built["float32 activations"] = decoder
    return decoder


def prefills_in_float32(loaded: LoadedModel, quantize: str) -> bool:
    """Whether prefills compute with float32 activations: a bf16 model of the Llama family, on CPU."""
    if loaded.device.type != "cpu" or loaded.dtype != torch.bfloat16 or quantize != "none":
        return False
    return llama.supports(loaded.model.config)


def float32_wins(loaded: LoadedModel) -> bool:
    """Whether this CPU's float32 matmuls beat bf16 ones at many rows, at the model's shapes (measured once)."""
    return float32_wins_wide_matmuls(loaded.model.config.hidden_size, loaded.model.config.intermediate_size)


def uses_float32_copy(loaded: LoadedModel, quantize: str, prefill_matmuls: str = "float32") -> bool:
    """Whether the runner keeps a float32 copy of the weights: where prefills compute in float32, unless they run
    bf16 matmuls (`--prefill-matmuls bf16`) on a CPU whose bf16 matmuls win at many rows."""
    if not prefills_in_float32(loaded, quantize):
        return False
    return prefill_matmuls == "float32" or float32_wins(loaded)


def uses_dense_wide(loaded: LoadedModel, quantize: str) -> bool:
    """Whether prefills and decode steps of `WIDE_FROM` rows or more run on the model's own dense weights: a quantized
    mode on CPU (see the module's docstring)."""
    return quantize != "none" and loaded.device.type == "cpu" and llama.supports(loaded.model.config)


def uses_wide_copy(loaded: LoadedModel, quantize: str) -> bool:
    """Whether decode steps of `WIDE_FROM` rows or more run on the wide decoder (`wide_decoder`) as well (and,
    compiled, on a graph of their own): in a quantized mode, and on the float32 copy where float32 matmuls win."""
    if uses_dense_wide(loaded, quantize):
        return True
    return prefills_in_float32(loaded, quantize) and float32_wins(loaded)


def added_bytes(
    loaded: LoadedModel, compile: bool, quantize: str, freeze_wide: bool = False, prefill_matmuls: str = "float32"
) -> int:
    """Memory a runner adds beside the loaded weights, for the memory plan: a quantized mode's quantized weights
    (`quantized_bytes`); the float32 copy (`float32_copy_bytes`) or, prefilling without one, the float32 LM head (4
    bytes a head parameter); on CPU the frozen compiled steps' packed weights (the general step's and the one-row
    step's, each about the size of the loaded ones) and, with `freeze_wide`, the wide step's packed ones (the float32
    copy's size again, the size of the loaded ones for a quantized mode's dense step)."""
    frozen = compile and loaded.device.type == "cpu" and llama.supports(loaded.model.config)
    if uses_float32_copy(loaded, quantize, prefill_matmuls):
        copies = float32_copy_bytes(loaded.model)
    else:
        copies = 4 * loaded.model.lm_head.weight.numel() if prefills_in_float32(loaded, quantize) else 0
    copies += quantized_bytes(loaded.model, quantize)
    copies += 2 * weight_bytes(loaded.model) if frozen else 0
    if not (frozen and freeze_wide and uses_wide_copy(loaded, quantize)):
        return copies
    wide = weight_bytes(loaded.model) if uses_dense_wide(loaded, quantize) else float32_copy_bytes(loaded.model)
    return copies + wide


def float32_copy_bytes(model: nn.Module) -> int:
    """The bytes of a Llama-family model's float32 copy (`family_decoder(..., torch.float32)`): 4 a parameter, and
    4 more a head parameter where the LM head is tied to the embedding. The model's parameters count a tied pair
    once, but the copy casts the embedding and the head apart (`llama.LlamaFamilyModel`), two tensors: SmolLM2's
    head (tied) is 113 MB of float32 that the plan left out, Llama-3.2-1B's 1.05 GB."""
    parameters = sum(p.numel() for p in model.parameters())
    head = model.lm_head.weight
    return 4 * (parameters + (head.numel() if head is model.model.embed_tokens.weight else 0))


def fit_runner(
    loaded: LoadedModel,
    compile: bool,
    quantize: str,
    plan: Callable[[int], MemoryPlan],
    prefill_matmuls: str = "float32",
) -> tuple[MemoryPlan, bool]:
    """The memory plan (`plan(runner_bytes)`), and whether the wide compiled step is frozen. Frozen, it has its own
    copy of the float32 weights, packed for oneDNN (SmolLM2 at batch 64 here: 116 ms a step against 126 reading the
    float32 copy's; 538 MB more memory, 660 MB on disk). Where that copy does not fit, the step reads the float32
    copy's weights."""
    if compile and uses_wide_copy(loaded, quantize):
        try:
            return plan(added_bytes(loaded, compile, quantize, True, prefill_matmuls)), True
        except MemoryPlanError as exc:
            log.warning("the wide decode step reads the float32 copy's weights (no room to freeze it): %s", exc)
    return plan(added_bytes(loaded, compile, quantize, False, prefill_matmuls)), False


def wide_decoder(
    loaded: LoadedModel, row_len: int, quantize: str, prefill_matmuls: str = "float32"
) -> llama.LlamaFamilyModel | None:
    """The decoder of prefills and (`uses_wide_copy`) large decode batches, if not the runner's own: a bf16 model's
    float32 copy or float32-activations twin, or a quantized mode's dense decoder on the model's own weights."""
    if uses_dense_wide(loaded, quantize):
        log.info("prefills and decode steps of %d rows or more run on the dense weights (faster there)", WIDE_FROM)
        return family_decoder(loaded, row_len)
    if not prefills_in_float32(loaded, quantize):
        return None
    if not uses_float32_copy(loaded, quantize, prefill_matmuls):
        log.info("prefills run bf16 matmuls over the bf16 weights, everything else in float32 (--prefill-matmuls)")
        return float32_activations(loaded, row_len)
    if uses_wide_copy(loaded, quantize):
        log.info("prefills and large decode batches run a float32 copy of the weights (faster matmuls on this CPU)")
    else:
        log.info("prefills run a float32 copy of the weights (exact keys and values for the prompt)")
    return family_decoder(loaded, row_len, quantize, torch.float32)


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        max_slots: int,
        max_len: int,
        compile: bool = False,
        quantize: str = "none",
        background_compile: bool = True,
        freeze_wide: bool = False,
        prefill_matmuls: str = "float32",
    ) -> None:
        config = loaded.model.config
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
        family = family_decoder(loaded, max_len, quantize)
        self.decoder: nn.Module = family if family is not None else HFDecoder(loaded.model, self.cache)
        self.wide = wide_decoder(loaded, max_len, quantize, prefill_matmuls)
        self.wide_decode = uses_wide_copy(loaded, quantize)  # implies a wide decoder
        self.attention = attention.matmul_attention
        on_cpu = self.device.type == "cpu"
        self.prefill_attention = attention.sdpa_attention if on_cpu else attention.sdpa_attention_without_cudnn
        self.compiled: CompiledDecode | None = None
        if compile and family is not None:
            use_compile_cache(str(cache_root() / "inductor"))
            decode_attention = attention.reduction_attention if on_cpu else attention.matmul_attention
            packages = cache_root() / "compiled"
            self.compiled = CompiledDecode(
                family, self.cache, decode_attention, max_slots, self.wide, packages, freeze_wide, self.wide_decode
            )
            if background_compile:
                self.compiled.start_background()

    @property
    def compile_state(self) -> str:
        """off, compiling, ready or failed."""
        return "off" if self.compiled is None else self.compiled.state

    @torch.inference_mode()
    def forward(self, first_row: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run row `first_row + r` on tokens `chunks[r]` placed at columns `starts[r]...`; return the float32
        logits of each row's last token, shape [rows, vocab]. Rows are right-padded to the longest chunk; the
        padding sits in the scratch column, so it never touches a column a sequence owns."""
        lengths = [len(c) for c in chunks]
        kv_len = max(s + n for s, n in zip(starts, lengths, strict=True))
        if self.compiled is not None and self.compiled.takes(first_row, lengths, kv_len):
            try:
                return self.compiled(first_row, chunks, starts, kv_len)
            except Exception:  # the step below rewrites the same cache columns, so the batch loses nothing
                self.compiled.failed = True
                log.exception("the compiled step failed; this engine runs eagerly from now on")
        width = max(lengths)
        tokens, positions = self._padded(chunks, starts, width)
        last = torch.tensor(lengths, device=self.device) - 1
        wide = self.wide is not None and on_wide_copy(len(chunks), sum(lengths), self.wide_decode)
        return (self.wide if wide else self.decoder)(
            tokens.to(self.device),
            positions.to(self.device),
            first_row,
            torch.arange(kv_len, device=self.device),
            self.cache.keys,
            self.cache.values,
            self.attention if width == 1 else self.prefill_attention,
            last,
        )

    def _padded(self, chunks: list[list[int]], starts: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The [rows, width] token and position tensors. A decode step's come from one list each: row by row, 256
        rows took 2.55 ms here, against 0.15 ms. A prefill's are filled row by row, faster than padding long lists."""
        if width == 1 and all(chunks):
            return torch.tensor(chunks), torch.tensor(starts)[:, None]
        tokens = torch.zeros((len(chunks), width), dtype=torch.long)
        positions = torch.full((len(chunks), width), self.cache.scratch, dtype=torch.long)
        for r, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
            tokens[r, : len(chunk)] = torch.tensor(chunk)
            positions[r, : len(chunk)] = torch.arange(start, start + len(chunk))
        return tokens, positions

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.cache.move_row(src, dst, length)

    def close(self) -> None:
        if self.compiled is not None:
            self.compiled.stop()
