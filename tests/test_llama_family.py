"""The hand-written Llama-family decoder (`inference_worker/llama.py`) on tiny random Mistral and Qwen2 models:
the engine picks it, and its greedy text equals `model.generate` (float32, so the two agree token for token).

Sliding windows: llama.py applies one window to every layer (a query at position p sees columns c with
p - window < c <= p, transformers' `sliding_window_overlay` rule), as Mistral does. Qwen2 windows only the layers
`>= max_window_layers` (`config.layer_types`): such a mixed config is not `supports`-ed and runs on the HF modules,
which match transformers. Shipped Qwen2/2.5 checkpoints set `use_sliding_window: false` (no window).
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from inference_worker import attention, llama
from inference_worker.engine import EngineConfig, LLMEngine
from inference_worker.hf_decoder import HFDecoder, logit_transform, mask_kinds
from inference_worker.model_loader import LoadedModel, load_tokenizer
from inference_worker.model_runner import ModelRunner
from inference_worker.sampling_params import SamplingParams

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
WINDOW = 12  # shorter than every prompt below (the chat template alone is ~30 tokens)
TEXTS = ("hi", "a longer prompt, about the sea, the sky and the birds that fly between them", "third one")
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def tiny(config_class: type[PretrainedConfig], model_class: type[PreTrainedModel], **extra: object) -> LoadedModel:
    """2 layers, hidden 64, GQA 4/2 heads, float32, SmolLM2's tokenizer; any linear bias is made non-zero (HF
    initialises biases to zero, which would hide a decoder that drops them)."""
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=len(tokenizer), **SHAPE, **extra)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return LoadedModel(model, tokenizer, "tiny", torch.device("cpu"), torch.float32, frozenset({2}), 1024)


def prompts(loaded: LoadedModel) -> list[list[int]]:
    return [loaded.encode_chat([{"role": "user", "content": text}]) for text in TEXTS]


def hf_greedy(loaded: LoadedModel, ids: list[int]) -> str:
    out = loaded.model.generate(
        torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )
    return loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def engine_greedy(loaded: LoadedModel) -> tuple[LLMEngine, list[str]]:
    engine = LLMEngine(loaded, EngineConfig(max_batch_size=4))
    return engine, [result.text for result in engine.generate(prompts(loaded), GREEDY)]


def assert_matches_hf(loaded: LoadedModel) -> tuple[llama.LlamaFamilyModel, list[str]]:
    """The engine runs `loaded` on the hand-written decoder, and its greedy texts equal HF's; returns both."""
    assert llama.supports(loaded.model.config)
    engine, texts = engine_greedy(loaded)
    assert isinstance(engine.runner.decoder, llama.LlamaFamilyModel)
    assert len({len(ids) for ids in prompts(loaded)}) == len(TEXTS)  # different lengths, batched together
    assert texts == [hf_greedy(loaded, ids) for ids in prompts(loaded)]
    return engine.runner.decoder, texts


def test_mistral_with_a_sliding_window_matches_hf_generate() -> None:
    mistral = tiny(MistralConfig, MistralForCausalLM, sliding_window=WINDOW)
    assert min(len(ids) for ids in prompts(mistral)) > WINDOW
    decoder, texts = assert_matches_hf(mistral)
    assert decoder.window == WINDOW
    # the window changes the answers, so a decoder that ignored it would have failed the comparison above
    unwindowed = tiny(MistralConfig, MistralForCausalLM, sliding_window=None)
    unwindowed.model.load_state_dict(mistral.model.state_dict())
    assert [hf_greedy(unwindowed, ids) for ids in prompts(mistral)] != texts


def test_mistral_without_a_window_matches_hf_generate() -> None:
    decoder, _ = assert_matches_hf(tiny(MistralConfig, MistralForCausalLM, sliding_window=None))
    assert decoder.window is None


def test_qwen2_with_qkv_biases_matches_hf_generate() -> None:
    qwen2 = tiny(Qwen2Config, Qwen2ForCausalLM)
    attention = qwen2.model.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    assert attention.k_proj.bias.abs().max() > 0
    decoder, texts = assert_matches_hf(qwen2)
    assert decoder.window is None  # use_sliding_window defaults to false
    # the biases change the answers, so a decoder that dropped them would have failed the comparison above
    unbiased = dataclasses.replace(qwen2, model=copy.deepcopy(qwen2.model))
    with torch.no_grad():
        for layer in unbiased.model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.zero_()
    assert [hf_greedy(unbiased, ids) for ids in prompts(qwen2)] != texts


