#!/usr/bin/env bash
# Call 2 of a GPU run (see prepare.sh): carry [".gpu/b"], on the machine call 1 left warm.
# Assemble SmolLM2's GGUF (part 0 stashed by call 1), convert it, run the bench at 1/64/256 clients over
# NATS, then check the engine's greedy text against `model.generate` (float32) and bf16's agreement.
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LLMBUS_CACHE_DIR=/tmp/llmbus-cache
M=/tmp/models/SmolLM2-135M-Instruct
if [ ! -f /tmp/part0 ]; then echo "FRESH MACHINE: part0 missing"; exit 3; fi
mkdir -p /tmp/gguf && cat /tmp/part0 .gpu/b/part1 > /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .gpu/b/sha)  /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 4
python3 - <<'PY' || exit 5
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, f = "/tmp/gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
t = AutoTokenizer.from_pretrained(d, gguf_file=f)
m.hf_quantizer = None
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
m.save_pretrained("/tmp/models/SmolLM2-135M-Instruct"); t.save_pretrained("/tmp/models/SmolLM2-135M-Instruct")
print("converted")
PY
timeout 300 python3 -m llmbus.cli bench --model $M --device cuda --concurrency 1,64,256 --max-tokens 128 \
  --min-requests 24 --ready-timeout 200 --point-time-cap 40 --out /tmp/bench > $OUT/bench.log 2>&1
echo "bench rc=$?"; cp /tmp/bench/bench.json /tmp/bench/bench.png /tmp/bench/worker-0.log $OUT/; grep -v "^\s*$" $OUT/bench.log | tail -32
timeout 210 python3 scripts/gpu_check.py --model $M --skip-times 2>&1 | grep -v "DEBUG\|Warning\|warn(\|Loading weights\|^\s*$" | tee $OUT/gpu_check.log | tail -25
echo "gpu_check rc=${PIPESTATUS[0]}"
echo "call2 done"
