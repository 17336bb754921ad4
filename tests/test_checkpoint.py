"""A Llama checkpoint read without transformers (`checkpoint.py`, `chat_tokenizer.py`) gives what transformers gives:
the same prompt ids, end tokens and logits, and the same compiled-step package name; anything it does not read
exactly loads through transformers instead."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import jinja2
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from helpers.checkpoint_files import add_missing_biases
from helpers.tiny_model import save_model_directory, tiny_model
from inference_worker import checkpoint, disk_cache, step_packages
from inference_worker.attention import reduction_attention
from inference_worker.chat_tokenizer import ChatTokenizer
from inference_worker.checkpoint import CheckpointConfig, Unsupported, read_config
from inference_worker.disk_cache import cached_conversion
from inference_worker.llama import LlamaFamilyModel
from inference_worker.model_loader import LoadedModel, Unreadable, load_model, load_tokenizer
from inference_worker.model_runner import ModelRunner

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief. <|im_end|> é ü 日本 🙂"}, {"role": "user", "content": "Hi\n\n  {{ x }}"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": ""}],
]


def logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    return ModelRunner(loaded, 2, 128, compile=False).forward(0, [ids], [0])


@pytest.mark.model
def test_smollm2_read_without_transformers_equals_the_transformers_load() -> None:
    own = load_model(dtype="bfloat16")
    reference = load_model(dtype="bfloat16", backend="transformers")
    assert not isinstance(own.model, PreTrainedModel) and isinstance(reference.model, PreTrainedModel)
    assert isinstance(own.tokenizer, ChatTokenizer)
    for turns in CONVERSATIONS:
        assert own.encode_chat_with_prefix(turns) == reference.encode_chat_with_prefix(turns)
    assert (own.eos_token_ids, own.max_context, own.name) == (
        reference.eos_token_ids,
        reference.max_context,
        reference.name,
    )
    ids = own.encode_chat(CONVERSATIONS[0])
    assert torch.equal(logits(own, ids), logits(reference, ids))
    # the same package serves both: a worker finds the one a test (or another loader) built
    names = [
        step_packages.package_name(LlamaFamilyModel(m.model, 256), reduction_attention, frozen=False)
        for m in (own, reference)
    ]
    assert names[0] == names[1]


@pytest.mark.model
def test_a_worker_loads_smollm2_without_importing_transformers() -> None:
    code = (
        "import sys; import inference_worker.worker, bus_gateway.app; "
        "from inference_worker.model_loader import load_model; load_model(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_an_untied_sharded_llama_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    tiny = tiny_model()
    assert not tiny.model.config.tie_word_embeddings
    directory = save_model_directory(tiny, tmp_path / "tiny", max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    own = load_model(str(directory), dtype="float32")
    reference = load_model(str(directory), dtype="float32", backend="transformers")
    assert isinstance(own.model.config, CheckpointConfig)
    assert own.model.lm_head.weight.data_ptr() != own.model.model.embed_tokens.weight.data_ptr()
    ids = own.encode_chat(CONVERSATIONS[1])
    assert ids == reference.encode_chat(CONVERSATIONS[1])
    assert torch.equal(logits(own, ids), logits(reference, ids))


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ((MistralConfig, MistralForCausalLM), {"sliding_window": 12}),
        ((MistralConfig, MistralForCausalLM), {"sliding_window": None}),
        ((Qwen2Config, Qwen2ForCausalLM), {"tie_word_embeddings": True}),
    ],
)
def test_mistral_and_qwen2_are_read_as_transformers_reads_them(tmp_path: Path, family: tuple, extra: dict) -> None:
    """Mistral's window (shorter than the prompt, so it matters) and Qwen2's q/k/v biases (made non-zero)."""
    config_class, model_class = family
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = config_class(
        vocab_size=len(tokenizer), num_key_value_heads=2, max_position_embeddings=512, **shape, **extra
    )
    model = model_class(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    tiny = LoadedModel(model, tokenizer, "tiny", torch.device("cpu"), torch.float32, frozenset({2}), 512)
    directory = save_model_directory(tiny, tmp_path / "tiny")
    own = load_model(str(directory), dtype="float32")
    reference = load_model(str(directory), dtype="float32", backend="transformers")
    assert isinstance(own.model.config, CheckpointConfig)
    ids = own.encode_chat(CONVERSATIONS[1])
    assert len(ids) > 12
    assert torch.equal(logits(own, ids), logits(reference, ids))
    decoders = [LlamaFamilyModel(m.model, 128) for m in (own, reference)]
    assert decoders[0].window == decoders[1].window == extra.get("sliding_window")


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}
LLAMA3_ROPE |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": LLAMA3_ROPE},
        {"rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},  # the older form of the settings
        # both forms: transformers takes rope_scaling's (`rope_scaling or rope_parameters`)
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_scaling": LLAMA3_ROPE},
    ],
)
def test_scaled_rope_is_read_as_transformers_reads_it(tmp_path: Path, rope: dict) -> None:
    directory = save_model_directory(tiny_model(), tmp_path / "tiny")
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters", None)
    (directory / "config.json").write_text(json.dumps({**config, **rope}))
    own = load_model(str(directory), dtype="float32")
    reference = load_model(str(directory), dtype="float32", backend="transformers")
    assert isinstance(own.model.config, CheckpointConfig)
    rotary = own.model.model.rotary_emb.inv_freq, reference.model.model.rotary_emb.inv_freq
    assert torch.equal(*rotary)
    default = tiny_model().model.model.rotary_emb.inv_freq
    assert not torch.allclose(rotary[0], default)  # the scaling changed the frequencies
    ids = own.encode_chat(CONVERSATIONS[1])
    assert torch.equal(logits(own, ids), logits(reference, ids))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model_type": "gemma"}, "model_type 'gemma'"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8}, "Qwen2 sliding window"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE type 'dynamic'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE type 'dynamic'"),  # beside rope_parameters
        ({"attention_bias": True}, "biases"),
    ],
)
def test_a_checkpoint_the_reader_does_not_cover_loads_through_transformers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: dict, reason: str
) -> None:
    directory = save_model_directory(tiny_model(), tmp_path / "tiny")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    add_missing_biases(directory)  # the biases these configs ask for: a checkpoint without them is refused
    with caplog.at_level(logging.INFO, logger="llmbus.model"):
        loaded = load_model(str(directory), dtype="float32")
    assert isinstance(loaded.model, PreTrainedModel)
    assert any("loads through transformers" in r.message and reason in r.message for r in caplog.records)


def test_json_nulls_leave_the_defaults_and_a_null_required_field_is_missing(tmp_path: Path) -> None:
    directory = save_model_directory(tiny_model(), tmp_path / "tiny")
    config = json.loads((directory / "config.json").read_text())
    nulls = {"num_key_value_heads": None, "rms_norm_eps": None, "tie_word_embeddings": None, "rope_theta": None}
    (directory / "config.json").write_text(json.dumps({**config, **nulls}))
    read = read_config(directory)
    assert (read.num_key_value_heads, read.rms_norm_eps, read.tie_word_embeddings) == (4, 1e-6, False)
    assert read.rope_parameters["rope_theta"] == 10000.0
    (directory / "config.json").write_text(json.dumps({**config, "hidden_size": None}))
    with pytest.raises(Unsupported, match=r"config\.json has no hidden_size"):
        read_config(directory)


def test_the_checkpoints_tensors_leave_its_dict_as_the_tree_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tensor is dropped from the dict read from disk once its (cast) copy is in the tree: the two are never
    held at once for the whole model."""
    directory = save_model_directory(tiny_model(), tmp_path / "tiny")
    weights = checkpoint.read_weights(directory)
    sizes: list[int] = []
    cast = torch.Tensor.to

    def counting_cast(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        sizes.append(len(weights))
        return cast(tensor, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_weights", lambda _: weights)
    monkeypatch.setattr(torch.Tensor, "to", counting_cast)
    model = checkpoint.load_llama(directory, read_config(directory), torch.bfloat16)
    monkeypatch.undo()
    assert weights == {}
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # one fewer at each cast
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16


def test_the_chat_template_comes_from_tokenizer_config_and_raises_as_transformers_does(tmp_path: Path) -> None:
    directory = save_model_directory(tiny_model(), tmp_path / "tiny")
    template = (directory / "chat_template.jinja").read_text()
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    strict = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('starts with the assistant') }}{% endif %}"
    named = [{"name": "default", "template": strict + template}, {"name": "tool_use", "template": "unused"}]
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    tokenizer = ChatTokenizer.load(directory)
    reference = load_model(str(directory), dtype="float32", backend="transformers").tokenizer
    for turns in CONVERSATIONS:
        assert tokenizer.apply_chat_template(turns, add_generation_prompt=True) == reference.apply_chat_template(
            turns, add_generation_prompt=True, tokenize=False
        )
    with pytest.raises(jinja2.TemplateError, match="starts with the assistant"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_a_templates_namespace_works_and_refuses_underscore_names(tmp_path: Path) -> None:
    directory = save_model_directory(tiny_model(), tmp_path / "tiny")
    backend = ChatTokenizer.load(directory).backend_tokenizer
    found = (
        "{% set ns = namespace(system=false) %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.system = true %}{% endif %}{% endfor %}{{ ns.system }}"
    )
    assert ChatTokenizer(backend, found, {}).apply_chat_template(CONVERSATIONS[1]) == "True"
    for template in ("{% set ns = namespace(_x=1) %}", "{% set ns = namespace() %}{% set ns._x = 1 %}"):
        with pytest.raises(jinja2.exceptions.SecurityError, match="_x"):
            ChatTokenizer(backend, template, {}).apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize("backend", ["auto", "transformers"])
@pytest.mark.parametrize("shards", [None, "100KB"])
def test_a_cut_short_safetensors_file_is_named_in_the_error(tmp_path: Path, backend: str, shards: str | None) -> None:
    options = {} if shards is None else {"max_shard_size": shards}
    directory = save_model_directory(tiny_model(), tmp_path / "tiny", **options)
    damaged = sorted(directory.glob("*.safetensors"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:-100])
    message = re.escape(f"{damaged} is not a readable safetensors file, cut short or damaged")
    with pytest.raises(Unreadable, match=message):
        load_model(str(directory), dtype="float32", backend=backend)


def test_a_broken_config_json_is_named_in_the_error(tmp_path: Path) -> None:
    directory = save_model_directory(tiny_model(), tmp_path / "tiny")
    config = directory / "config.json"
    config.write_text(config.read_text()[:50])
    with pytest.raises(Unreadable, match=re.escape(f"{config} is not valid JSON, damaged or cut short")):
        load_model(str(directory), dtype="float32")
    config.write_text("[1, 2]")
    with pytest.raises(Unreadable, match=re.escape(f"{config} holds a JSON list, not an object")):
        load_model(str(directory), dtype="float32")


class FakeConversion:
    """A source file and a converter that records its calls and writes a config.json (the GGUF's takes 20 s)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LLMBUS_CACHE_DIR", str(tmp_path / "cache"))
        self.models = tmp_path / "cache" / "models"
        self.source = tmp_path / "model.gguf"
        self.source.write_bytes(b"GGUF")
        self.calls: list[str] = []

    def __call__(self, source: Path, staging: Path) -> None:
        self.calls.append(threading.current_thread().name)
        (staging / "config.json").write_text("{}")

    def run(self) -> Path:
        return cached_conversion(self.source, "1.0", "fake", self)


def test_the_conversion_is_cached_by_the_sources_content_and_the_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeConversion(tmp_path, monkeypatch)
    targets = [fake.run(), fake.run()]
    assert targets[0] == targets[1] and len(fake.calls) == 1
    modified = fake.source.stat().st_mtime_ns + 10**9
    os.utime(fake.source, ns=(modified, modified))  # pip's install time: another venv with the same wheel shares it
    assert fake.run() == targets[0] and len(fake.calls) == 1
    fake.source.write_bytes(b"FUGG")  # the same size: a key of name, version and size alone missed it
    targets.append(fake.run())
    monkeypatch.setattr(disk_cache, "CONVERSION_FORMAT", disk_cache.CONVERSION_FORMAT + 1)
    targets.append(fake.run())
    assert len(set(targets)) == 3 and len(fake.calls) == 3
    assert all((target / "config.json").is_file() for target in targets)
    week_and_a_day_ago = time.time() - disk_cache.UNUSED_CONVERSION_S - 86400
    os.utime(targets[0], (week_and_a_day_ago, week_and_a_day_ago))  # an older wheel's, unused since
    assert fake.run() == targets[-1] and len(fake.calls) == 3
    assert not (fake.models / f".{targets[0].name}.lock").exists()  # with its lock
    assert not targets[0].exists() and targets[-2].is_dir()  # removed, while the one used a moment ago stays


def test_the_cached_conversion_is_readable_by_others_as_the_umask_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeConversion(tmp_path, monkeypatch)
    umask = os.umask(0o022)
    try:
        target = fake.run()
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's 0700


def test_a_killed_conversions_staging_directory_is_removed_a_day_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeConversion(tmp_path, monkeypatch)
    fake.models.mkdir(parents=True)
    stale, live = fake.models / ".convert-killed", fake.models / ".convert-running"
    for staging in (stale, live):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (stale, stale / "model.safetensors"):
        os.utime(path, (two_days_ago, two_days_ago))
    fake.run()
    assert not stale.exists() and live.is_dir()
    fake.run()  # and on every start, the cached result's too
    assert live.is_dir()


def test_workers_starting_together_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first worker's conversion starts a second worker and lets it run up to the lock (or, without one, to
    its end) before it finishes: the second one then waits, and finds the first one's result."""
    fake = FakeConversion(tmp_path, monkeypatch)
    at_lock, seconds, threads = threading.Event(), [], []
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if threading.current_thread().name == "second":
            at_lock.set()
        real_flock(fd, operation)

    def second() -> None:
        try:
            seconds.append(fake.run())
        finally:
            at_lock.set()

    def convert(source: Path, staging: Path) -> None:
        if not threads:
            threads.append(threading.Thread(target=second, name="second"))
            threads[0].start()
            at_lock.wait()
        fake(source, staging)

    monkeypatch.setattr(fcntl, "flock", flock)
    first = cached_conversion(fake.source, "1.0", "fake", convert)
    threads[0].join()
    assert fake.calls == ["MainThread"] and seconds == [first]
