"""Loading and one QLoRA training step of a Qwen3-30B-A3B-shaped model, moequant vs bf16.

The model has Qwen3-30B-A3B's shapes (H=2048, 128 experts of I=768, top-8, 32 heads, 4 KV heads,
vocabulary 151936) truncated to --layers layers, with random weights generated on the GPU and
saved the way transformers saves Qwen3-MoE (one tensor per expert and projection, so the loader
fuses them, as for the real checkpoint). Every measurement runs in its own subprocess (a clean
CUDA context and allocator), after the checkpoint files have been read once (warm page cache):

* load:  ``from_pretrained(device_map="cuda", dtype=bf16)`` plain, with
  ``moequant.quantize_experts_on_load()`` (``fuse="quantized"``: per-expert tensors quantized one
  at a time into the packed stack), with ``fuse="cpu"`` and ``fuse="device"`` (transformers fuses
  each projection densely on the CPU or the GPU first), and ``moequant.load_quantized`` of the
  pre-quantized cache: wall time, peak ``max_memory_allocated`` and the final allocated bytes. The
  targets are a peak within 10% of the final model and a load time <= 1.3x the bf16 load.
* train: PEFT LoRA r=16 (``target_parameters`` = both expert projections, ``target_modules`` = the
  attention projections, lora_dropout=0), one AdamW step on --tokens tokens; bf16 + PEFT
  (grouped_mm experts, PEFT's dense delta) vs moequant (NF4 experts, factored LoRA in the op).
  Mean step time after --warmup steps, and the step's peak memory above what was resident.

    python benchmarks/bench_load_train.py [--layers 4] [--tokens 4096] [--steps 3] [--bnb]
        [--gradient-checkpointing] [--workdir /tmp/moequant-bench] [--out benchmarks/results/...]

``--bnb`` also quantizes the attention/lm_head ``nn.Linear`` layers with
``BitsAndBytesConfig(load_in_4bit=True)`` in the moequant and bnb_param runs (QLoRA as users run
it). The train kind ``bnb_param`` (run when bitsandbytes is importable) is today's Axolotl route:
bitsandbytes' 4-bit parametrization of each fused expert stack (``replace_parameter_4bit``),
which dequantizes the whole stack on every access, under the same PEFT LoRA.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from results_io import default_results_path, device_name, run_metadata, write_results  # noqa: E402

MB = 1024 * 1024
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    decoder_sparse_step=1, mlp_only_layers=[],
)
# --smoke: the same pipeline at toy size, to check the script on a CPU (numbers meaningless)
SMOKE = dict(QWEN3_30B_A3B, vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
             num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _shape(args) -> dict:
    return SMOKE if args.smoke else QWEN3_30B_A3B


LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


# ----------------------------------------------------------------------------------- phases (child)


DEVICE = "cuda"


def _cuda() -> bool:
    return DEVICE == "cuda"


def _reset() -> int:
    gc.collect()
    if not _cuda():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if _cuda() else 0


def _allocated() -> int:
    return torch.cuda.memory_allocated() if _cuda() else 0


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def phase_make(args) -> dict:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(**_shape(args), num_hidden_layers=args.layers)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.checkpoint, max_shard_size="2GB")
    return {"checkpoint_bytes": sum(os.path.getsize(os.path.join(args.checkpoint, f)) for f in os.listdir(args.checkpoint))}


def _bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _load(kind: str, args):
    from transformers import AutoModelForCausalLM

    import moequant

    kwargs = dict(dtype=torch.bfloat16, device_map=DEVICE)
    if kind == "bf16":
        return AutoModelForCausalLM.from_pretrained(args.checkpoint, experts_implementation="grouped_mm", **kwargs)
    if kind in ("moequant", "moequant_fuse_cpu", "moequant_fuse_device"):
        if args.bnb:
            kwargs["quantization_config"] = _bnb_config()
        fuse = {"moequant": "quantized", "moequant_fuse_cpu": "cpu", "moequant_fuse_device": "device"}[kind]
        with moequant.quantize_experts_on_load(fuse=fuse):
            return AutoModelForCausalLM.from_pretrained(args.checkpoint, **kwargs)
    if kind == "cached":
        return moequant.load_quantized(args.cache, device=DEVICE)
    if kind == "bnb_param":
        # Today's QLoRA-on-experts route (Axolotl's): each fused expert stack replaced by
        # bitsandbytes' 4-bit parametrization, which dequantizes the whole stack on every access;
        # the experts run bf16 grouped_mm on that (with --bnb, bitsandbytes linears as well).
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        from moequant.integrations.transformers import find_experts_modules

        if args.bnb:  # the moequant runs quantize the linears too
            kwargs["quantization_config"] = _bnb_config()
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, experts_implementation="grouped_mm", **kwargs)
        for _, experts in find_experts_modules(model):
            for name in ("gate_up_proj", "down_proj"):
                replace_parameter_4bit(experts, name, quant_type="nf4", blocksize=64)
        torch.cuda.empty_cache() if _cuda() else None
        return model
    raise ValueError(kind)


def phase_load(args) -> dict:
    from moequant.integrations import load_stats, memory_summary, nf4_stack_of, save_quantized
    from moequant.integrations.transformers import quantized_stacks

    import peft  # noqa: F401  (imported by any QLoRA script; keeps its import cost out of both timings)

    base = _reset()
    start = time.perf_counter()
    model = _load(args.kind, args)
    _sync()
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_mb": (_peak() - base) / MB,
        "final_mb": (_allocated() - base) / MB,
        "footprint_mb": model.get_memory_footprint() / MB,
        "num_parameters": model.num_parameters(),
    }
    if args.kind != "bf16":
        summary = memory_summary(model)
        result.update(experts_dense_mb=summary.experts_dense_bytes / MB, experts_nf4_mb=summary.experts_packed_bytes / MB)
        # the largest dense expert tensor, which the loader holds once while it is quantized
        result["largest_dense_expert_mb"] = max(
            nf4_stack_of(m, p).shape.numel() * 2 for _, m, p in quantized_stacks(model)
        ) / MB
    stats = load_stats(model)
    if stats is not None:
        result["quantize_seconds"] = stats.quantize_seconds
    if args.kind == "moequant" and args.cache and not args.bnb:
        save_quantized(model, args.cache)
    return result


def phase_train(args) -> dict:
    from peft import LoraConfig, get_peft_model

    model = _load(args.kind, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(**LORA))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    batch = args.tokens // args.seq_len
    ids = torch.randint(0, _shape(args)["vocab_size"], (batch, args.seq_len), device=DEVICE, generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    resident = _reset()
    times = []
    for _ in range(args.steps):
        _sync()
        start = time.perf_counter()
        loss = step()
        _sync()
        times.append((time.perf_counter() - start) * 1000)
    return {
        "step_ms": sum(times) / len(times),
        "step_ms_all": times,
        "resident_mb": resident / MB,
        "step_peak_above_resident_mb": (_peak() - resident) / MB,
        "loss": float(loss),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


# ---------------------------------------------------------------------------------- driver (parent)


def ratio(a: float, b: float):
    return a / b if b else None


def run_phase(args, phase: str, kind: str = "") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--kind", kind, "--layers", str(args.layers),
           "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--checkpoint", args.checkpoint, "--cache", args.cache]
    cmd += ["--bnb"] if args.bnb else []
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    print(f"[{time.strftime('%H:%M:%S')}] {phase} {kind}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm_page_cache(directory: str) -> None:
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            while f.read(64 * MB):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bnb", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--loads", default="bf16,moequant,moequant_fuse_cpu,moequant_fuse_device,cached",
                        help="load kinds to measure (comma-separated)")
    parser.add_argument("--trains", default=None,
                        help="train kinds (default: bf16,moequant, plus bnb_param when bitsandbytes is importable)")
    parser.add_argument("--workdir", default="/tmp/moequant-bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="toy shapes, CPU allowed: checks the script only")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seq_len <= 0 or args.tokens < args.seq_len or args.tokens % args.seq_len:
        parser.error(f"--tokens ({args.tokens}) must be a positive multiple of --seq-len ({args.seq_len})")

    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() or not args.smoke else "cpu"
    if args.phase is not None:  # child
        result = {"make": phase_make, "load": phase_load, "train": phase_train}[args.phase](args)
        print(json.dumps(result))
        return

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench_load_train.py needs a CUDA device (--smoke runs toy shapes on the CPU)")
    tag = ("smoke" if args.smoke else "qwen3-30b-a3b") + f"-{args.layers}l"
    args.checkpoint = args.checkpoint or os.path.join(args.workdir, tag)
    args.cache = args.cache or os.path.join(args.workdir, tag + "-moequant")
    results = {
        **run_metadata(device_name(DEVICE), ("transformers", "peft")),
        "shape": dict(_shape(args), num_hidden_layers=args.layers),
        "tokens": args.tokens, "seq_len": args.seq_len, "lora": LORA, "bnb_linear": args.bnb,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    if not os.path.exists(os.path.join(args.checkpoint, "config.json")):
        results["make"] = run_phase(args, "make")
    warm_page_cache(args.checkpoint)

    load_kinds = args.loads.split(",")
    load = {kind: run_phase(args, "load", kind) for kind in load_kinds if kind != "cached"}
    if "cached" in load_kinds and not args.bnb and "error" not in load.get("moequant", {"error": 1}):
        warm_page_cache(args.cache)
        load["cached"] = run_phase(args, "load", "cached")
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    train_kinds = args.trains.split(",") if args.trains else ["bf16", "moequant"] + (["bnb_param"] if has_bnb else [])
    train = {kind: run_phase(args, "train", kind) for kind in train_kinds}
    results.update(load=load, train=train)

    bf16, mq = load.get("bf16", {"error": "not run"}), load.get("moequant", {"error": "not run"})
    if "error" not in bf16 and "error" not in mq:
        results["load_ratios"] = {
            "time_moequant_over_bf16": ratio(mq["seconds"], bf16["seconds"]),
            "peak_over_final_moequant": ratio(mq["peak_mb"], mq["final_mb"]),
            "peak_minus_final_moequant_mb": mq["peak_mb"] - mq["final_mb"],
            "final_moequant_over_bf16": ratio(mq["final_mb"], bf16["final_mb"]),
        }
    tb, tm = train.get("bf16", {"error": "not run"}), train.get("moequant", {"error": "not run"})
    if "error" not in tb and "error" not in tm:
        results["train_ratios"] = {
            "step_time_moequant_over_bf16_peft": ratio(tm["step_ms"], tb["step_ms"]),
            "step_peak_moequant_over_bf16_peft": ratio(
                tm["step_peak_above_resident_mb"], tb["step_peak_above_resident_mb"]
            ),
            "resident_moequant_over_bf16": ratio(tm["resident_mb"], tb["resident_mb"]),
        }
    tp = train.get("bnb_param")
    if tp is not None and "error" not in tp and "error" not in tm and tp["trainable_parameters"] != tm["trainable_parameters"]:
        # PEFT 0.21's target_parameters does not match bitsandbytes-parametrized stacks
        results["note_bnb_param"] = (
            f"bnb_param trains {tp['trainable_parameters']} parameters against moequant's "
            f"{tm['trainable_parameters']}: PEFT attached no LoRA to its expert stacks, so it does less work"
        )
        print("note:", results["note_bnb_param"])
    if tp is not None and "error" not in tp and "train_ratios" in results:
        results["train_ratios"].update(
            step_time_moequant_over_bnb_param=ratio(tm["step_ms"], tp["step_ms"]),
            step_peak_moequant_over_bnb_param=ratio(tm["step_peak_above_resident_mb"], tp["step_peak_above_resident_mb"]),
        )

    print(f"\n{'toy (--smoke)' if args.smoke else 'Qwen3-30B-A3B'} shapes, {args.layers} layers, {results['device']}")
    print(f"{'load':<22}{'seconds':>10}{'peak MB':>12}{'final MB':>12}")
    for kind, r in load.items():
        row = f"{r['seconds']:10.2f}{r['peak_mb']:12.0f}{r['final_mb']:12.0f}" if "error" not in r else f"  {r['error']}"
        print(f"{kind:<22}{row}")
    print(f"{'train':<10}{'step ms':>10}{'resident MB':>12}{'step peak MB':>14}")
    for kind, r in train.items():
        if "error" in r:
            print(f"{kind:<10}  {r['error']}")
        else:
            print(f"{kind:<10}{r['step_ms']:10.1f}{r['resident_mb']:12.0f}{r['step_peak_above_resident_mb']:14.0f}")
    for key in ("load_ratios", "train_ratios"):
        if key in results:
            print(key, json.dumps({k: v if v is None else round(v, 3) for k, v in results[key].items()}))

    name = "bench_load_train" + ("-smoke" if args.smoke else "") + ("-bnb" if args.bnb else "")
    name += "-gc" if args.gradient_checkpointing else ""
    out = args.out or default_results_path(name, results["device"])
    print(f"wrote {write_results(out, results)}")


if __name__ == "__main__":
    main()
