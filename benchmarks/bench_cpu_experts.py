"""moequant's CPU experts op against transformers' experts module on the CPU, in the same process.

The CPU kernels multiply by the packed matrices without an fp32 copy of each routed expert:
experts with at most MOEQUANT_CPU_ON_THE_FLY_ROWS rows (default 24) decode their matrices in
L1-sized pieces as they use them; experts with more rows decode million-weight pieces for BLAS.
Per shape and token count T, median wall time of: the baselines, transformers' experts module
(`grouped_mm` implementation) with bf16 weights and inputs ("bf16") and with fp32 weights and
inputs ("fp32"); moequant on bf16 inputs in each format, with the default split ("default") and
with every expert on the BLAS path ("blas_only", MOEQUANT_CPU_ON_THE_FLY_ROWS=0), which shows
what decoding on the fly buys. Modes: forward under no_grad (inference/decode) and
forward+backward with respect to the hidden states (frozen experts, as in LoRA training).
Ratios are moequant / baseline of the same mode (`nograd_ratio_bf16`, `fwd_bwd_ratio_fp32`, ...).
The bf16 baseline runs no_grad only: its backward on a CPU without native bf16 GEMMs takes
seconds (qwen3_30b_a3b T=64: 12.8 s on a 2-core EPYC), so the backward is compared with fp32.

--max-experts caps E to fit a shape in host memory (the routed work per token does not depend on
E); the record says which E ran.

--lora-storages peft,fp32,bf16 also times the first format (default strategy) with LoRA r=--lora-rank
on both projections, its factors stored as PEFT passes them at inference ("peft": float32, B an
expert-minor view of [out, r*E]), contiguous float32, or contiguous bfloat16 (same values).

    python benchmarks/bench_cpu_experts.py [--shapes qwen3_30b_a3b,olmoe_1b_7b] [--tokens 1,8,64,256]
        [--formats nf4,nf4_dq,int8] [--modes nograd,fwd_bwd] [--strategies default,blas_only] [--reps 5]
        [--max-experts 64] [--lora-storages peft,fp32,bf16] [--lora-rank 16] [--out FILE]
    python benchmarks/bench_cpu_experts.py --shapes tiny --tokens 1,4 --reps 1   # smoke
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_experts import (  # noqa: E402
    LORA_STORAGES,
    SHAPES,
    build_bf16_experts,
    format_name,
    lora_factors,
    parse_format,
    quantize_experts,
    routing,
)
from results_io import cpuinfo_field, default_results_path, device_name, run_metadata, write_results  # noqa: E402

from moequant import ops  # noqa: E402

SIZES = dict(SHAPES, tiny=(256, 128, 8, 2))
STRATEGIES = {"default": None, "blas_only": "0"}
KNOB = "MOEQUANT_CPU_ON_THE_FLY_ROWS"


def simd_flags() -> list[str]:
    """The instruction sets that matter to the CPU kernels and to torch's own CPU GEMMs."""
    flags = (cpuinfo_field("flags") or "").split()
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]


