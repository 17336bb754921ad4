"""SmolLM2's shapes with random weights, for the step-time checks of a GPU run (the real weights come in call 2).

python3 scripts/gpu_run/random_weights.py TOKENIZER_AND_CONFIG_DIR OUTPUT_DIR
"""

import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = sys.argv[1:3]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
model.save_pretrained(target)
shutil.copytree(source, target, dirs_exist_ok=True)
