"""Model directories the loaders must refuse or read as transformers does: a checkpoint missing a weight, special
tokens only in special_tokens_map.json, no chat template, damaged tokenizer files, and a conversion killed midway."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedModel

from helpers.checkpoint_files import change_json, drop_tensors
from helpers.tiny_model import save_model_directory, tiny_model
from inference_worker.chat_tokenizer import ChatTokenizer, NoChatTemplate
from inference_worker.checkpoint import Unreadable, Unsupported
from inference_worker.disk_cache import cached_conversion
from inference_worker.model_loader import load_model

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return save_model_directory(tiny_model(), tmp_path / "tiny")


@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_a_checkpoint_missing_a_weight_is_refused_naming_it(directory: Path, backend: str) -> None:
    drop_tensors(directory, "model.layers.1.mlp.up_proj.weight")
    message = f"{directory} is an incomplete checkpoint: its weights have no model.layers.1.mlp.up_proj.weight"
    with pytest.raises(Unreadable, match=re.escape(message)):
        load_model(str(directory), dtype="float32", backend=backend)


@pytest.mark.parametrize("tie", [False, None])
def test_an_untied_checkpoint_without_lm_head_is_refused(directory: Path, tie: bool | None) -> None:
    """tie_word_embeddings false, or absent (transformers' Llama default: false)."""
    drop_tensors(directory, "lm_head.weight")
    if tie is None:
        change_json(directory / "config.json", drop=("tie_word_embeddings",))
    else:
        change_json(directory / "config.json", tie_word_embeddings=tie)
    with pytest.raises(Unreadable, match=re.escape(f"{directory} is an incomplete checkpoint: its weights have no")):
        load_model(str(directory), dtype="float32")


def test_the_transformers_fallback_refuses_missing_weights_naming_a_few_and_a_count(directory: Path) -> None:
    """A config the own reader leaves to transformers (biases) whose checkpoint has none of those biases."""
    change_json(directory / "config.json", attention_bias=True)
    pattern = rf"{re.escape(str(directory))} is an incomplete checkpoint: its weights have no (model\.\S+bias, ){{2}}"
    with pytest.raises(Unreadable, match=pattern + r"model\.\S+bias and 5 more"):
        load_model(str(directory), dtype="float32")


def add_bos_and_eos(directory: Path) -> None:
    template = directory / "chat_template.jinja"
    eos = "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    template.write_text("{{ bos_token }}" + template.read_text() + eos)


SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False},
    "eos_token": "<|im_end|>",
}


@pytest.mark.parametrize(
    ("config_change", "drop"),
    [
        ({}, TOKENS),  # only special_tokens_map.json defines them
        ({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}, ()),  # both do: transformers takes the map's
        ({"added_tokens_decoder": {}}, ()),  # transformers then reads no special_tokens_map.json
    ],
)
def test_special_tokens_are_read_as_transformers_reads_them(directory: Path, config_change: dict, drop: tuple) -> None:
    add_bos_and_eos(directory)
    change_json(directory / "tokenizer_config.json", drop=drop, **config_change)
    (directory / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP))
    own, reference = ChatTokenizer.load(directory), AutoTokenizer.from_pretrained(directory)
    for prompt in (True, False):
        text = own.apply_chat_template(TURNS, add_generation_prompt=prompt)
        assert text == reference.apply_chat_template(TURNS, add_generation_prompt=prompt, tokenize=False)
        assert own(text, add_special_tokens=False) == {"input_ids": reference(text, add_special_tokens=False).input_ids}
    assert own.special_tokens == reference.special_tokens_map
    assert own.eos_token_id == reference.eos_token_id is not None
    assert text.startswith(own.special_tokens["bos_token"]) and text.endswith(own.special_tokens["eos_token"])


@pytest.mark.parametrize("undefined", ["bos_token", "eos_token"])
def test_a_template_using_a_token_no_file_defines_is_left_to_transformers(directory: Path, undefined: str) -> None:
    add_bos_and_eos(directory)
    change_json(directory / "tokenizer_config.json", drop=(undefined,))
    with pytest.raises(Unsupported, match=undefined):
        ChatTokenizer.load(directory)
    loaded = load_model(str(directory), dtype="float32")
    assert isinstance(loaded.model, PreTrainedModel) and not isinstance(loaded.tokenizer, ChatTokenizer)


@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_a_model_without_a_chat_template_is_refused_at_load(directory: Path, backend: str) -> None:
    (directory / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((directory / "tokenizer_config.json").read_text())
    message = f"{directory} has no chat template: a chat model needs `chat_template` in tokenizer_config.json or a"
    with pytest.raises(NoChatTemplate, match=re.escape(message) + " chat_template.jinja file"):
        load_model(str(directory), dtype="float32", backend=backend)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
def test_a_cut_short_tokenizer_file_is_named_in_the_error(directory: Path, name: str) -> None:
    file = directory / name
    if not file.exists():
        file.write_text(json.dumps(SPECIAL_TOKENS_MAP))
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    with pytest.raises(Unreadable, match=re.escape(str(file))):
        load_model(str(directory), dtype="float32")


KILLED_CONVERSION = """
    import os, signal, sys
    from pathlib import Path
    from inference_worker.disk_cache import cached_conversion

    def convert(source: Path, staging: Path) -> None:
        (staging / "model.safetensors").write_bytes(b"half of the weights")
        os.kill(os.getpid(), signal.SIGKILL)  # as a frozen conversion thread at exit: no cleanup runs

    cached_conversion(Path(sys.argv[1]), "1.0", "fake", convert)
"""


def test_a_conversion_killed_midway_leaves_no_staging_directory_once_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMBUS_CACHE_DIR", str(tmp_path / "cache"))
    models, source = tmp_path / "cache" / "models", tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    code = textwrap.dedent(KILLED_CONVERSION)
    command = [sys.executable, "-c", code, str(source)]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert killed.returncode == -9, killed.stderr
    [leftover] = models.glob(".convert-*")
    assert (leftover / "model.safetensors").is_file()
    other = models / ".convert-other-0123456789ab.running"  # another target's, maybe converting now: kept
    other.mkdir()

    def convert(source: Path, staging: Path) -> None:
        (staging / "config.json").write_text("{}")

    target = cached_conversion(source, "1.0", "fake", convert)
    assert (target / "config.json").is_file() and not (target / "model.safetensors").exists()
    assert sorted(models.glob(".convert-*")) == [other]
