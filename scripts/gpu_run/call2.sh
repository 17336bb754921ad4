#!/usr/bin/env bash
# Call 2 of a GPU run (see prepare.sh): carry [".gpu/b"], on the machine call 1 left warm.
# call 2 of the GPU run: assemble SmolLM2's GGUF (part 0 stashed by call 1), convert it, check float32 equality,
# run the bench at 1/64/256 clients, then split a lone request's TTFT.
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LLMBUS_CACHE_DIR=/tmp/llmbus-cache
M=/tmp/models/SmolLM2-135M-Instruct
profile_worker() {
  for _ in $(seq 280); do grep -q "concurrency 256: " $OUT/bench.log 2>/dev/null && break; sleep 1; done
  sleep 5
  pid=$(pgrep -f "llmbus.cli worker" | head -1)
  [ -n "$pid" ] && timeout 30 py-spy record --pid "$pid" --duration 10 --rate 250 --threads --format raw \
    --output $OUT/worker256.raw --nonblocking > $OUT/pyspy.log 2>&1
  [ -n "$pid" ] && timeout 30 py-spy record --pid "$pid" --duration 8 --rate 250 --threads --gil --format raw \
    --output $OUT/worker256gil.raw --nonblocking >> $OUT/pyspy.log 2>&1
}
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
timeout 230 python3 scripts/gpu_check.py --model $M --skip-times --skip-float32-compiled 2>&1 | grep -v "DEBUG\|Warning\|warn(\|Loading weights\|^\s*$" | tee $OUT/gpu_check.log | tail -25
echo "gpu_check rc=${PIPESTATUS[0]}"
profile_worker &  # py-spy on the worker during the 256-client point, if ptrace is allowed
timeout 290 python3 -m llmbus.cli bench --model $M --device cuda --concurrency 1,64,256 --max-tokens 128 \
  --min-requests 24 --ready-timeout 200 --point-time-cap 40 --out $OUT/bench > $OUT/bench.log 2>&1
echo "bench rc=$?"; grep -v "^\s*$" $OUT/bench.log | tail -32
timeout 80 python3 scripts/ttft_parts.py --model $M --device cuda --max-batch-size 8 2>&1 | grep -v "Warning\|warn(\|Loading weights" | tee $OUT/ttft_parts.log | tail -14
echo "call2 done"
