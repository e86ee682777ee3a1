"""Decode per-layer experts call (T=1 and T=8, no grad) replayed from a CUDA graph: moequant's
fused GEMV in each format beside transformers' bf16 `grouped_mm` experts, same run, same routing.

Each graph holds --calls consecutive experts calls, each with its own input and routing (top-k of
softmax(randn)), so that what one call reads is not in L2 for the next (as consecutive layers of a
model step); the time per call is the graph's replay time / --calls (CUDA events, 3 warm-ups,
median of --reps). Also timed: a graph of one call (includes the graph launch) and the same calls
eagerly. The calls of a graph are independent, so a call may start (programmatic dependent launch,
a side stream) before the one before it ends; in a model the next layer waits for this one.
--chain makes each call's input depend on the previous call's output, as a residual add does
(`x + 0 * out`, one elementwise kernel a call, values unchanged); the row then also holds that
kernel's own time per call (`separator_us`, a graph of the adds alone), included in the call times.
The bf16 baseline is graph-captured when its eager call makes no host sync (checked with
torch.cuda.set_sync_debug_mode("error") first) and capture succeeds; otherwise it is timed eagerly
and the row says so (`bf16_captured`, `bf16_capture_error`).

--lora-rank r (default 16) also times the first format with LoRA r on both projections (row
"<format>+lora<r>", factors contiguous in bfloat16; its bandwidth counts the packed bytes only).
--peft-lora-row also times them as PEFT hands them to the op at inference (row "<format>+lora<r>-peft":
float32, A [E*r, in] viewed [E, r, in], B [out, r*E] viewed [E, out, r], expert-minor: a gather per
element of B), same values. --no-pdl-rows also times the first format (and its LoRA row) with
MOEQUANT_DECODE_PDL=0 (plain launches instead of programmatic dependent launches; rows
"<format>-nopdl"). --env-row NAME=VALUE (repeatable) does the same with any knob the kernels read per
call (rows "<format>-NAME=VALUE", the setting in the row's `env`), so that two settings are compared
in one process, on the same weights and inputs, a minute apart. --profile-kernels prints, per shape
and T, the CUDA kernels of one eager call of the first format (and its LoRA row) with their device
times (torch.profiler).

Bandwidth: GB/s of the packed bytes the call reads (codes + statistics of the distinct experts its
routing selects, both projections) over the per-call time, and its % of a same-run device-to-device
copy (read + write bytes / time of a 1 GiB `copy_`).

    python benchmarks/bench_decode_graph.py [--shapes qwen3_30b_a3b,olmoe_1b_7b,mixtral_8x7b,deepseek_v3]
        [--tokens 1,8] [--formats nf4,nf4_dq,fp4,fp4_dq,int8] [--calls 16] [--reps 20]
        [--lora-rank 16] [--peft-lora-row] [--no-pdl-rows] [--env-row NAME=VALUE ...] [--profile-kernels] [--chain]
        [--out benchmarks/results/bench_decode_graph-<device>.json]
    python benchmarks/bench_decode_graph.py --device cpu --shapes tiny --reps 2   # smoke: eager only
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_experts import SHAPES as REFERENCE_SHAPES  # noqa: E402
from bench_experts import (  # noqa: E402
    build_bf16_experts,
    env_vars,
    first_host_sync,
    format_name,
    lora_factors,
    parse_format,
    quantize_experts,
    time_ms,
)
from results_io import default_results_path, device_name, run_metadata, write_results  # noqa: E402

from moequant import ops  # noqa: E402
from moequant.experts import experts_op_args  # noqa: E402

SHAPES = dict(REFERENCE_SHAPES, tiny=(256, 128, 16, 8))  # tiny: CPU smoke runs


def median_ms(fn, reps, device, warmup=3):
    """Median time of fn() in ms: CUDA events (bench_experts.time_ms) on a GPU, wall clock on a CPU."""
    if device.type == "cuda":
        return time_ms(fn, reps, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(device, reps):
    """Same-run reference: device-to-device copy of 1 GiB, (read + write) bytes / time."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps, device)
    return 2 * n / (ms * 1e-3) / 1e9


def capture(fn):
    """A CUDA graph of fn(), after two warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def print_kernels(label, fn):
    """The CUDA kernels one fn() launches, in launch order, with their device times."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels)
    print(f"  kernels of one call, {label}: {len(kernels)}, {total:.1f} us of device time", flush=True)
    for e in kernels:
        print(f"    {e.device_time:7.1f} us  {e.name[:110]}", flush=True)


def routed_calls(T, H, E, k, calls, device, gen):
    """--calls independent (hidden, top_k_index, top_k_weights) triples."""
    out = []
    for _ in range(calls):
        logits = torch.randn(T, E, device=device, generator=gen)
        w, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen)
        out.append((x, idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)))
    return out


