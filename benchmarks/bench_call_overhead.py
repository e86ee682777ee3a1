"""The host's cost of one experts call, by how its arguments are passed (CUDA; CPU for a smoke run).

A decode step of an eager model calls the experts op once per layer with one token, and there the
call is bound by the host: issuing it takes longer than its kernels run. ``torch.ops`` matches
keyword arguments by name against the whole 26-argument schema on every call, so the same call
costs more with keywords than with positional arguments. Styles, timed
round-robin in one process on the same stacks and inputs:

  keyword     torch.ops.moequant.experts_forward(x, idx, w, gate_up_packed=..., ...): every option
              by keyword, as the transformers integration called it before experts_op_args
  positional  torch.ops.moequant.experts_forward(*experts_op_args(x, idx, w, ...)): the same
              keywords turned into one positional tuple first (the integration now)
  typed       moequant.experts_forward(x, idx, w, gate_up, down, ...): the typed API (QuantStack)
  module      experts(x, idx, w): transformers' Qwen3MoeExperts holding the same stacks, through
              the "moequant" experts implementation (what an eager model's layer pays; LoRA rows
              set the factors as the PEFT integration does while an adapter is active)

Per row: issue_us, the host time to issue one call within a burst of --calls calls (no sync
inside the burst); wall_us, the burst's wall time per call including the final sync (the eager
decode rate when the host is the bound); each the median over --rounds rounds, with its ratio to
the keyword style of the same format and LoRA setting.

    python benchmarks/bench_call_overhead.py [--shapes qwen3_30b_a3b,olmoe_1b_7b] [--tokens 1]
        [--formats nf4,nf4_dq] [--rounds 15] [--calls 100] [--out FILE]
    python benchmarks/bench_call_overhead.py --device cpu --shapes tiny --calls 20 --rounds 3   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_experts import LORA_ALPHA, RANK, SHAPES, parse_format, routing  # noqa: E402
from results_io import default_results_path, device_name, run_metadata, write_results  # noqa: E402

import moequant  # noqa: E402
from moequant.experts import experts_op_args  # noqa: E402

SIZES = dict(SHAPES, tiny=(256, 128, 8, 2))
STYLES = ("keyword", "positional", "typed", "module")


def build_stacks(H, I, E, quant_type, double_quant, device, gen):
    def stack(rows, cols):
        w = torch.randn(E, rows, cols, device=device, generator=gen, dtype=torch.float32).mul_(0.02)
        return moequant.quantize(w.to(torch.bfloat16), quant_type, 64, double_quant)

    return stack(2 * I, H), stack(H, I)


def experts_module(H, I, E, k, gate_up, down):
    """transformers' Qwen3MoeExperts (built on meta: no dense weights) holding the two stacks."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from moequant.integrations import experts_layout, quantize_parameter
    from moequant.integrations.experts import select_experts_implementation

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module._moequant_layout = experts_layout(module)
    quantize_parameter(module, "gate_up_proj", stack=gate_up)
    quantize_parameter(module, "down_proj", stack=down)
    select_experts_implementation(module)
    return module


def call_fns(x, idx, w, gate_up, down, lora, module):
    """The styles of one call, each a no-argument function returning the output."""
    op = torch.ops.moequant.experts_forward
    kw = dict(
        gate_up_packed=gate_up.packed, gate_up_absmax=gate_up.absmax, down_packed=down.packed,
        down_absmax=down.absmax, blocksize=gate_up.blocksize, activation="silu", transposed=False,
        interleaved=False, act_alpha=1.702, act_limit=7.0, quant_type=gate_up.quant_type,
        gate_up_absmax_scale=gate_up.absmax_scale, gate_up_absmax_offset=gate_up.absmax_offset,
        down_absmax_scale=down.absmax_scale, down_absmax_offset=down.absmax_offset,
    )
    typed_lora = {}
    module._moequant_lora = {}  # what the PEFT integration sets while an adapter is active
    if lora is not None:
        (gu_a, gu_b), (d_a, d_b), scaling = lora
        kw.update(gate_up_lora_A=gu_a, gate_up_lora_B=gu_b, gate_up_lora_scaling=scaling, down_lora_A=d_a,
                  down_lora_B=d_b, down_lora_scaling=scaling)
        typed_lora = dict(gate_up_lora=(gu_a, gu_b, scaling), down_lora=(d_a, d_b, scaling))
        module._moequant_lora = {"gate_up_proj": (gu_a, gu_b, scaling), "down_proj": (d_a, d_b, scaling)}
    return {
        "keyword": lambda: op(x, idx, w, **kw),
        "positional": lambda: op(*experts_op_args(x, idx, w, **kw)),
        "typed": lambda: moequant.experts_forward(x, idx, w, gate_up, down, **typed_lora),
        "module": lambda: module(x, idx, w),
    }


