"""The LoRA row adds (add_low_rank_rows, experts_low_rank.cu) of one experts fwd+bwd, old kernel
against new (CUDA).

    python benchmarks/bench_low_rank.py [--shape qwen3_30b_a3b] [--tokens 4096] [--reps 5]
        [--out benchmarks/results/bench_low_rank-<device>.json]

MOEQUANT_LOW_RANK_KERNEL is read once per process, so each kernel runs in its own process ("0":
add_low_rank_mma_kernel, unset: the streaming kernel). Each profiles experts_forward + backward
with LoRA r=16 on both projections (torch.profiler) and reports the device time of the kernels
named add_low_rank*, the bandwidth that implies (every row read and written once: 2 x rows x the
four term widths 2I, H, I, H x 2 bytes) and the whole fwd+bwd kernel time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import run_metadata, write_results  # noqa: E402

VARIANTS = {"old (add_low_rank_mma_kernel)": "0", "new (default)": None}


def measure(args) -> dict:
    from bench_experts import SHAPES, build_bf16_experts, lora_kwargs, profiled_kernels, quantize_experts, routing

    from moequant import ops
    from moequant.experts import experts_op_args

    dev = "cuda"
    H, I, E, k = SHAPES[args.shape]
    gen = torch.Generator(device=dev).manual_seed(0)
    positional, format_kw, _ = quantize_experts(build_bf16_experts(H, I, E, k, dev), "nf4", False)
    kw = dict(format_kw, **lora_kwargs(H, I, E, dev))
    idx, w = routing(args.tokens, E, k, dev, gen)
    x = torch.randn(args.tokens, H, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()

    def step():
        out = ops.experts_forward(*experts_op_args(x, idx, w, *positional, **kw))
        out.backward(torch.ones_like(out))

    events, fwd_bwd_ms = profiled_kernels(step, args.reps)
    low_rank = [e for e in events if "add_low_rank" in e.key]
    low_rank_ms = sum(e.self_device_time_total for e in low_rank) / 1e3 / args.reps
    rows = args.tokens * k
    gbytes = 2 * rows * (2 * I + H + I + H) * 2 / 1e9  # the four terms' rows, read and written
    return {
        "kernels": sorted({e.key for e in low_rank}),
        "calls_per_step": sum(e.count for e in low_rank) // args.reps,
        "low_rank_ms": low_rank_ms,
        "low_rank_gb_s": gbytes / (low_rank_ms / 1e3) if low_rank_ms else None,
        "fwd_bwd_kernels_ms": fwd_bwd_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3_30b_a3b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON results path")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_low_rank.py needs a CUDA device")
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = {}
    for name, value in VARIANTS.items():
        env = {key: v for key, v in os.environ.items() if key != "MOEQUANT_LOW_RANK_KERNEL"}
        if value is not None:
            env["MOEQUANT_LOW_RANK_KERNEL"] = value
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shape", args.shape,
               "--tokens", str(args.tokens), "--reps", str(args.reps)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{args.shape} T={args.tokens} LoRA r=16 fwd+bwd on {torch.cuda.get_device_name()}")
    print(f"{'kernel':32s} {'calls':>5s} {'add ms':>8s} {'GB/s':>7s} {'fwd+bwd ms':>10s}")
    for name, r in results.items():
        print(f"{name:32s} {r['calls_per_step']:5d} {r['low_rank_ms']:8.3f} {r['low_rank_gb_s'] or 0:7.0f} "
              f"{r['fwd_bwd_kernels_ms']:10.3f}  {', '.join(k[:40] for k in r['kernels'])}")
    if args.out:
        write_results(args.out, dict(run_metadata(torch.cuda.get_device_name()), shape=args.shape, tokens=args.tokens,
                                     reps=args.reps, results=results))


if __name__ == "__main__":
    main()
