"""The decode step compiled ahead of time and kept as a package: built once, loaded by the next start, rebuilt when
the package is bad, and named by everything that shapes its code (tiny model; a build takes about 25-45 s here).

Every package is built once: the float32 ones for the session (`helpers.built_steps.tiny_steps`, which
test_engine_compiled.py's engines load too), the bf16 and quantized ones for this module (`side_builds`), side by
side. A test that asserts what a build did reads it from the build's record; a test that loads a package loads a copy.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir

from helpers.built_steps import (
    ROW_LEN,
    TORN,
    Build,
    TinySteps,
    build,
    copy_build,
    copy_packages,
    queue,
    results,
    slot_cache,
    warm_compiler_cache,
)
from helpers.tiny_model import chat_prompt, tiny_model
from inference_worker import aot_step, step_builds, step_packages
from inference_worker.attention import matmul_attention, reduction_attention, sdpa_attention
from inference_worker.compiled_decode import SINGLE
from inference_worker.engine import EngineConfig, LLMEngine
from inference_worker.kv_cache import SlotKVCache
from inference_worker.llama import LlamaFamilyModel
from inference_worker.model_loader import LoadedModel
from inference_worker.model_runner import family_decoder
from inference_worker.sampling_params import SamplingParams
from inference_worker.step_inputs import StepInputs

BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model()


def decode_inputs(cache: SlotKVCache) -> tuple[torch.Tensor, ...]:
    """Three rows at different positions over a cache of random keys and values, in the step's ragged form: tokens,
    positions, rows, the tokens whose logits come back, the columns attended."""
    generator = torch.Generator().manual_seed(1)
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    rows = torch.arange(3)
    return torch.tensor([5, 7, 9]), torch.tensor([3, 10, 6]), rows, rows.clone(), torch.arange(11)


@pytest.fixture
def extraction_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp dir of the test's own, where AOTInductor extracts the packages it loads (it reads TMPDIR). Builds keep
    the usual inductor cache, which would otherwise follow TMPDIR and start cold."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", cache_dir())
    directory = tmp_path_factory.mktemp("extracted")
    monkeypatch.setenv("TMPDIR", str(directory))
    return directory


@pytest.fixture(scope="session", autouse=True)
def side_build_queue(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    """The packages one test each looks into, queued on the session's `build_pool` at this module's first test,
    behind the float32 builds (`tiny_steps`) that the first tests wait for: they build while those tests run
    (session-scoped and autouse, so that it is set up before `tiny_steps` blocks). The frozen bf16 steps and the
    int8 and int4 steps, general and one-row (`bf16`, `bf16-single`, `int8-single`, ...): 25-35 s each here, and
    the tests built them one or two at a time. Each build's model is its own, made here (the seed is global, and no
    decoder is pickled by two threads). Nothing is queued when no test run here needs them."""
    here = [item for item in request.session.items if item.path == Path(__file__)]
    needed = {name for item in here for name in item.fixturenames}
    if "side_builds" not in needed:
        return {}
    if "tiny_steps" in needed:
        request.getfixturevalue("tiny_step_builds")  # queued first
    root = tmp_path_factory.mktemp("side-builds")
    builds = {}
    for mode, single in itertools.product(("int8", "int4"), (False, True)):
        loaded = tiny_model()
        directory = root / f"{mode}{'-single' if single else ''}"
        builds[directory.name] = partial(
            build, family_decoder(loaded, ROW_LEN, mode), slot_cache(loaded), directory, single=single
        )
    if BF16:
        for name, single in (("bf16", False), ("bf16-single", True)):
            loaded = tiny_model(torch.bfloat16)
            builds[name] = partial(build, family_decoder(loaded, 64), slot_cache(loaded), root / name, single=single)
    return queue(request.getfixturevalue("build_pool"), builds)


@pytest.fixture(scope="module")
def side_builds(side_build_queue: dict[str, Future[Build]]) -> dict[str, Build]:
    return results(side_build_queue)


def package_step(decoder, cache: SlotKVCache, directory: Path, frozen: bool = True, single: bool = False) -> tuple:
    return aot_step.load_or_build(
        decoder, reduction_attention, cache.keys, cache.values, directory, frozen, single=single
    )


def one_token_inputs(cache: SlotKVCache) -> tuple[torch.Tensor, ...]:
    """The second row of `decode_inputs`, alone: token 7 in row 1 at column 10."""
    return torch.tensor([7]), torch.tensor([10]), torch.tensor([1]), torch.tensor([0]), torch.arange(11)


def run(step, cache: SlotKVCache, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.inference_mode():
        return step(*inputs, *cache.keys, *cache.values)


def test_a_built_package_is_loaded_by_the_next_start_and_decodes_as_the_eager_step(
    tiny: LoadedModel, tiny_steps: TinySteps, tmp_path: Path, extraction_dir: Path
) -> None:
    decoder = family_decoder(tiny, ROW_LEN)
    cache = slot_cache(tiny)
    built, was_built = tiny_steps.general.step, tiny_steps.general.was_built  # by a worker of one row
    assert was_built  # and loaded below by one of four, from a copy of the build's directory as the build left it
    built_in = tmp_path / "built"
    copy_build(tiny_steps.general, built_in)
    lock, package, library = sorted(built_in.iterdir())  # no temporary file left behind
    assert lock == package.with_suffix(".lock") and lock.stat().st_size == 0  # the build's, removed in a day
    assert package.suffix == ".pt2" and library == step_packages.library_of(package)  # extracted by the load
    week_and_a_day_ago = time.time() - step_packages.UNUSED_PACKAGE_S - 86400
    os.utime(package, (week_and_a_day_ago, week_and_a_day_ago))
    (built_in / "decode-of-an-older-release.pt2").write_bytes(b"unused for 8 days")
    os.utime(built_in / "decode-of-an-older-release.pt2", (week_and_a_day_ago, week_and_a_day_ago))
    (built_in / "decode-of-another-configuration.pt2").write_bytes(b"another configuration's package")
    (built_in / "build-killed-2-days-ago").mkdir()
    (built_in / "build-killed-2-days-ago" / "job.pt").write_bytes(b"scratch of a build whose worker was killed")
    os.utime(built_in / "build-killed-2-days-ago", (week_and_a_day_ago, week_and_a_day_ago))
    (built_in / "decode-of-an-older-release.so").write_bytes(b"the library of a package removed with it")
    (built_in / ".extract-killed-2-days-ago").write_bytes(b"half a library, its worker killed while extracting it")
    os.utime(built_in / ".extract-killed-2-days-ago", (week_and_a_day_ago, week_and_a_day_ago))
    (built_in / "decode-of-an-older-release.lock").write_bytes(b"")  # its build's lock, untouched since
    os.utime(built_in / "decode-of-an-older-release.lock", (week_and_a_day_ago, week_and_a_day_ago))
    loaded, was_built = package_step(decoder, cache, built_in)
    assert not was_built
    kept = [package.name, library.name, lock.name, "decode-of-another-configuration.pt2"]
    assert sorted(p.name for p in built_in.iterdir()) == sorted(kept)
    assert package.stat().st_mtime > week_and_a_day_ago + 86400  # loaded, so marked used: kept another week
    os.utime(package, (week_and_a_day_ago, week_and_a_day_ago))  # a week of serving on it since then
    loaded._mark_at = 0.0  # its daily mark is due
    run(loaded, cache, decode_inputs(cache))
    assert package.stat().st_mtime > week_and_a_day_ago + 86400  # a running step marks its package used daily

    inputs = decode_inputs(cache)
    eager = run(aot_step.DecodeStep(decoder, reduction_attention), cache, inputs)
    written = [k.clone() for k in cache.keys]
    inputs = decode_inputs(cache)
    from_package = run(loaded, cache, inputs)
    torch.testing.assert_close(from_package, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.keys, written, rtol=1e-5, atol=1e-5)  # it wrote the new columns in place
    assert torch.equal(run(built, cache, decode_inputs(cache)), from_package)
    assert not list(extraction_dir.glob("aotinductor_*"))  # each load removed its extracted copy; the steps run

    # a worker that needs the package while another builds it (started together) waits and loads that build
    shared, waiting = tmp_path / "shared", threading.Event()
    shared.mkdir()
    with ThreadPoolExecutor(1) as pool, step_builds.build_lock(shared / package.name):  # the other's build
        second = pool.submit(
            aot_step.load_or_build,
            decoder,
            reduction_attention,
            cache.keys,
            cache.values,
            shared,
            True,
            on_build=waiting.set,
        )
        assert waiting.wait(120)  # it waits: `on_build` tells the engine to serve eagerly meanwhile
        shutil.copy(package, shared / package.name)  # the other's build lands
    from_shared, was_built = second.result(timeout=120)
    assert not was_built
    assert torch.equal(run(from_shared, cache, decode_inputs(cache)), from_package)

    # a prefill of prompts of different lengths, ragged through the package, as the eager padded forward runs it
    chunks, starts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]], [0, 4, 2]
    inputs = StepInputs.of(1, chunks, starts, cache.scratch, size=10)  # rows 1-3, and padding up to 10 tokens
    assert inputs.rows.tolist() == [1] * 5 + [2] * 2 + [3] * 3 and inputs.last.tolist()[:3] == [4, 6, 9]
    ragged = run(loaded, cache, (inputs.tokens, inputs.positions, inputs.rows, inputs.last, torch.arange(7)))
    ragged_keys = [k.clone() for k in cache.keys]
    padded_tokens = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 0, 0, 0], [10, 11, 12, 0, 0]])
    scratch = cache.scratch
    padded_positions = torch.tensor([[0, 1, 2, 3, 4], [4, 5] + [scratch] * 3, [2, 3, 4, scratch, scratch]])
    with torch.inference_mode():
        eager = decoder(
            padded_tokens,
            padded_positions,
            1,
            torch.arange(7),
            cache.keys,
            cache.values,
            sdpa_attention,
            torch.tensor([4, 1, 2]),
        )
    torch.testing.assert_close(ragged[:3], eager, rtol=1e-4, atol=1e-4)
    for ragged_key, key in zip(ragged_keys, cache.keys, strict=True):
        torch.testing.assert_close(ragged_key[1:4, :, :7], key[1:4, :, :7], rtol=1e-5, atol=1e-5)


def test_a_build_leaves_no_copy_of_its_package_in_the_compilers_cache(tiny_steps: TinySteps) -> None:
    """AOTInductor compiles a package's files in inductor's cache and copies them into the package; the build's
    child removes them there (each SmolLM2 build left its 330 MB library behind). Three builds, side by side."""
    names: dict[Path, set[str]] = {}
    for built in tiny_steps:
        with zipfile.ZipFile(built.package) as archive:
            files = {Path(name).name for name in archive.namelist() if "/aotinductor/" in name}
        assert any(name.endswith(".so") for name in files)
        names.setdefault(built.compiler_cache, set()).update(files)
    for compiler_cache, files in names.items():
        assert not [path for path in compiler_cache.rglob("*") if path.name in files]


def test_an_unfrozen_package_holds_no_weights_and_reads_the_decoders_own(
    tiny: LoadedModel, tiny_steps: TinySteps, tmp_path: Path, extraction_dir: Path
) -> None:
    """The float32 `wide` step's package: the decoder's tensors are handed to it at load, not copied into it. Built
    by `tiny_steps` from a decoder of its own: the one loading it here is another, whose weights this test edits."""
    decoder = family_decoder(tiny_model(), 64)  # a model of its own
    cache = slot_cache(tiny)
    copy_packages([tiny_steps.unfrozen], tmp_path)
    step, was_built = package_step(decoder, cache, tmp_path, frozen=False)
    assert not was_built
    weight_bytes = sum(t.numel() * t.element_size() for t in decoder.parameters())
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < weight_bytes / 4
    inputs = decode_inputs(cache)
    torch.testing.assert_close(
        run(step, cache, inputs), run(aot_step.DecodeStep(decoder, reduction_attention), cache, inputs)
    )
    before = run(step, cache, inputs)
    with torch.no_grad():
        decoder.lm_head.weight[11] += 1.0  # the output row of token 11, which is not among the inputs
    after = run(step, cache, inputs)
    assert not torch.equal(after[:, 11], before[:, 11]) and torch.equal(after[:, 12], before[:, 12])
    assert not list(extraction_dir.glob("aotinductor_*"))  # its extracted copy is gone; it reads the decoder's


def test_a_package_that_does_not_load_is_built_again(tiny: LoadedModel, tiny_steps: TinySteps, tmp_path: Path) -> None:
    """`tiny_steps` built the general package where a torn one of its name lay (`TORN`, written before the build):
    its load failed, said so, and the package was built again, in place; the next start loads that build."""
    decoder = family_decoder(tiny, ROW_LEN)
    cache = slot_cache(tiny)
    name = step_packages.package_name(decoder, reduction_attention, True, cache_dtype=cache.keys[0].dtype)
    general = tiny_steps.general
    assert general.package.name == f"decode-{name}.pt2"  # this decoder's package, `TORN` before the build
    assert general.was_built and f"{general.package} did not load" in general.log
    assert general.package.read_bytes() != TORN and zipfile.is_zipfile(general.package)
    assert run(general.step, cache, decode_inputs(cache)).shape == (3, tiny.model.config.vocab_size)
    copy_build(general, tmp_path / "next")
    assert not package_step(decoder, cache, tmp_path / "next")[1]


def test_a_library_that_does_not_load_is_extracted_again_and_a_read_only_cache_loads_a_copy_of_its_own(
    tiny: LoadedModel,
    tiny_steps: TinySteps,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    decoder = family_decoder(tiny, ROW_LEN)
    cache = slot_cache(tiny)
    (built_package,) = copy_packages([tiny_steps.general], tmp_path / "built")
    built, _ = package_step(decoder, cache, tmp_path / "built")
    expected = run(built, cache, decode_inputs(cache))
    # another cache directory with the same package: a library path this process has not loaded (a second
    # dlopen of one path reuses the library already mapped, whatever the file holds now)
    package = tmp_path / "cache" / built_package.name
    package.parent.mkdir()
    shutil.copy(built_package, package)
    library = step_packages.library_of(package)
    library.write_bytes(b"a torn library")
    with caplog.at_level(logging.WARNING, logger="llmbus.engine"):
        step, was_built = package_step(decoder, cache, package.parent)
    assert not was_built and f"the library of {package.name} did not load" in caplog.text
    assert torch.equal(run(step, cache, decode_inputs(cache)), expected)

    extract = step_packages._extract_library

    def read_only_cache(source: Path, target: Path) -> None:
        if target.parent == package.parent:
            raise PermissionError(13, "Permission denied", str(target))
        extract(source, target)

    library.unlink()
    monkeypatch.setattr(step_packages, "_extract_library", read_only_cache)
    step, was_built = package_step(decoder, cache, package.parent)
    assert not was_built and not library.exists()
    assert torch.equal(run(step, cache, decode_inputs(cache)), expected)


def test_the_package_name_follows_the_weights_the_forward_and_the_attention(tiny: LoadedModel) -> None:
    decoder = family_decoder(tiny, ROW_LEN)
    name = step_packages.package_name(decoder, reduction_attention, True)
    twin = tiny_model()  # the same seed: the same weights
    assert step_packages.package_name(family_decoder(twin, 64), reduction_attention, True) == name
    assert step_packages.package_name(decoder, matmul_attention, True) != name
    with torch.no_grad():
        twin.model.model.layers[1].mlp.down_proj.weight[3, 4] += 1e-3
    assert step_packages.package_name(family_decoder(twin, 64), reduction_attention, True) != name
    longer_rope = family_decoder(tiny_model(max_context=4096), 4096)  # its RoPE tables are longer
    assert step_packages.package_name(longer_rope, reduction_attention, True) != name
    assert step_packages.package_name(decoder, reduction_attention, True, single=True) != name
    over = {  # the same float32 decoder over float32 or bf16 caches: different code
        step_packages.package_name(decoder, reduction_attention, True, cache_dtype=dtype)
        for dtype in (torch.float32, torch.bfloat16)
    }
    assert len(over) == 2 and name not in over
    other_theta = tiny_model()
    other_theta.model.config.rope_parameters = {"rope_theta": 50000.0, "rope_type": "default"}
    assert step_packages.package_name(LlamaFamilyModel(other_theta.model, 64), reduction_attention, True) != name


def test_a_warm_up_hashes_a_decoders_weights_once_and_a_name_outside_it_hashes_them_again() -> None:
    """Within `weights_hashed_once` (one warm-up's packages) a decoder's weights are hashed once: a weight changed
    in place there keeps the name. Outside, every name hashes them: the change renames the package."""
    twin = tiny_model()
    decoder = LlamaFamilyModel(twin.model, 64)
    name = step_packages.package_name(decoder, reduction_attention, True)
    with step_packages.weights_hashed_once():
        assert step_packages.package_name(decoder, reduction_attention, True) == name
        with torch.no_grad():
            twin.model.model.layers[1].mlp.down_proj.weight[3, 4] += 1e-3  # the decoder reads this storage
        assert step_packages.package_name(decoder, reduction_attention, True) == name
        assert step_packages.package_name(decoder, reduction_attention, True, single=True) != name
    over = {  # the same float32 decoder over float32 or bf16 caches: different code
        step_packages.package_name(decoder, reduction_attention, True, cache_dtype=dtype)
        for dtype in (torch.float32, torch.bfloat16)
    }
    assert len(over) == 2 and name not in over
    assert step_packages.package_name(decoder, reduction_attention, True) != name


def test_an_engine_loads_the_step_its_predecessor_built_and_runs_one_row_unpadded(
    tiny: LoadedModel,
    tiny_steps: TinySteps,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both packages of the narrow step, the general one and the one-row one (`SINGLE`), are loaded before the
    engine starts; a lone row's decode steps run on the one-row package and decode as the eager step does. The
    predecessor is `tiny_steps`' builds, by a worker of one row: the rows and length are symbolic in the packages."""
    monkeypatch.setenv("LLMBUS_CACHE_DIR", str(tmp_path))
    warm_compiler_cache(monkeypatch)
    copy_packages([tiny_steps.general, tiny_steps.single], tmp_path / "compiled")
    with caplog.at_level(logging.INFO, logger="llmbus.engine"):
        engine = LLMEngine(tiny, EngineConfig(max_batch_size=4, compile=True))
        assert engine.runner.compiled.packaged.keys() == {2, SINGLE}  # loaded before the engine started
        assert engine.runner.compiled.wait(600)
    assert "decode step loaded from its package for batch 2" in caplog.text
    assert "decode step loaded from its package for batch 1" in caplog.text
    assert engine.runner.compiled.graph_size(1) == SINGLE and engine.runner.compiled.graph_size(2) == 2
    assert engine.runner.compiled.padded(1) == 1
    prompt = [chat_prompt(tiny, "one row")]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = LLMEngine(tiny, EngineConfig(max_batch_size=4)).generate(prompt, greedy)[0].text
    assert engine.generate(prompt, greedy)[0].text == expected
    assert engine.stats.decode_batch_sizes.keys() == {1}


@pytest.mark.skipif(not BF16, reason="no oneDNN bf16 on this CPU")
def test_a_frozen_bf16_package_calls_onednn_on_packed_weights_and_has_parallel_loops(
    side_builds: dict[str, Build],
) -> None:
    """Freezing is what makes the narrow bf16 step fast (packed oneDNN matmuls): its package's code calls the
    packed linear for the qkv, o, gate_up and down projections of every layer. The child that builds it uses the
    worker's threads: built on one, the kernels had no parallel loops (SmolLM2: 24 ms a step instead of 17)."""
    built = side_builds["bf16"]
    assert built.was_built and next(built.decoder.parameters()).dtype == torch.bfloat16
    with zipfile.ZipFile(built.package) as archive:
        code = {n.rsplit(".", 2)[-2]: archive.read(n).decode() for n in archive.namelist() if n.endswith(".cpp")}
    calls = re.findall(r"aoti_torch_cpu__linear_pointwise(?:_binary)?\(", code["wrapper"])  # _binary: + residual
    assert len(calls) >= 4 * len(built.decoder.layers)
    assert ("#pragma omp parallel" in code["kernel"]) == (torch.get_num_threads() > 1)


@pytest.mark.skipif(not BF16, reason="no oneDNN bf16 on this CPU")
def test_the_one_row_bf16_package_projects_in_its_own_loops_over_bf16_weights(side_builds: dict[str, Build]) -> None:
    """The one-row step projects as broadcast sums (`llama.project_one_row`), not through oneDNN, and its package
    holds the weights in bf16: written as `weight.float()`, freezing folded the widening into float32 copies of
    them (SmolLM2's package: 605 MB instead of 280, and its step slower than oneDNN's). It decodes as the eager
    step does, to bf16 rounding."""
    single, general = side_builds["bf16-single"], side_builds["bf16"]
    assert single.was_built and next(single.decoder.parameters()).dtype == torch.bfloat16
    with zipfile.ZipFile(single.package) as archive:
        wrapper = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.cpp"))
    assert "_linear_pointwise" not in wrapper
    weight_bytes = sum(p.numel() * p.element_size() for p in single.decoder.parameters())
    assert single.package.stat().st_size < general.package.stat().st_size + weight_bytes / 4
    cache, expected_cache = slot_cache_like(single), slot_cache_like(single)
    decode_inputs(cache), decode_inputs(expected_cache)  # the same random keys and values in both
    eager = run(aot_step.DecodeStep(single.decoder, reduction_attention), expected_cache, one_token_inputs(cache))
    packaged = run(single.step, cache, one_token_inputs(cache))
    torch.testing.assert_close(packaged, eager, rtol=2e-2, atol=2e-2)


def slot_cache_like(built: Build) -> SlotKVCache:
    """A cache for a side build's bf16 decoder (64 columns, as `side_build_queue` made it)."""
    layers, cpu = built.decoder.layers, torch.device("cpu")
    return SlotKVCache(len(layers), 4, layers[0].kv_heads, layers[0].head_dim, 64, torch.bfloat16, cpu)


def test_quantized_packages_keep_their_weights_quantized_and_decode_as_the_eager_quantized_steps(
    tiny: LoadedModel, tiny_steps: TinySteps, side_builds: dict[str, Build], tmp_path: Path
) -> None:
    """`--quantize int8|int4` on CPU runs a packaged step too: it computes what the eager quantized step does, and
    its package holds the projections in 8 or 4 bits, not as dequantized copies: each saves at least 3 of float32's
    4 bytes a weight. (Both modes built side by side, in `side_builds`.)"""
    cache = slot_cache(tiny)
    float_decoder = family_decoder(tiny, ROW_LEN)
    copy_packages([tiny_steps.general], tmp_path / "none")  # with its library, once loaded, for a like-for-like size
    package_step(float_decoder, cache, tmp_path / "none")
    directories = {"none": tmp_path / "none"}
    for mode in ("int8", "int4"):
        built = side_builds[mode]
        assert built.was_built
        eager = run(aot_step.DecodeStep(built.decoder, reduction_attention), cache, decode_inputs(cache))
        torch.testing.assert_close(run(built.step, cache, decode_inputs(cache)), eager, rtol=1e-4, atol=1e-4)
        directories[mode] = built.directory  # its lock, package and library, as the build left them
    projections = sum(
        m.weight.numel() for layer in float_decoder.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)
    )
    size = {mode: sum(p.stat().st_size for p in directory.iterdir()) for mode, directory in directories.items()}
    for mode in ("int8", "int4"):  # dequantized copies would have saved nothing
        assert size["none"] - size[mode] > 0.9 * 3 * projections