def test_qwen2_with_a_window_on_some_layers_runs_on_the_hf_modules_and_matches_hf_generate() -> None:
    qwen2 = tiny(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    assert qwen2.model.config.layer_types == ["full_attention", "sliding_attention"]
    assert not llama.supports(qwen2.model.config)
    engine = LLMEngine(qwen2, EngineConfig(max_batch_size=4))
    assert isinstance(engine.runner.decoder, HFDecoder)
    expected = [hf_greedy(qwen2, ids) for ids in prompts(qwen2)]
    assert [r.text for r in engine.generate(prompts(qwen2), GREEDY)] == expected


def test_every_attention_of_the_forward_computes_the_same_function() -> None:
    """The runner picks an attention per device and phase (matmuls for eager decode, SDPA for prefill, SDPA kept off
    cuDNN on CUDA, broadcast sums when compiled on CPU): all must agree, GQA and the causal mask included."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, dim, columns = 3, 6, 2, 16, 11
    for width in (1, 4):
        q = torch.randn(batch, width, heads, dim, generator=generator)
        k = torch.randn(batch, kv_heads, columns, dim, generator=generator)
        v = torch.randn(batch, kv_heads, columns, dim, generator=generator)
        positions = torch.tensor(
            [[5 + i for i in range(width)], [0 + i for i in range(width)], [6 + i for i in range(width)]]
        )
        visible = torch.arange(columns)[None, None, :] <= positions[:, :, None]
        expected = attention.matmul_attention(q, k, v, visible, 0.25)
        assert expected.shape == (batch, width, heads * dim)
        others = (attention.sdpa_attention, attention.sdpa_attention_without_cudnn, attention.reduction_attention)
        for attend in others:
            torch.testing.assert_close(attend(q, k, v, visible, 0.25), expected, atol=1e-5, rtol=1e-4)


def runner_logits(loaded: LoadedModel, ids: list[int], prefill: int) -> torch.Tensor:
    """The runner's logits after `ids[:prefill]` (one prefill), then after each later token (one decode step each)."""
    runner = ModelRunner(loaded, 2, 128)
    assert isinstance(runner.decoder, HFDecoder)
    rows = [runner.forward(0, [ids[:prefill]], [0])]
    rows += [runner.forward(0, [[ids[i]]], [i]) for i in range(prefill, len(ids))]
    return torch.cat(rows)


def assert_hf_decoder_matches_the_forward(loaded: LoadedModel) -> None:
    """The HF decoder's logits over the slot cache equal the model's own forward's, at the end of a prefill
    longer than `WINDOW` and at each decode step after it."""
    ids = prompts(loaded)[1]
    prefill = WINDOW + 3
    assert len(ids) > prefill + WINDOW
    with torch.no_grad():
        expected = loaded.model(torch.tensor([ids])).logits[0, prefill - 1 :].float()
    torch.testing.assert_close(runner_logits(loaded, ids, prefill), expected, atol=1e-4, rtol=1e-4)


def test_qwen2_with_a_window_on_some_layers_gives_the_logits_of_its_own_forward() -> None:
    qwen2 = tiny(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    assert mask_kinds(qwen2.model.config) == ["full_attention", "sliding_attention"]
    assert_hf_decoder_matches_the_forward(qwen2)


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ((GraniteConfig, GraniteForCausalLM), {"logits_scaling": 8.0}),
        ((CohereConfig, CohereForCausalLM), {"logit_scale": 0.25}),
        ((Gemma2Config, Gemma2ForCausalLM), {"head_dim": 16, "sliding_window": WINDOW, "final_logit_softcapping": 0.5}),
    ],
)
def test_models_that_scale_or_cap_their_logits_give_the_logits_of_their_own_forward(family: tuple, extra: dict) -> None:
    """Granite divides the head's output, Cohere multiplies it, Gemma 2 caps it (and attends eagerly, through a
    window on every other layer)."""
    loaded = tiny(*family, **extra)
    scale, _, cap = logit_transform(loaded.model.config)
    assert (scale, cap) != (1.0, None)
    assert_hf_decoder_matches_the_forward(loaded)


def test_the_hf_decoder_refuses_logits_and_layers_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="model type 'mpt' sets logit_scale"):
        logit_transform(SimpleNamespace(model_type="mpt", logit_scale=2.0))
    with pytest.raises(ValueError, match="cannot mask layers of type chunked_attention"):
        mask_kinds(SimpleNamespace(layer_types=["full_attention", "chunked_attention"]))
    assert mask_kinds(SimpleNamespace(sliding_window=8)) == ["sliding_attention"]  # Mistral: every layer windowed
