"""Bandwidth of moequant's CUDA quantize_nf4 / dequant_expert on the reference expert stacks
(benchmarks/../BENCHMARKS.md), for one format (--quant-type nf4|fp4|int8, --double-quant for
4-bit statistics), against a device-to-device copy of the same weight and, when it is importable,
bitsandbytes' quantize_4bit / dequantize_4bit (4-bit formats), all in the same run.

GB/s counts bytes read + written: quantize reads the weight and writes the codes + statistics
(with --double-quant, quantize is quantize_nf4 + compress_statistics, and reads/writes the fp32
absmax once more); dequant reads codes + statistics and writes the weight; the copy reads and
writes the weight. Also
reported: a write-only fill of the weight (fill_gbps) and, for dequant, torch's uint8 -> fp32
cast (cast_u8_f32_gbps), a trivial kernel with dequant's 1:4 read:write mix.
Timing: CUDA events around each call, warm-up, median of the repeats; inputs are rotated among
several copies when one would fit in L2.

    python benchmarks/bench_nf4.py [--shapes qwen3_30b_a3b,olmoe_1b_7b] [--blocksize 64] [--reps 20]
        [--quant-type nf4|fp4|int8] [--double-quant]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import default_results_path, run_metadata, write_results  # noqa: E402
from moequant import ops  # noqa: E402

try:
    import bitsandbytes
    import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001 - any import failure means "no baseline"
    bitsandbytes = None

# name: (hidden H, expert intermediate I, experts E)
SHAPES = {
    "qwen3_30b_a3b": (2048, 768, 128),
    "olmoe_1b_7b": (2048, 1024, 64),
    "mixtral_8x7b": (4096, 14336, 8),
    "deepseek_v3": (7168, 2048, 256),
}
BNB_MAX_NUMEL = 2**31 - 1  # bitsandbytes indexes with int32


def time_ms(fn, inputs, reps, warmup=3):
    """Median ms of fn(inputs[i % len(inputs)]) over reps calls, each bracketed by CUDA events."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copies_for(nbytes, l2_bytes):
    """How many input sets to rotate so that consecutive calls never hit in L2."""
    return 1 if nbytes >= 4 * l2_bytes else max(2, -(-4 * l2_bytes // max(nbytes, 1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int8"])
    ap.add_argument("--double-quant", action="store_true", help="4-bit: double-quantized statistics")
    ap.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes baseline")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_nf4-<device>.json)")
    args = ap.parse_args()

    assert torch.cuda.is_available(), "bench_nf4 needs a CUDA device"
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    qt, dq = args.quant_type, args.double_quant
    if qt == "int8" and dq:
        ap.error("--double-quant applies to 4-bit formats only")
    use_bnb = bitsandbytes is not None and not args.no_bnb and qt != "int8"
    bs = args.blocksize
    dtype = torch.bfloat16
    rows = []

    def add(row):
        rows.append(row)
        cast = f" cast {100 * row['frac_of_cast']:5.1f}%" if "frac_of_cast" in row else " " * 12
        bnb = (
            f"{row['bnb_gbps']:8.0f} GB/s  ours/bnb {row['speedup_vs_bnb']:5.2f}x"
            if row.get("bnb_gbps") else "     n/a"
        )
        print(f"{row['shape']:>14} {row['proj']:>7} {row['op']:>8} {row['ms']:8.3f} ms {row['gbps']:8.0f} GB/s "
              f"{100 * row['frac_of_copy']:5.1f}% of copy ({row['copy_gbps']:.0f}; fill {row['fill_gbps']:.0f}){cast}  bnb {bnb}", flush=True)

    print(f"device {props.name}, torch {torch.__version__}, bitsandbytes "
          f"{bitsandbytes.__version__ if use_bnb else 'n/a'}, {qt}{' double quant' if dq else ''}, blocksize {bs}, bf16")

    def stored_bytes(E, N, K):
        """Bytes of the quantized stack: codes + statistics."""
        if qt == "int8":
            return E * N * K + E * N * 4
        nb = N * K // bs
        if dq:
            return E * N * K // 2 + E * nb + E * (-(-nb // 256)) * 4 + E * 4
        return E * N * K // 2 + E * nb * 4

    def quantize(w):
        packed, absmax = ops.quantize_nf4(w, bs, qt)
        if dq:
            return (packed, *ops.compress_statistics(absmax))
        return packed, absmax, None, None

    def dequant(q):
        return ops.dequant_expert(q[0], q[1], bs, dtype, None, qt, q[2], q[3])
    for name in args.shapes.split(","):
        H, I, E = SHAPES[name]
        for proj, shape in (("gate_up", (E, 2 * I, H)), ("down", (E, H, I))):
            numel = E * shape[1] * shape[2]
            w_bytes = numel * 2
            packed_bytes = stored_bytes(E, shape[1], shape[2])
            # compress_statistics reads the fp32 absmax and the quantize wrote it: extra traffic
            # that the double-quantized quantize pays.
            dq_extra = 2 * 4 * (numel // bs) if dq else 0
            n = copies_for(w_bytes, l2)
            ws = [torch.randn(shape, device=dev, dtype=dtype) for _ in range(n)]
            # Reference: device-to-device copy of the weight (read + write).
            dst = torch.empty_like(ws[0])
            copy_ms = time_ms(lambda w: dst.copy_(w), ws, args.reps)
            copy_gbps = 2 * w_bytes / copy_ms / 1e6
            # Write-only reference: dequant is 78% writes, and HBM writes run slower than reads.
            fill_gbps = w_bytes / time_ms(lambda w: dst.fill_(1.0), ws, args.reps) / 1e6
            del dst
            # Read:write mix reference for dequant (1:4, like 0.56 B read per 2 B written): torch's
            # uint8 -> fp32 cast writing as many bytes as the weight has.
            src8 = torch.randint(0, 256, (w_bytes // 4,), device=dev, dtype=torch.uint8)
            dst32 = torch.empty(w_bytes // 4, device=dev, dtype=torch.float32)
            cast_gbps = 5 * (w_bytes // 4) / time_ms(lambda _: dst32.copy_(src8), [None], args.reps) / 1e6
            del src8, dst32

            q_ms = time_ms(quantize, ws, args.reps)
            qs = [quantize(w) for w in ws]
            d_ms = time_ms(dequant, qs, args.reps)
            base = dict(shape=name, proj=proj, dims=list(shape), numel=numel, blocksize=bs, dtype="bfloat16",
                        quant_type=qt, double_quant=dq, bytes_per_weight=packed_bytes / numel,
                        copy_ms=copy_ms, copy_gbps=copy_gbps, fill_gbps=fill_gbps)
            qrow = dict(base, op="quantize", ms=q_ms, bytes=w_bytes + packed_bytes + dq_extra)
            drow = dict(base, op="dequant", ms=d_ms, bytes=w_bytes + packed_bytes)
            for row in (qrow, drow):
                row["gbps"] = row["bytes"] / row["ms"] / 1e6
                row["frac_of_copy"] = row["gbps"] / copy_gbps
            drow["cast_u8_f32_gbps"] = cast_gbps
            drow["frac_of_cast"] = drow["gbps"] / cast_gbps
            del qs

            if use_bnb and numel <= BNB_MAX_NUMEL:
                flat = [w.view(-1) for w in ws]
                qrow["bnb_ms"] = time_ms(
                    lambda w: bnbF.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=dq),
                    flat, args.reps)
                bq = [bnbF.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=dq) for w in flat]
                drow["bnb_ms"] = time_ms(lambda q: bnbF.dequantize_4bit(q[0], q[1]), bq, args.reps)
                del bq
                for row in (qrow, drow):
                    row["bnb_gbps"] = row["bytes"] / row["bnb_ms"] / 1e6
                    row["speedup_vs_bnb"] = row["bnb_ms"] / row["ms"]
            add(qrow)
            add(drow)
            del ws
            torch.cuda.empty_cache()

    def summary(op):
        r = [x for x in rows if x["op"] == op]
        s = {"min_frac_of_copy": min(x["frac_of_copy"] for x in r),
             "median_frac_of_copy": statistics.median(x["frac_of_copy"] for x in r)}
        if op == "dequant":
            s["median_frac_of_cast"] = statistics.median(x["frac_of_cast"] for x in r)
        vs = [x["speedup_vs_bnb"] for x in r if "speedup_vs_bnb" in x]
        if vs:
            s["min_speedup_vs_bnb"] = min(vs)
        return s

    result = {
        "benchmark": "bench_nf4",
        **run_metadata(props.name, ("bitsandbytes",) if use_bnb else ()),
        "quant_type": qt,
        "double_quant": dq,
        "timing": f"CUDA events, 3 warm-ups, median of {args.reps}",
        "targets": {"dequant_frac_of_copy": 0.90, "quantize_frac_of_copy": 0.75, "vs_bnb": 1.0},
        "summary": {"quantize": summary("quantize"), "dequant": summary("dequant")},
        "rows": rows,
    }
    out = args.out or default_results_path(
        "bench_nf4" + ("" if qt == "nf4" and not dq else f"-{qt}{'_dq' if dq else ''}"), props.name)
    write_results(out, result)
    print(json.dumps(result["summary"]))
    print("wrote", out)


if __name__ == "__main__":
    main()
