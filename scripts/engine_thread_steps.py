"""Decode step times of the engine as a worker runs it: built and stepped on its own thread (`EngineThread`), the
compiled step warmed up on the warm-up thread, then serving batches of 1 and 64 rows.

    python scripts/engine_thread_steps.py [--model DIR] [--device cuda] [--batches 1,64] [--tokens 48]

`step_times.py` times the runner on the calling thread; this script exists because the worker's threads differ:
on an H100 the compiled step, warmed up on one thread, failed at its first replay on the engine thread while
`step_times.py` ran it fine. Prints the compile state and the median decode step per batch; exits 1 if the
compiled step failed (the engine then decodes eagerly).
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

from inference_worker.engine import EngineConfig, Event, Failed, Finished, LLMEngine
from inference_worker.engine_thread import EngineThread
from inference_worker.events import NoObserver
from inference_worker.model_loader import load_model
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence


class StepTimes(NoObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []

    def decode_step(self, seconds: float, rows: int) -> None:
        self.steps.append((rows, seconds))


class Answers:
    def __init__(self) -> None:
        self.left = 0
        self.failures: list[Failed] = []
        self.all_done = threading.Event()

    def __call__(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Failed):
                self.failures.append(event)
            if isinstance(event, Finished | Failed):
                self.left -= 1
                if self.left == 0:
                    self.all_done.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"{loaded.name} on {loaded.device}, {loaded.dtype}, torch {torch.__version__}", flush=True)
    observer, answers = StepTimes(), Answers()
    config = EngineConfig(max_batch_size=max(batches), compile=True, prefix_cache=False)
    thread = EngineThread(lambda: LLMEngine(loaded, config, observer), answers)
    engine = thread.start()
    started = time.perf_counter()
    if engine.runner.compiled is not None:
        engine.runner.compiled.wait()
    print(f"compile state {engine.runner.compile_state} after {time.perf_counter() - started:.1f} s", flush=True)
    prompt = loaded.encode_chat([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    for batch in batches:
        observer.steps.clear()
        answers.left, answers.all_done = batch, threading.Event()
        for i in range(batch):
            thread.submit(Sequence(f"b{batch}-{i}", list(prompt), params))
        answers.all_done.wait()
        full = [seconds for rows, seconds in observer.steps if rows == batch][2:]  # the first replays record graphs
        median = statistics.median(full) * 1000 if full else float("nan")
        print(f"batch {batch:4d}: median decode step {median:.2f} ms over {len(full)} steps", flush=True)
    thread.stop(timeout=30)
    failed = engine.runner.compiled is not None and engine.runner.compiled.failed
    print(f"compiled step failed: {failed}; failed requests: {len(answers.failures)}")
    return 1 if failed or answers.failures else 0


if __name__ == "__main__":
    sys.exit(main())