def calls_of(call, inputs, chain):
    """A function making call(x, idx, w) on each input; with chain, each x waits for the previous output."""
    def run_all():
        out = None
        for x, idx, w in inputs:
            if chain and out is not None:
                x = torch.add(x, out, alpha=0)  # x's values, but after the previous call (a residual add)
            out = call(x, idx, w)
    return run_all


def timed(run_all, calls, reps, device, graphable=True):
    """Per-call ms of run_all (which makes `calls` calls): eager, and replayed from a graph."""
    r = {"eager_ms": median_ms(run_all, reps, device) / calls}
    if device.type == "cuda" and graphable:
        graph = capture(run_all)
        r["graph_ms"] = median_ms(graph.replay, reps, device) / calls
        del graph
    return r


@torch.no_grad()
def bench_shape(name, tokens, formats, lora_rank, calls, reps, device, copy_rate, rows, no_pdl_rows=False,
                profile_kernels=False, peft_lora_row=False, chain=False, env_rows=()):
    H, I, E, k = SHAPES[name]
    gen = torch.Generator(device=device).manual_seed(0)
    experts = build_bf16_experts(H, I, E, k, device)
    stacks = {fmt: quantize_experts(experts, *fmt) for fmt in formats}
    variants = [(fmt, {}, {}, "") for fmt in formats]  # (format, LoRA kwargs, environment, suffix)
    if lora_rank:  # the first format again with LoRA on both projections
        variants.append((formats[0], lora_factors(H, I, E, lora_rank, device), {}, ""))
        if peft_lora_row:
            variants.append((formats[0], lora_factors(H, I, E, lora_rank, device, "peft"), {}, "-peft"))
    first = [v for v in variants if v[0] == formats[0]]
    if no_pdl_rows:
        variants += [(fmt, kw, {"MOEQUANT_DECODE_PDL": "0"}, suffix + "-nopdl") for fmt, kw, _, suffix in first]
    for env_name, value in env_rows:
        variants += [(fmt, kw, {env_name: value}, f"{suffix}-{env_name}={value}") for fmt, kw, _, suffix in first]
    bf16_expert_bytes = 3 * H * I * 2
    for T in tokens:
        inputs = routed_calls(T, H, E, k, calls, device, gen)
        distinct = [torch.unique(idx).numel() for _, idx, _ in inputs]  # host-side, outside timing
        mean_distinct = statistics.mean(distinct)

        bf16_all = calls_of(experts, inputs, chain)
        separator_us = None
        if chain and device.type == "cuda":  # the adds alone, to read the calls' times net of them
            out0 = torch.zeros_like(inputs[0][0])
            adds = capture(lambda: [torch.add(x, out0, alpha=0) for x, _, _ in inputs[1:]])
            separator_us = median_ms(adds.replay, reps, device) / calls * 1e3
            del adds

        bf16_err = first_host_sync(bf16_all) if device.type == "cuda" else None
        try:
            bf16 = timed(bf16_all, calls, reps, device, graphable=bf16_err is None)
        except RuntimeError as err:  # capture refused: time it eagerly
            bf16_err = str(err).strip().splitlines()[0]
            torch.cuda.synchronize()
            bf16 = timed(bf16_all, calls, reps, device, graphable=False)
        bf16_captured = "graph_ms" in bf16
        bf16_ms = bf16.get("graph_ms", bf16["eager_ms"])
        for fmt, lora_kw, env, suffix in variants:
            positional, format_kw, stack_bytes = stacks[fmt]
            format_kw = dict(format_kw, **lora_kw)
            label = format_name(*fmt) + (f"+lora{lora_rank}" if lora_kw else "") + suffix

            def mq_call(x, idx, w, positional=positional, format_kw=format_kw):
                return ops.experts_forward(*experts_op_args(x, idx, w, *positional, blocksize=64, **format_kw))

            mq_all = calls_of(mq_call, inputs, chain)

            x0, idx0, w0 = inputs[0]

            def mq_one():
                mq_call(x0, idx0, w0)

            with env_vars(env):  # read at each call, so also by the captured launches
                mq_err = first_host_sync(mq_all) if device.type == "cuda" else None
                mq = timed(mq_all, calls, reps, device, graphable=mq_err is None)
                if device.type == "cuda" and mq_err is None:  # one call per graph: includes the graph launch
                    one = capture(mq_one)
                    mq["graph1_ms"] = median_ms(one.replay, reps, device)
                    del one
                if profile_kernels and device.type == "cuda" and fmt == formats[0]:
                    print_kernels(f"{name} T={T} {label}", mq_one)
            mq_ms = mq.get("graph_ms", mq["eager_ms"])
            read_bytes = mean_distinct * stack_bytes / E
            gbps = read_bytes / (mq_ms * 1e-3) / 1e9
            row = dict(
                shape=name, T=T, format=label, env=env, calls_per_graph=calls, chained=chain, separator_us=separator_us,
                mean_distinct_experts=mean_distinct, packed_bytes_read=read_bytes,
                moequant_us=mq_ms * 1e3, moequant_captured="graph_ms" in mq,
                moequant_graph_1call_us=mq["graph1_ms"] * 1e3 if "graph1_ms" in mq else None,
                moequant_eager_us=mq["eager_ms"] * 1e3, moequant_host_sync=mq_err,
                packed_gbps=gbps, pct_of_copy=100 * gbps / copy_rate if copy_rate else None,
                bf16_us=bf16_ms * 1e3, bf16_eager_us=bf16["eager_ms"] * 1e3, bf16_captured=bf16_captured,
                bf16_capture_error=bf16_err,
                bf16_gbps=mean_distinct * bf16_expert_bytes / (bf16_ms * 1e-3) / 1e9,
                ratio_vs_bf16=mq_ms / bf16_ms,
            )
            rows.append(row)
            print(f"{name:14s} T={T:<2d} {row['format']:18s} {'graph' if row['moequant_captured'] else 'EAGER'} "
                  f"{row['moequant_us']:7.1f} us (1-call graph {row['moequant_graph_1call_us'] or float('nan'):6.1f}, "
                  + (f"add {separator_us:4.1f}, " if separator_us is not None else "") +
                  f"eager {row['moequant_eager_us']:6.1f}) {gbps:7.0f} GB/s = "
                  f"{row['pct_of_copy'] or float('nan'):5.1f}% of copy | bf16 "
                  f"{'graph' if bf16_captured else 'eager'} {row['bf16_us']:7.1f} us | ratio {row['ratio_vs_bf16']:.2f}",
                  flush=True)
    # T=8 against T=1 per format (issue 16: no slower than 1.5x), graph times where there are any.
    for label in {r["format"] for r in rows if r["shape"] == name}:
        by_t = {r["T"]: r for r in rows if r["shape"] == name and r["format"] == label}
        if 1 in by_t and 8 in by_t:
            by_t[8]["t8_over_t1"] = by_t[8]["moequant_us"] / by_t[1]["moequant_us"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="qwen3_30b_a3b,olmoe_1b_7b,mixtral_8x7b,deepseek_v3")
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--formats", default="nf4,nf4_dq,fp4,fp4_dq,int8", help="<type>[_dq], comma-separated")
    ap.add_argument("--calls", type=int, default=16, help="experts calls per captured graph")
    ap.add_argument("--lora-rank", type=int, default=16,
                    help="also time the first format with LoRA of this rank on both projections (0: no)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--peft-lora-row", action="store_true",
                    help="also time the LoRA row with the factors as PEFT passes them (float32, B expert-minor)")
    ap.add_argument("--no-pdl-rows", action="store_true",
                    help="also time the first format (and its LoRA row) with MOEQUANT_DECODE_PDL=0")
    ap.add_argument("--env-row", action="append", default=[], metavar="NAME=VALUE",
                    help="also time the first format (and its LoRA rows) with this environment setting; repeatable")
    ap.add_argument("--profile-kernels", action="store_true",
                    help="print the CUDA kernels of one call of the first format (and its LoRA row) per shape and T")
    ap.add_argument("--chain", action="store_true",
                    help="each call's input waits for the previous call's output (one add a call), as in a model")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: eager smoke run, no graphs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    formats = [parse_format(f) for f in args.formats.split(",") if f]
    env_rows = []
    for item in args.env_row:
        env_name, sep, value = item.partition("=")
        if not sep or not env_name:
            ap.error(f"--env-row expects NAME=VALUE, got {item!r}")
        env_rows.append((env_name, value))
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}: expected one of {', '.join(SHAPES)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.calls < 1:
        ap.error("--calls must be >= 1")
    device = torch.device(args.device)
    dev_name = device_name(device)
    out_path = args.out or default_results_path("bench_decode_graph", dev_name)
    copy_rate = copy_gbps(device, args.reps) if device.type == "cuda" else None
    if copy_rate:
        print(f"device copy: {copy_rate:.0f} GB/s (read + write)", flush=True)
    rows = []
    meta = dict(run_metadata(dev_name, ("transformers",)), copy_gbps=copy_rate,
                timing=f"CUDA events, 3 warm-ups, median of {args.reps} replays of a graph of {args.calls} calls"
                + (", each call's input after the previous call's output (--chain)" if args.chain else ""),
                rows=rows)
    for name in shapes:
        bench_shape(name, tokens, formats, args.lora_rank, args.calls, args.reps, device, copy_rate, rows,
                    no_pdl_rows=args.no_pdl_rows, profile_kernels=args.profile_kernels,
                    peft_lora_row=args.peft_lora_row, chain=args.chain, env_rows=env_rows)
        gc.collect()  # the shape's weights and graphs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_results(out_path, meta)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
