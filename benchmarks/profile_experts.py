"""Where the time of one experts call goes: a torch.profiler kernel table (CUDA).

    python benchmarks/profile_experts.py --shape mixtral_8x7b --tokens 4096 [--backward] [--lora] [--format int8]

Prints the CUDA kernels of a few calls of ``experts_forward`` (and its backward with --backward),
sorted by total device time, beside the bf16 ``grouped_mm`` layer on the same inputs.
"""

from __future__ import annotations

import argparse

import torch

from bench_experts import (
    SHAPES,
    build_bf16_experts,
    lora_kwargs,
    parse_format,
    profiled_kernels,
    quantize_experts,
    routing,
)

from moequant import ops
from moequant.experts import experts_op_args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mixtral_8x7b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--rows", type=int, default=14, help="kernel rows to print")
    ap.add_argument("--format", default="nf4", help="stack format: nf4, nf4_dq, fp4, fp4_dq or int8")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_experts.py needs a CUDA device")
    dev = "cuda"
    H, I, E, k = SHAPES[args.shape]
    gen = torch.Generator(device=dev).manual_seed(0)
    experts = build_bf16_experts(H, I, E, k, dev)
    positional, format_kw, _ = quantize_experts(experts, *parse_format(args.format))
    kw = dict(format_kw, **(lora_kwargs(H, I, E, dev) if args.lora else {}))
    idx, w = routing(args.tokens, E, k, dev, gen)
    x = torch.randn(args.tokens, H, device=dev, dtype=torch.bfloat16, generator=gen)
    x.requires_grad_(args.backward)

    def run(fn):
        out = fn()
        if args.backward:
            out.backward(torch.ones_like(out))

    impls = {
        f"moequant[{args.format}]": lambda: ops.experts_forward(*experts_op_args(x, idx, w, *positional, **kw)),
        "bf16_grouped_mm": lambda: experts(x, idx, w),
    }
    for name, fn in impls.items():
        with torch.no_grad() if not args.backward else torch.enable_grad():
            events, total = profiled_kernels(lambda: run(fn), args.reps)
        print(f"\n{args.shape} T={args.tokens} {name}{' fwd+bwd' if args.backward else ' fwd'}: "
              f"{total:.3f} ms of kernels per call")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.rows]:
            print(f"  {e.self_device_time_total / 1e3 / args.reps:8.3f} ms  {e.count // args.reps:4d}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
