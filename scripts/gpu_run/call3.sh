#!/usr/bin/env bash
# A check on a fresh machine with random weights, carry [".whl", ".gpu/a/tok"]: the compiled decode step as the
# worker runs it (engine thread, warm-up thread), then the runner's compiled step times at batch 1 and 64.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LLMBUS_CACHE_DIR=/tmp/llmbus-cache
M=/tmp/models/SmolLM2-135M-random-weights
python3 scripts/gpu_run/random_weights.py .gpu/a/tok $M || exit 5
timeout 120 python3 scripts/engine_thread_steps.py --model $M --device cuda --dtype bfloat16 --batches 1,64 2>&1 \
  | grep -v "Warning\|warn(\|Loading weights" | tee $OUT/engine_thread_steps.log | tail -40
echo "engine_thread_steps rc=${PIPESTATUS[0]}"
timeout 60 python3 scripts/step_times.py --model $M --device cuda --dtype bfloat16 --batches 1,64 --variants compiled \
  --steps 40 2>&1 | tee $OUT/step_times.log | grep -E "^batch|compile|Error" | tail -8
echo "call3 done"
