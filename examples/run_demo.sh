#!/usr/bin/env bash
# Sets up this machine and runs the main demo (examples/demo.py): quantize-on-load of a tiny MoE
# checkpoint, memory table, LoRA fine-tuning of the experts, adapter save/reload, generation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0   # pinned CPU build; keeps an installed (CUDA) torch
fi
$PY -m pip install -q transformers==5.20.1 peft==0.21.2 accelerate==1.15.0 safetensors
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation -e .
$PY examples/demo.py "$@"