def wall_ms(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timed_modes(call, x, modes, reps):
    """call(x) -> out; the median ms of each mode."""
    out = {}
    if "nograd" in modes:
        def nograd():
            with torch.no_grad():
                call(x)
        out["nograd_ms"] = wall_ms(nograd, reps)
    if "fwd_bwd" in modes:
        xg = x.detach().requires_grad_(True)
        grad = torch.randn_like(x)

        def fwd_bwd():
            call(xg).backward(grad)
            xg.grad = None
        out["fwd_bwd_ms"] = wall_ms(fwd_bwd, reps)
    return out


def with_knob(value, fn):
    old = os.environ.get(KNOB)
    if value is None:
        os.environ.pop(KNOB, None)
    else:
        os.environ[KNOB] = value
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(KNOB, None)
        else:
            os.environ[KNOB] = old


def bench_shape(name, tokens, formats, modes, reps, max_experts, strategies, lora_storages=(), lora_rank=16):
    H, I, E, k = SIZES[name]
    E = min(E, max_experts) if max_experts else E
    experts = build_bf16_experts(H, I, E, k, "cpu")
    stacks = {fmt: quantize_experts(experts, *fmt)[:2] for fmt in formats}
    baselines = {"bf16": experts, "fp32": copy.deepcopy(experts).float()}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in tokens:
        x = torch.randn(T, H, dtype=torch.bfloat16, generator=gen)
        idx, w = routing(T, E, k, "cpu", gen)
        bases = {}
        for dtype, module in baselines.items():
            base_modes = modes if dtype == "fp32" else [mode for mode in modes if mode == "nograd"]
            def baseline(h, m=module):
                return m(h.to(m.gate_up_proj.dtype), idx, w.to(m.gate_up_proj.dtype))
            bases[dtype] = timed_modes(baseline, x, base_modes, reps)
            rows.append({"shape": name, "E": E, "T": T, "impl": dtype, **bases[dtype]})
            print(name, T, dtype, bases[dtype], flush=True)
        for fmt, (positional, kwargs) in stacks.items():
            def call(h, positional=positional, kwargs=kwargs):
                return ops.experts_forward(h, idx, w, *positional, blocksize=64, **kwargs)
            for strategy in strategies:
                knob = STRATEGIES[strategy]
                got = with_knob(knob, lambda: timed_modes(call, x, modes, reps))
                row = {"shape": name, "E": E, "T": T, "impl": f"moequant[{format_name(*fmt)}]", "strategy": strategy,
                       **got}
                for dtype, base in bases.items():
                    for key, ms in got.items():
                        if key in base:
                            row[key.replace("_ms", f"_ratio_{dtype}")] = round(ms / base[key], 3)
                rows.append(row)
                timings = {k: v for k, v in row.items() if k.endswith("ms") or "ratio" in k}
                print(name, T, row["impl"], strategy, timings, flush=True)
        positional, kwargs = stacks[formats[0]]
        for storage in lora_storages:
            lora = lora_factors(H, I, E, lora_rank, "cpu", storage)

            def lora_call(h, positional=positional, kwargs=dict(kwargs, **lora)):
                return ops.experts_forward(h, idx, w, *positional, blocksize=64, **kwargs)
            got = timed_modes(lora_call, x, modes, reps)
            row = {"shape": name, "E": E, "T": T, "impl": f"moequant[{format_name(*formats[0])}]+lora{lora_rank}",
                   "lora_storage": storage, "strategy": "default", **got}
            rows.append(row)
            print(name, T, row["impl"], storage, got, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="qwen3_30b_a3b,olmoe_1b_7b")
    ap.add_argument("--tokens", default="1,8,64,256")
    ap.add_argument("--formats", default="nf4,nf4_dq,int8")
    ap.add_argument("--modes", default="nograd,fwd_bwd")
    ap.add_argument("--strategies", default="default,blas_only")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-experts", type=int, default=0, help="cap E (0: the shape's own)")
    ap.add_argument("--lora-storages", default="", help="peft, fp32 and/or bf16 (see above); empty: no LoRA rows")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    for name in shapes:
        if name not in SIZES:
            ap.error(f"unknown shape {name!r}: expected one of {', '.join(SIZES)}")
    modes = args.modes.split(",")
    if not set(modes) <= {"nograd", "fwd_bwd"}:
        ap.error(f"--modes takes nograd and/or fwd_bwd, got {args.modes!r}")
    formats = [parse_format(f) for f in args.formats.split(",")]
    strategies = args.strategies.split(",")
    if not set(strategies) <= set(STRATEGIES):
        ap.error(f"--strategies takes {' and/or '.join(STRATEGIES)}, got {args.strategies!r}")
    tokens = [int(t) for t in args.tokens.split(",")]
    lora_storages = [s for s in args.lora_storages.split(",") if s]
    if not set(lora_storages) <= set(LORA_STORAGES):
        ap.error(f"--lora-storages takes {', '.join(LORA_STORAGES)}, got {args.lora_storages!r}")
    device = device_name("cpu")
    out = args.out or default_results_path("bench_cpu_experts", device)
    record = {**run_metadata(device, ("transformers",)), "threads": torch.get_num_threads(), "simd": simd_flags(),
              "on_the_fly_rows": os.environ.get(KNOB, "default (24)"), "rows": []}
    for name in shapes:
        record["rows"] += bench_shape(name, tokens, formats, modes, args.reps, args.max_experts, strategies,
                                      lora_storages, args.lora_rank)
        write_results(out, record)
    print("wrote", write_results(out, record))


if __name__ == "__main__":
    main()
