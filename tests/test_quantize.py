"""Weight-only int8 and int4 (`inference_worker/quantize.py`): what the layers compute, the layouts' limits, and
int4 recovering the 4-bit values of the shipped SmolLM2."""

from __future__ import annotations

import pytest
import torch

from inference_worker.quantize import Int4Linear, Int8Linear, linear_for, quantize_groups


def dequantized(layer: torch.nn.Module, in_features: int) -> torch.Tensor:
    """The weight [out, in] a quantized layer multiplies by, read back through its own matmul."""
    return layer(torch.eye(in_features)).t()


@pytest.mark.parametrize(("make", "tolerance"), [(Int8Linear, 0.01), (Int4Linear, 0.1)])
def test_a_quantized_layer_multiplies_by_its_weight_within_its_rounding(make, tolerance: float) -> None:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(3, 5, 64)
    layer = make(weight, bias)
    expected = torch.nn.functional.linear(x, weight, bias)
    got = layer(x)
    assert got.shape == (3, 5, 96)
    assert (got - expected).norm() / expected.norm() < tolerance


def test_int4_keeps_half_a_byte_per_weight_and_a_scale_and_zero_per_group_of_32() -> None:
    layer = Int4Linear(torch.randn(96, 64))
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 96 * 64 // 2
    assert layer.scales_and_zeros.shape == (64 // 32, 96, 2)


def test_int4_refuses_layers_whose_inputs_are_not_groups_of_32_and_other_devices_by_name() -> None:
    with pytest.raises(ValueError, match="multiple of 32, got 48"):
        quantize_groups(torch.randn(8, 48))
    with pytest.raises(ValueError, match="CPU only, not on meta"):
        Int4Linear(torch.randn(8, 64, device="meta"))
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'"):
        linear_for("int3")


def test_int4_groups_recover_weights_already_on_a_4_bit_grid_and_only_round_others() -> None:
    """Weights that are (code * step + low) per group of 32, as GGUF's Q4_1 stores them, come back as they were;
    ordinary weights lose about 8% of their norm to 16 levels."""
    torch.manual_seed(0)
    steps, lows = torch.rand(64, 2, 1) / 10, torch.randn(64, 2, 1)
    codes = torch.randint(0, 16, (64, 2, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans its whole range, as Q4_1's blocks do
    on_grid = (codes * steps + lows).reshape(64, 64)
    torch.testing.assert_close(dequantized(Int4Linear(on_grid), 64), on_grid, rtol=0, atol=1e-5)
    ordinary = torch.randn(64, 64)
    error = (dequantized(Int4Linear(ordinary), 64) - ordinary).norm() / ordinary.norm()
    assert 0.03 < error < 0.15


@pytest.mark.model
def test_int4_recovers_the_q4_1_values_the_shipped_smollm2_was_made_from() -> None:
    """The shipped GGUF stores every projection as Q4_1; the converted float32 checkpoint holds those values, and
    int4 quantizes them back to the same grid: what is left is float rounding, not 4-bit rounding."""
    from inference_worker.model_loader import load_model

    model = load_model(dtype="float32").model
    for projection in (model.model.layers[0].self_attn.q_proj, model.model.layers[29].mlp.down_proj):
        weight = projection.weight.data
        error = (dequantized(Int4Linear(weight), weight.shape[1]) - weight).norm() / weight.norm()
        assert error < 1e-4


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_memory_plan_counts_the_quantized_weights_the_runner_builds(mode: str, dtype: torch.dtype) -> None:
    """The quantized projections and LM head are built beside the model's dense weights, which stay: the plan's
    added bytes are theirs (no float32 copy or compiled steps here)."""
    from helpers.tiny_model import tiny_model
    from inference_worker.model_runner import added_bytes, family_decoder

    loaded = tiny_model(dtype)
    planned = added_bytes(loaded, compile=False, quantize=mode)
    decoder = family_decoder(loaded, 64, mode)
    quantized = [m for m in decoder.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert isinstance(decoder.lm_head, Int8Linear) and len(quantized) == 4 * len(decoder.layers) + 1
    built = sum(p.numel() * p.element_size() for m in quantized for p in m.parameters())
    assert planned == built > 0