def test_the_one_row_quantized_packages_are_autotuned_and_decode_as_the_eager_quantized_steps(
    tiny: LoadedModel, side_builds: dict[str, Build]
) -> None:
    """The one-row package of a quantized decoder is built with `max_autotune` (inductor's C++ GEMM template
    competes with aten's int8 or int4 kernel for each projection); whichever wins, it computes the eager quantized
    step's logits, and the row's key and value land in the cache as they do there. (int8 and int4 built side by
    side, in `side_builds`.)"""
    decoders = {mode: side_builds[f"{mode}-single"].decoder for mode in ("int8", "int4")}
    assert all(map(aot_step.quantized, decoders.values())) and not aot_step.quantized(family_decoder(tiny, ROW_LEN))
    for mode, decoder in decoders.items():
        step, was_built = side_builds[f"{mode}-single"].step, side_builds[f"{mode}-single"].was_built
        assert was_built
        cache, expected_cache = slot_cache(tiny), slot_cache(tiny)
        decode_inputs(cache), decode_inputs(expected_cache)  # the same random keys and values in both
        eager = run(aot_step.DecodeStep(decoder, reduction_attention), expected_cache, one_token_inputs(cache))
        torch.testing.assert_close(run(step, cache, one_token_inputs(cache)), eager, rtol=1e-4, atol=1e-4)
        written = zip((*cache.keys, *cache.values), (*expected_cache.keys, *expected_cache.values), strict=True)
        for mine, theirs in written:
            torch.testing.assert_close(mine[1, :, 10], theirs[1, :, 10], rtol=1e-4, atol=1e-4, msg=mode)
