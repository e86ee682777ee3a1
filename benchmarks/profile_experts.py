"""Where the time of one experts call goes: a torch.profiler kernel table (CUDA).

    python benchmarks/profile_experts.py --shape mixtral_8x7b --tokens 4096 [--backward] [--lora] [--format int8] [--gaps]

Prints the CUDA kernels of a few calls of ``experts_forward`` (and its backward with --backward),
sorted by total device time, beside the bf16 ``grouped_mm`` layer on the same inputs. --gaps also
prints where the GPU idles in one call: its unprofiled wall time (CUDA events), and from a trace of
another call the kernels' busy time and the longest gaps between them, with the host's sync or
copy calls that fell inside each gap.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

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


def trace_gaps(events, min_gap_us=3.0):
    """Kernel-busy ms and the GPU's idle gaps longer than min_gap_us in chrome-trace `events`, longest
    first: (us, kernel before, kernel after, the host's sync and copy calls that overlap the gap)."""
    spans = [e for e in events if e.get("ph") == "X"]
    gpu = sorted((e for e in spans if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    host = [e for e in spans if e.get("cat") == "cuda_runtime" and ("ynchronize" in e["name"] or "Memcpy" in e["name"])]
    gaps, busy_end, before = [], None, None
    for e in gpu:
        if busy_end is not None and e["ts"] - busy_end > min_gap_us:
            calls = sorted({h["name"] for h in host if busy_end <= h["ts"] + h["dur"] and h["ts"] <= e["ts"]})
            gaps.append((e["ts"] - busy_end, before, e["name"], calls))
        if busy_end is None or e["ts"] + e["dur"] > busy_end:
            busy_end, before = e["ts"] + e["dur"], e["name"]
    return sum(e["dur"] for e in gpu) / 1e3, sorted(gaps, key=lambda g: -g[0])


def idle_gaps(step):
    """(unprofiled wall ms of step(), then trace_gaps of a torch.profiler trace of another step())."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    wall = start.elapsed_time(end)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    return (wall, *trace_gaps(events))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mixtral_8x7b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--rows", type=int, default=14, help="kernel rows to print")
    ap.add_argument("--format", default="nf4", help="stack format: nf4, nf4_dq, fp4, fp4_dq or int8")
    ap.add_argument("--gaps", action="store_true", help="also where the GPU idles in one call (see the module doc)")
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
        if args.gaps:
            with torch.no_grad() if not args.backward else torch.enable_grad():
                wall, busy, gaps = idle_gaps(lambda: run(fn))
            print(f"  one call: {wall:.3f} ms wall (unprofiled); traced: kernels busy {busy:.3f} ms, "
                  f"{sum(g[0] for g in gaps) / 1e3:.3f} ms in {len(gaps)} gaps; the longest:")
            for us, before, after, calls in gaps[:8]:
                print(f"  {us:8.1f} us after {before[:50]!r} before {after[:50]!r} host {calls}")


if __name__ == "__main__":
    main()
