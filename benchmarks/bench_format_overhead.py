"""What a stack format costs over plain NF4 in the experts op, measured so that noise cannot hide it (CUDA).

bench_experts.py times one format's cells one after another, and a same-cell NF4 control there moves
by 3-12% between runs on an H200 (clocks, L2 state): more than the few percent a format may cost.
Here every format of a cell is timed round-robin, --rounds times, each turn a median of --reps
calls, and each format is compared with the NF4 turn just before it in the same round: the reported
overhead is the median of those paired ratios, with its interquartile range. A second, separately
allocated NF4 stack ("nf4_copy") runs as a format too: its ratio to NF4 is the noise floor of the
method, and a format whose overhead is inside that floor cannot be told apart from NF4.

    python benchmarks/bench_format_overhead.py [--shapes qwen3_30b_a3b,...] [--tokens 1,256,4096,16384]
        [--formats nf4_dq,fp4,fp4_dq] [--modes nograd,fwd_bwd,lora_fwd_bwd] [--rounds 9] [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_experts import (  # noqa: E402
    SHAPES,
    build_bf16_experts,
    format_name,
    lora_kwargs,
    parse_format,
    quantize_experts,
    routing,
    time_ms,
)
from results_io import default_results_path, device_name, run_metadata, write_results  # noqa: E402

from moequant import ops  # noqa: E402
from moequant.experts import experts_op_args  # noqa: E402


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def cell_fn(mode, stack, x, idx, w, grad, lora):
    positional, format_kw, _ = stack
    kw = dict(format_kw, **(lora if mode == "lora_fwd_bwd" else {}))

    def nograd():
        with torch.no_grad():
            ops.experts_forward(*experts_op_args(x, idx, w, *positional, **kw))

    def fwd_bwd():
        out = ops.experts_forward(*experts_op_args(x, idx, w, *positional, **kw))
        out.backward(grad)
        x.grad = None

    return nograd if mode == "nograd" else fwd_bwd


def build_stacks(name, formats, device):
    """The shape's stacks: NF4, a second NF4 (the noise control) and each format, from one bf16 layer."""
    H, I, E, k = SHAPES[name]
    experts = build_bf16_experts(H, I, E, k, device)
    stacks = {"nf4": quantize_experts(experts, "nf4", False), "nf4_copy": quantize_experts(experts, "nf4", False)}
    for fmt in formats:
        stacks[format_name(*fmt)] = quantize_experts(experts, *fmt)
    return stacks


def bench_cell(name, T, modes, stacks, rounds, reps, device, rows):
    H, I, E, k = SHAPES[name]
    gen = torch.Generator(device=device).manual_seed(T)
    lora = lora_kwargs(H, I, E, device) if "lora_fwd_bwd" in modes else None
    idx, w = routing(T, E, k, device, gen)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    grad = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen)
    others = [f for f in stacks if f != "nf4"]
    for mode in modes:
        fns = {f: cell_fn(mode, stacks[f], x, idx, w, grad, lora) for f in stacks}
        for fn in fns.values():
            time_ms(fn, 1)  # warm every format before the first round
        times = {f: [] for f in stacks}
        paired = {f: [] for f in others}
        for r in range(rounds):
            order = others if r % 2 == 0 else others[::-1]  # no format always right after NF4
            for f in order:
                base = time_ms(fns["nf4"], reps, warmup=1)
                t = time_ms(fns[f], reps, warmup=1)
                times["nf4"].append(base)
                times[f].append(t)
                paired[f].append(t / base)
        for f in others:
            lo, med, hi = quartiles(paired[f])
            row = dict(shape=name, T=T, mode=mode, format=f, ratio_to_nf4=med, ratio_q1=lo, ratio_q3=hi,
                       ms=statistics.median(times[f]), nf4_ms=statistics.median(times["nf4"]),
                       stack_bytes_per_weight=stacks[f][2] / ((2 * I * H + H * I) * E))
            rows.append(row)
            print(f"{name:14s} T={T:6d} {mode:13s} {f:9s} {row['ms']:9.4f} ms vs nf4 {row['nf4_ms']:9.4f} ms | "
                  f"paired ratio {med:.4f} (IQR {lo:.4f}-{hi:.4f})", flush=True)
    del lora, x, grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,256,4096,16384")
    ap.add_argument("--formats", default="nf4_dq,fp4,fp4_dq")
    ap.add_argument("--modes", default="nograd,fwd_bwd,lora_fwd_bwd")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    formats = [parse_format(f) for f in args.formats.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    bad = set(modes) - {"nograd", "fwd_bwd", "lora_fwd_bwd"}
    if bad:
        ap.error(f"unknown --modes {sorted(bad)}: expected nograd, fwd_bwd, lora_fwd_bwd")
    device = torch.device("cuda")
    dev_name = device_name(device)
    out = args.out or default_results_path("bench_format_overhead", dev_name)
    rows = []
    meta = dict(run_metadata(dev_name),
                method="round-robin; per round, each format's median of --reps over the NF4 turn just before it; "
                       "median and quartiles of those paired ratios over --rounds", rounds=args.rounds, reps=args.reps,
                rows=rows)
    for name in args.shapes.split(","):
        stacks = build_stacks(name, formats, device)
        for T in [int(t) for t in args.tokens.split(",")]:
            try:
                bench_cell(name, T, modes, stacks, args.rounds, args.reps, device, rows)
            except torch.OutOfMemoryError as err:
                print(f"{name} T={T}: out of memory ({err}); skipped", flush=True)
                torch.cuda.empty_cache()
            write_results(out, meta)
        del stacks
        torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
