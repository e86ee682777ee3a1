#!/usr/bin/env bash
# One GPU call: `axolotl train` with moequant's plugin against the same config with Axolotl's own
# quantize_moe_experts (no plugin), on a Qwen3-30B-A3B-shaped checkpoint truncated to $LAYERS layers
# (random weights, generated here). Writes $OUT/bench_axolotl.json and the logs.
#   needs: .whl/ with Axolotl 0.21.0 and the packages the device image lacks: axolotl-contribs-lgpl/mit,
#   addict, backoff, datasets, dill, distro, evaluate, fastcore, fire, kernels, multiprocess, platformdirs,
#   posthog, termcolor, trl, transformers 5.20.1, peft 0.21.2, huggingface_hub, safetensors,
#   bitsandbytes 0.50.2, and pydantic + pydantic-core + annotated-types + typing-inspection (the first
#   call lacked these four: benchmarks/results/bench_axolotl-NVIDIA_H200.json); all under 64 MiB;
#   DRY_RUN=1 runs the same steps on a CPU with tiny shapes (no wheels, no build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_axolotl_out}; mkdir -p "$OUT"
W=${WORKDIR:-/tmp/axbench}; rm -rf "$W"; mkdir -p "$W"
LAYERS=${LAYERS:-2}; STEPS=${STEPS:-20}
CONFIG=examples/axolotl/qwen3-30b-a3b-qlora.yml
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/steps.txt"; }

if [ -z "${DRY_RUN:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  # wandb's 20 MB wheel does not fit the call's 64 MiB; Axolotl only imports it (no use_wandb here), and
  # transformers treats a wandb without `run` as absent.
  mkdir -p /tmp/site/wandb && echo '"""Stand-in for the wandb package (imported, never used, by Axolotl here)."""' > /tmp/site/wandb/__init__.py
  export PYTHONPATH=/tmp/site:$PWD
  # The extension builds while the checkpoint is written and Axolotl's own run trains (it needs no moequant).
  ( MOEQUANT_CUDA_ARCHS=90a MAX_JOBS=14 python3 -m pip install --no-build-isolation --no-deps -q -e . > "$W/build.log" 2>&1; echo $? > "$W/build.rc" ) &
  BUILD=$!
  TINY=""
else
  export PYTHONPATH=$PWD; BUILD=""; TINY="--tiny"
fi
# On a CPU: fp32 and no Triton LoRA kernels (the device run keeps the config's bf16 and Axolotl's defaults).
DRY=(); [ -n "${DRY_RUN:-}" ] && DRY=(bf16=false lora_qkv_kernel=false lora_o_kernel=false lora_mlp_kernel=false)
stamp "setup done"
# Few files come back from a call: full logs stay in $W, their tails go to $OUT/logs.txt.
run() {
  python3 benchmarks/bench_axolotl.py "$@" > "$W/$LABEL.log" 2>&1
  grep '^BENCH_AXOLOTL ' "$W/$LABEL.log" | cut -d' ' -f2- > "$W/$LABEL.json"
  { echo "== $LABEL"; grep -v '^BENCH_AXOLOTL ' "$W/$LABEL.log" | grep -i 'moequant:\|error\|Traceback' | tail -15; } >> "$OUT/logs.txt"
  stamp "$LABEL $(tail -c 300 "$W/$LABEL.json")"
}
COMMON=(max_steps=$STEPS sequence_len=256 micro_batch_size=8 gradient_accumulation_steps=1 sample_packing=false
        flash_attention=false 'attn_implementation="sdpa"' gradient_checkpointing=false save_strategy='"no"' save_steps=null
        learning_rate=0.0001
        'bnb_config_kwargs={"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": false}' logging_steps=1 seed=0
        ${DRY[@]+"${DRY[@]}"})

LABEL=checkpoint run make-checkpoint "$W/ckpt" --layers "$LAYERS" $TINY
LABEL=bf16_load run bf16-load "$W/ckpt"
LABEL=axolotl_own run train "$CONFIG" "$W" axolotl_own "${COMMON[@]}" 'plugins=[]'
[ -n "$BUILD" ] && { wait "$BUILD"; stamp "moequant build rc=$(cat "$W/build.rc")"; tail -5 "$W/build.log" >> "$OUT/logs.txt"; }
LABEL=moequant_first run train "$CONFIG" "$W" moequant_first "${COMMON[@]}" "moequant_cache_dir=\"$W/cache\""
LABEL=moequant_cached run train "$CONFIG" "$W" moequant_cached "${COMMON[@]}" "moequant_cache_dir=\"$W/cache\""
# The bf16 baseline through the same ModelLoader (LoRA on bf16 weights, no quantization), a few steps.
BF16=(adapter='"lora"' load_in_4bit=false quantize_moe_experts=false bnb_config_kwargs=null 'plugins=[]')
LABEL=bf16_axolotl run train "$CONFIG" "$W" bf16_axolotl "${COMMON[@]}" "${BF16[@]}" max_steps=3
# Where a load's time goes (cProfile; these loads are slower by the profiler's overhead).
if [ -n "${PROFILE_LOADS:-}" ]; then
  export BENCH_AXOLOTL_PROFILE=1
  # PROFILE_LOADS: which loads ("bf16 first cached", or "1" for all three)
  [ "$PROFILE_LOADS" = 1 ] && PROFILE_LOADS="bf16 first cached"
  case " $PROFILE_LOADS " in *" bf16 "*)
    LABEL=profile_bf16 run train "$CONFIG" "$W" profile_bf16 "${COMMON[@]}" "${BF16[@]}" max_steps=1;; esac
  case " $PROFILE_LOADS " in *" first "*)
    LABEL=profile_first run train "$CONFIG" "$W" profile_first "${COMMON[@]}" max_steps=1 "moequant_cache_dir=\"$W/cache-profile\"";; esac
  case " $PROFILE_LOADS " in *" cached "*)
    LABEL=profile_cached run train "$CONFIG" "$W" profile_cached "${COMMON[@]}" max_steps=1 "moequant_cache_dir=\"$W/cache\"";; esac
  unset BENCH_AXOLOTL_PROFILE
fi
python3 - "$W" "$OUT" <<'PY'
import json, os, sys, torch
work, out = sys.argv[1], sys.argv[2]
runs = {}
for name in ("checkpoint", "bf16_load", "axolotl_own", "moequant_first", "moequant_cached", "bf16_axolotl",
             "profile_bf16", "profile_first", "profile_cached"):
    path = os.path.join(work, f"{name}.json")
    text = open(path).read().strip() if os.path.exists(path) else ""
    if text or not name.startswith("profile"):
        runs[name] = json.loads(text) if text else {"missing": "see logs.txt"}
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
json.dump({"device": device, "torch": torch.__version__, "runs": runs}, open(os.path.join(out, "bench_axolotl.json"), "w"), indent=1)
PY
stamp "done"
