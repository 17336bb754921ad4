"""The sampler's pieces that need no model."""

from __future__ import annotations

import pytest
import torch

from inference_worker.sampler import argmax_rows, sample
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence


@pytest.mark.parametrize("vocab", [49152, 151936, 32000, 5000, 1500])
def test_the_blockwise_argmax_picks_what_argmax_picks(vocab: int) -> None:
    """The sampler's CPU argmax (`argmax_rows`) equals torch's on random scores, and on the cases where a block
    search could go wrong: ties across blocks, a maximum in the short last block, rows of -inf, and NaN (argmax
    takes the first NaN as the maximum)."""
    generator = torch.Generator().manual_seed(vocab)
    cases = [torch.randn(64, vocab, generator=generator)]
    cases.append(torch.randint(0, 3, (16, vocab), generator=generator).float())  # ties everywhere
    last = torch.randn(4, vocab, generator=generator)
    last[0, -1] = last[1, vocab // 2] = last[1, -1] = 100.0  # row 1: the same maximum in two blocks
    last[2] = float("-inf")
    last[3, vocab - 2] = last[3, 7] = float("nan")
    cases.append(last)
    cases.append(torch.randn(vocab, 8, generator=generator).T)  # columns not contiguous: torch's argmax
    for scores in cases:
        assert torch.equal(argmax_rows(scores), scores.argmax(dim=-1))


def test_extreme_top_k_and_top_p_sample_the_likeliest_token_and_harm_no_other_row() -> None:
    """top_k past the vocabulary (even past int64, which torch.tensor cannot hold) means every token; a top_p so
    small that float32 rounds it to 0 still keeps the likeliest token, rather than dropping all and sampling NaN."""
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    logits[:, 17] = 50.0  # far the likeliest in every row
    rows = [
        Sequence("k", [1], SamplingParams(max_tokens=4, temperature=1.0, top_k=2**64 - 1, seed=1)),
        Sequence("p", [1], SamplingParams(max_tokens=4, temperature=1.0, top_p=1e-50, seed=1)),
        Sequence("g", [1], SamplingParams(max_tokens=4)),
    ]
    assert sample(logits, rows) == [17, 17, 17]