def burst(fn, calls, sync):
    """(issue µs per call, wall µs per call) of `calls` back-to-back calls."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3_30b_a3b,olmoe_1b_7b")
    ap.add_argument("--tokens", default="1")
    ap.add_argument("--formats", default="nf4,nf4_dq")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=100, help="calls per burst")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dev_name = device_name(device)
    out = args.out or default_results_path("bench_call_overhead", dev_name)
    rows = []
    meta = dict(run_metadata(dev_name), calls_per_burst=args.calls, rounds=args.rounds, rows=rows)
    gen = torch.Generator(device=device).manual_seed(0)
    for name in args.shapes.split(","):
        H, I, E, k = SIZES[name]
        lora_factors = (
            (torch.randn(E, RANK, H, device=device, generator=gen).to(torch.bfloat16),
             torch.randn(E, 2 * I, RANK, device=device, generator=gen).to(torch.bfloat16)),
            (torch.randn(E, RANK, I, device=device, generator=gen).to(torch.bfloat16),
             torch.randn(E, H, RANK, device=device, generator=gen).to(torch.bfloat16)),
            LORA_ALPHA / RANK,
        )
        for fmt in args.formats.split(","):
            gate_up, down = build_stacks(H, I, E, *parse_format(fmt), device, gen)
            module = experts_module(H, I, E, k, gate_up, down)
            for T in [int(t) for t in args.tokens.split(",")]:
                idx, w = routing(T, E, k, device, gen)
                x = torch.randn(T, H, device=device, generator=gen).to(torch.bfloat16)
                for lora in (None, lora_factors):
                    fns = call_fns(x, idx, w, gate_up, down, lora, module)
                    issue = {s: [] for s in STYLES}
                    wall = {s: [] for s in STYLES}
                    with torch.no_grad():
                        ref = fns["keyword"]()
                        for s in STYLES:  # same result every way, and warm
                            assert torch.equal(fns[s](), ref), f"{s} call differs from the keyword call"
                            burst(fns[s], args.calls, sync)
                        for r in range(args.rounds):
                            for s in STYLES if r % 2 == 0 else STYLES[::-1]:
                                i_us, w_us = burst(fns[s], args.calls, sync)
                                issue[s].append(i_us)
                                wall[s].append(w_us)
                    base_issue, base_wall = statistics.median(issue["keyword"]), statistics.median(wall["keyword"])
                    for s in STYLES:
                        row = dict(shape=name, T=T, format=fmt, lora=lora is not None, style=s,
                                   issue_us=statistics.median(issue[s]), wall_us=statistics.median(wall[s]))
                        row["issue_ratio_to_keyword"] = row["issue_us"] / base_issue
                        row["wall_ratio_to_keyword"] = row["wall_us"] / base_wall
                        rows.append(row)
                        print(f"{name:14s} T={T:<4d} {fmt:7s} lora={int(row['lora'])} {s:10s} issue "
                              f"{row['issue_us']:7.2f} us ({row['issue_ratio_to_keyword']:.3f}) | wall "
                              f"{row['wall_us']:7.2f} us ({row['wall_ratio_to_keyword']:.3f})", flush=True)
    print(f"wrote {write_results(out, meta)}")


if __name__ == "__main__":
    main()
