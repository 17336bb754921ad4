#!/usr/bin/env bash
# Call 1 of a GPU run (see prepare.sh): carry [".whl", ".gpu/a"].
# Install the wheels, stash GGUF part 0, check imports, then (SmolLM2's shapes, random weights) the compiled step on
# the engine thread as a worker runs it, with its decode step times (`scripts/step_times.py`, which also times the
# transformers loop, ran out of its 70 s in stop 35 before its first figure: run it in a later call if wanted).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
cp .gpu/a/part0 /tmp/part0
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LLMBUS_CACHE_DIR=/tmp/llmbus-cache
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader
python3 -c "import torch, transformers, msgspec, nats, gguf; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
which nats-server || exit 3
python3 -c "import llmbus.cli, llmbus.bench.main, inference_worker.worker; print('imports ok')" || exit 4
M=/tmp/models/SmolLM2-135M-random-weights
python3 scripts/gpu_run/random_weights.py .gpu/a/tok $M || exit 5
timeout 150 python3 scripts/engine_thread_steps.py --model $M --device cuda --dtype bfloat16 --batches 1,64,256 2>&1 \
  | grep -v "Warning\|warn(\|Loading weights" | tee $OUT/engine_thread_steps.log | tail -20
echo "engine_thread_steps rc=${PIPESTATUS[0]}"
echo "call1 done"
