#!/usr/bin/env bash
# Call 1 of a GPU run (see prepare.sh): carry [".whl", ".gpu/a"].
# call 1 of the GPU run: install the wheels, stash GGUF part 0, check imports, then decode step times with
# SmolLM2's shapes and random weights (no real weights needed yet).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
cp .gpu/a/part0 /tmp/part0
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LLMBUS_CACHE_DIR=/tmp/llmbus-cache
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, msgspec, nats, gguf; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
which nats-server || exit 3
python3 -c "import llmbus.cli, llmbus.bench.main, inference_worker.worker; print('imports ok')" || exit 4
M=/tmp/models/SmolLM2-135M-random-weights
python3 - <<'PY' || exit 5
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/a/tok"), dtype=torch.float32)
model.save_pretrained("/tmp/models/SmolLM2-135M-random-weights")
shutil.copytree(".gpu/a/tok", "/tmp/models/SmolLM2-135M-random-weights", dirs_exist_ok=True)
PY
timeout 100 python3 scripts/step_times.py --model $M --device cuda --dtype bfloat16 --batches 1,64,256 --steps 40 2>&1 | tee $OUT/step_times.log | grep -E "^batch|compile|Error|error" | tail -20
echo "call1 done"
