"""The compiled step's review: the memory plan of a tied model's float32 copy, the build lock in a cache directory
not made yet, a warm-up that keeps its week-old packages, and a cache row shorter than the warm-up's columns."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.tiny_model import TINY_SHAPE, tiny_model
from inference_worker import file_lock, step_builds, step_packages
from inference_worker.attention import reduction_attention
from inference_worker.compiled_decode import SINGLE, WARM_UP_COLUMNS, CompiledDecode
from inference_worker.engine import EngineConfig, LLMEngine
from inference_worker.kv_cache import SlotKVCache
from inference_worker.llama import LlamaFamilyModel
from inference_worker.model_loader import LoadedModel
from inference_worker.model_runner import added_bytes, family_decoder, uses_float32_copy


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model()


def tied_bf16_llama() -> LoadedModel:
    """A tiny bf16 Llama whose LM head is its embedding (as SmolLM2's and Llama-3.2's are), with SmolLM2's vocabulary
    size, so that the embedding is most of its weights; no tokenizer (nothing here encodes)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, **TINY_SHAPE)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return LoadedModel(model, None, "tied", torch.device("cpu"), torch.bfloat16, frozenset({2}), 1024)


def test_the_plan_counts_the_float32_copy_of_a_tied_embedding_and_head_twice() -> None:
    """The float32 copy casts the embedding and the LM head apart, two tensors, where the model's parameters count a
    tied pair once: the plan left out SmolLM2's head (113 MB) and Llama-3.2-1B's (1.05 GB)."""
    loaded = tied_bf16_llama()
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert uses_float32_copy(loaded, "none")
    copy = family_decoder(loaded, 64, "none", torch.float32)  # the runner's float32 copy (`wide_decoder`)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in copy.parameters()}
    allocated = sum(storages.values())
    planned = added_bytes(loaded, compile=False, quantize="none")  # the copy, and nothing else without compile
    assert allocated <= planned < 1.05 * allocated


def test_the_build_lock_is_taken_in_a_cache_directory_not_made_yet(tmp_path: Path) -> None:
    """Two workers starting together on a fresh host: the first lock was asked for before the package's directory
    existed, no lock file could be made, and both built the same package."""
    package = tmp_path / "cache" / "compiled" / "decode-x.pt2"
    lock = package.with_suffix(".lock")
    with step_builds.build_lock(package), pytest.raises(BlockingIOError), open(lock) as other_worker:
        fcntl.flock(other_worker, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_lock_is_given_up_for_want_of_permission_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No lock file in a read-only cache directory: the work goes ahead unlocked (nothing is written there either).
    Any other error is raised, not taken for a read-only directory (a missing one let every worker in)."""
    with pytest.raises(FileNotFoundError), file_lock.exclusive(tmp_path / "missing" / "x.lock"):
        pass
    for code in (errno.EACCES, errno.EPERM, errno.EROFS):

        def refuse(*args: object, code: int = code) -> int:
            raise OSError(code, os.strerror(code))

        with monkeypatch.context() as patch:
            patch.setattr(file_lock.os, "open", refuse)
            with file_lock.exclusive(tmp_path / "x.lock") as locked:
                assert locked is False


def test_a_warm_up_after_a_week_keeps_the_packages_it_loads_next(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every load tidies the directory and keeps only its own package: a start after 8 days removed the one-row
    package during the general one's load, then built it again (about 100 s for SmolLM2). Stand-in files play both
    packages here, under the names `aot_step.load_or_build` looks for; no build runs (one would be recorded).
    The warm-up thread names them for the count of threads of the step's maker, not for the count torch gives a
    new thread (the last one set on any thread): it once named and built packages for one thread while the test
    process, which named them, had two (a fresh-clone CI run after a test ran a worker of one thread in-process)."""
    cache = SlotKVCache(2, 4, 2, 16, 64, torch.float32, torch.device("cpu"))
    decoder = LlamaFamilyModel(tiny.model, 64).eval()  # its own: no engine of this process loaded its steps
    step = CompiledDecode(decoder, cache, reduction_attention, 4, package_dir=tmp_path)
    assert step.sizes == (2, SINGLE)
    names = {
        f"decode-{step_packages.package_name(decoder, reduction_attention, True, single, torch.float32)}.pt2"
        for single in (False, True)
    }
    week_ago = time.time() - 8 * 86400
    for name in names:
        (tmp_path / name).write_bytes(b"a package")
        os.utime(tmp_path / name, (week_ago, week_ago))
    present_at_loads: list[set[str]] = []
    built: list[str] = []

    def load(path: Path, step: torch.nn.Module, frozen: bool) -> object:
        present_at_loads.append({p.name for p in tmp_path.glob("decode-*.pt2")})
        return lambda *tensors: None

    def build(step: torch.nn.Module, keys: list, values: list, path: Path, *args: object, **kwargs: object) -> None:
        built.append(path.name)
        path.write_bytes(b"a package")

    monkeypatch.setattr(step_packages, "load", load)
    monkeypatch.setattr(step_builds, "build_in_child", build)
    mine = torch.get_num_threads()
    run_on_a_thread(torch.set_num_threads, 1 if mine != 1 else 2)  # a new thread's count, such as the warm-up's
    try:
        step.warm_up()
    finally:
        run_on_a_thread(torch.set_num_threads, mine)
    assert built == []
    assert present_at_loads == [names, names]
    assert step.state == "ready"


def run_on_a_thread(function: Callable[..., object], *args: object) -> None:
    thread = threading.Thread(target=function, args=args)
    thread.start()
    thread.join()


def test_a_compiled_engine_whose_rows_are_shorter_than_the_warm_up_columns_gets_ready(tiny: LoadedModel) -> None:
    """With `--max-seq-len 32` the warm-up attended 64 columns of a cache of 33: the compiled step failed, and the
    engine decoded eagerly for good (`compile: failed`). Compiled just in time here (a package would be built)."""
    runner = LLMEngine(tiny, EngineConfig(max_batch_size=4, max_seq_len=32)).runner
    assert runner.cache.row_len < WARM_UP_COLUMNS
    runner.compiled = CompiledDecode(runner.decoder, runner.cache, reduction_attention, 4)
    runner.compiled.start_background()
    runner.compiled.wait()
    assert runner.compiled.state == "ready"
