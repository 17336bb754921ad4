"""llmbus.quality: the shipped data, the answer matching, and int8 and int4 against bf16 on the real SmolLM2."""

from __future__ import annotations

import json

import pytest

from llmbus import quality


def test_the_shipped_text_and_questions_load() -> None:
    assert len(quality.data_file(quality.TEXT)) > 3000
    questions = json.loads(quality.data_file(quality.QA))
    assert len(questions) >= 30 and all(q["question"].endswith("?") and q["answers"] for q in questions)


def test_answers_are_normalized_before_matching() -> None:
    assert quality.normalize("Paris.") == ["paris"]
    assert quality.normalize("The Pacific!") == ["pacific"]
    assert quality.normalize("Leonardo da Vinci") == ["leonardo", "da", "vinci"]


@pytest.mark.model
def test_int8_and_int4_quality_is_measured_beside_bf16() -> None:
    """int8 stays within 5% of bf16's perplexity, int4 within 1%: SmolLM2 ships as Q4_1, whose 4-bit values int4's
    groups of 32 recover (`test_quantize.py`), so its projections differ from bf16's by rounding only (its LM head
    is int8, as in int8)."""
    from inference_worker.model_loader import load_model

    results = quality.compare(load_model(dtype="bfloat16"), ("none", "int8", "int4"))
    dense, int8, int4 = results["none"], results["int8"], results["int4"]
    assert 5 < dense["perplexity"] < 100 and dense["perplexity_tokens"] > 500
    assert abs(int8["perplexity"] / dense["perplexity"] - 1) < 0.05
    assert abs(int4["perplexity"] / dense["perplexity"] - 1) < 0.01
    assert dense["questions"] == int8["questions"] == int4["questions"] >= 30
    assert dense["contains_match"] >= 0.5 and "Paris" in dense["replies"][0]
    for quantized in (int8, int4):
        assert quantized["contains_match"] >= dense["contains_match"] - 0.1
        assert "Paris" in quantized["replies"][0]
