"""The plain transformers side of the baselines: an HF model, its tokenizer's chat template, a `DynamicCache`.

Nothing here uses the engine (`inference_worker`) beyond `model_loader.load_model`, which finds and loads the
same checkpoint, device and dtype a worker uses. The loops are what any transformers user would write: the eager
ceiling is the bar the engine has to clear, so it must not move when the engine does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from llmbus.bench.workload import chat_turns


@dataclass(slots=True)
class EagerModel:
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    name: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    eos_token_ids: frozenset[int]

    @classmethod
    def load(cls, path: str | None, device: str = "auto", dtype: str = "auto") -> EagerModel:
        from transformers import PreTrainedModel

        from inference_worker.model_loader import load_model

        loaded = load_model(path, device, dtype, backend="transformers")
        if not isinstance(loaded.model, PreTrainedModel):
            raise TypeError(
                f"the eager ceiling needs a transformers PreTrainedModel; load_model gave {type(loaded.model)}"
            )
        eos = loaded.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if loaded.tokenizer.eos_token_id is not None:
            eos_ids.add(loaded.tokenizer.eos_token_id)
        return cls(loaded.model, loaded.tokenizer, loaded.name, loaded.device, loaded.dtype, frozenset(eos_ids))

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else min(self.eos_token_ids, default=0)

    def encode(self, prompt: str) -> tuple[list[int], int]:
        """The prompt's tokens under the chat template, and how many precede the user's text (the template's
        system turn, which every request shares and a prefix cache can skip)."""
        turns = chat_turns(prompt)
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        boundary = text.rfind(prompt)
        if boundary <= 0:
            return ids, 0
        prefix = self.tokenizer(text[:boundary], add_special_tokens=False)["input_ids"]
        shared = len(prefix) if len(prefix) < len(ids) and ids[: len(prefix)] == prefix else 0
        return ids, shared


def decode_loop(
    m: EagerModel, prompts: list[list[int]], steps: int, time_cap: float, stop: threading.Event | None = None
) -> tuple[list[float], Any]:
    """Left-padded prefill with an attention mask into a `DynamicCache`, then `steps` timed greedy decode forwards
    of the whole batch (fewer once `time_cap` seconds have passed, or once `stop` is set: a bench being stopped).
    Returns each step's time and the tokens (batch x 1 + steps: the prefill's token, then one per step)."""
    import torch
    from transformers import DynamicCache

    model, device = m.model, m.device
    width = max(map(len, prompts))
    ids = torch.tensor([[m.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        ones = torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)
        sync(device)
        times: list[float] = []
        for _ in range(steps):
            if sum(times) > time_cap or (stop is not None and stop.is_set()):
                break
            start = time.perf_counter()
            mask = torch.cat([mask, ones], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            times.append(time.perf_counter() - start)
            tokens.append(token)
        return times, torch.cat(tokens, dim=1)


def prefill_seconds(m: EagerModel, ids: list[int], skip: int) -> float:
    """One timed prefill of `ids[skip:]` on top of the KV of `ids[:skip]` (untimed), up to the first token."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=m.model.config)
        if skip:
            m.model(input_ids=torch.tensor([ids[:skip]], device=m.device), cache=cache, logits_to_keep=1)
        tensor = torch.tensor([ids[skip:]], device=m.device)
        sync(m.device)
        start = time.perf_counter()
        out = m.model(input_ids=tensor, cache=cache, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).tolist()
        return time.perf_counter() - start


def generate(m: EagerModel, ids: list[int], max_new_tokens: int, max_time: float) -> list[int]:
    """`model.generate`, greedy, one request: the new tokens up to and including the first end-of-sequence."""
    import torch

    tensor = torch.tensor([ids], device=m.device)
    with torch.inference_mode():
        out = m.model.generate(
            input_ids=tensor,
            attention_mask=torch.ones_like(tensor),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=m.pad_token_id,
            max_time=max_time,
        )
    new = out[0, len(ids) :].tolist()
    ends = [i for i, t in enumerate(new) if t in m.eos_token_ids]
    return new[: ends[0] + 1] if ends else new


def sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)
