"""Where a lone request's time to first token goes, in one process: the bench's prompts one at a time.

    python scripts/ttft_parts.py [--model DIR] [--device auto] [--rounds 2] [--max-batch-size 64] [--no-compile]

For each prompt it prints the median over rounds of:
- `hf`: the transformers forward of the whole prompt (what `llmbus bench` calls the in-process prefill), once per
  prompt and timed round, after the engine's: on CUDA a prompt length it has not run before includes cuDNN's
  planning of that shape (19 ms against 65-96 ms on an H100), where the bench takes the fastest of 5 runs;
- `prefill`: the engine's prefill phase for that request (prefix cache on, as in a worker), from its observer;
- `ttft`: from `EngineThread.submit` to the sink receiving the request's first token (templating and
  tokenizing excluded: the request is built before), so the thread hand-offs are in it and the bus is not.
A bus TTFT from `llmbus bench` far above `ttft` points at the worker's asyncio side or the bus; a `ttft` far above
`prefill` at the engine thread's loop; a `prefill` far above `hf` at the engine's prefill itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from step_times import sync

from inference_worker.engine import EngineConfig, Event, LLMEngine, TokenDelta
from inference_worker.engine_thread import EngineThread
from inference_worker.events import Failed, Finished, NoObserver
from inference_worker.hardware import pick_threads
from inference_worker.model_loader import LoadedModel, load_model
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence
from llmbus.bench.workload import chat_turns, workload


class PrefillTimes(NoObserver):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def prefill_step(self, seconds: float, rows: int, tokens: int) -> None:
        self.seconds.append(seconds)


class FirstTokens:
    """The sink: when each request's first token and its end arrived."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.done: dict[str, threading.Event] = {}

    def __call__(self, events: list[Event]) -> None:
        now = time.perf_counter()
        for event in events:
            if isinstance(event, TokenDelta):
                self.first.setdefault(event.request_id, now)
            elif isinstance(event, Finished | Failed):
                self.done.setdefault(event.request_id, threading.Event()).set()


@torch.inference_mode()
def hf_prefill(loaded: LoadedModel, ids: list[int]) -> float:
    tensor = torch.tensor([ids], device=loaded.device)
    sync(loaded.device)
    started = time.perf_counter()
    loaded.model(input_ids=tensor, logits_to_keep=1)
    sync(loaded.device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts (the first warms up)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=64, help="cache rows (fewer compile faster)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(pick_threads(args.threads))
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"{loaded.name} on {loaded.device}, {loaded.dtype}, torch {torch.__version__}", flush=True)
    encoded = [loaded.encode_chat_with_prefix(chat_turns(p)) for p in workload(0)[: args.prompts]]
    observer, sink = PrefillTimes(), FirstTokens()
    config = EngineConfig(max_batch_size=args.max_batch_size, compile=not args.no_compile)
    thread = EngineThread(lambda: LLMEngine(loaded, config, observer), sink)
    engine = thread.start()
    if engine.runner.compiled is not None:
        started = time.perf_counter()
        engine.runner.compiled.wait()
        print(f"compiled decode ready after {time.perf_counter() - started:.1f} s", flush=True)
    params = SamplingParams(max_tokens=4)
    rows: dict[int, dict[str, list[float]]] = {i: {"hf": [], "prefill": [], "ttft": []} for i in range(len(encoded))}
    for round_ in range(args.rounds):
        for i, (ids, prefix_len) in enumerate(encoded):
            request_id = f"r{round_}-{i}"
            sink.done[request_id] = threading.Event()
            seq = Sequence(request_id, ids, params, stream=True, prefix_len=prefix_len)
            before = len(observer.seconds)
            started = time.perf_counter()
            thread.submit(seq)
            sink.done[request_id].wait()
            if round_ == 0:
                continue
            rows[i]["ttft"].append(sink.first[request_id] - started)
            rows[i]["prefill"].append(observer.seconds[before])
            rows[i]["hf"].append(hf_prefill(loaded, ids))
    thread.stop()
    print(f"{'prompt':>6} {'tokens':>6} {'prefix':>6} {'hf ms':>8} {'prefill ms':>10} {'ttft ms':>8}")
    for i, (ids, prefix_len) in enumerate(encoded):
        m = {k: statistics.median(v) * 1000 for k, v in rows[i].items() if v}
        if m:
            print(f"{i:6d} {len(ids):6d} {prefix_len:6d} {m['hf']:8.2f} {m['prefill']:10.2f} {m['ttft']:8.2f}")
    overall = {k: statistics.median([x for r in rows.values() for x in r[k]]) * 1000 for k in ("hf", "prefill", "ttft")}
    print("median  " + "  ".join(f"{k} {v:.2f} ms" for k, v in overall.items()), flush=True)


if __name__ == "__main__":
    main()
