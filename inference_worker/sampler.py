"""Per-request sampling for a whole batch at once: greedy rows take the argmax; the others use temperature,
top-k and top-p, then the exponential trick (argmax of p / Exp(1)). A seeded request draws its noise from its
own generator, so the same seed gives the same text whatever else is in the batch."""

from __future__ import annotations

import torch

from inference_worker.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence], shared: torch.Generator | None = None) -> list[int]:
    tokens = logits.argmax(dim=-1)
    sampled_rows = [r for r, s in enumerate(seqs) if not s.params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        chosen = _sample_rows(logits[rows], [seqs[r] for r in sampled_rows], shared)
        tokens[rows] = chosen
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence], shared: torch.Generator | None) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in seqs], device=device)[:, None]
    logits = logits / temperature
    top_k = torch.tensor([s.params.top_k for s in seqs], device=device)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        logits = _filter_top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs)
    for r, seq in enumerate(seqs):
        noise[r].exponential_(generator=seq.generator or shared)
    return (probs / noise).argmax(dim=-1)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    drop = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
