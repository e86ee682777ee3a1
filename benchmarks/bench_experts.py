"""moequant's CUDA experts ops against transformers' bf16 `grouped_mm` experts and PEFT LoRA
(`target_parameters`, r=16) over them, in the same process, on the reference shapes of
BENCHMARKS.md.

For each shape and token count T: forward with grad enabled (input requires grad), forward under
no_grad (decode/inference), forward+backward, each with and without LoRA r=16 on both
projections; the transient peak (max_memory_allocated minus what was resident before the call);
and ratios moequant / baseline. Timing: CUDA events around each call after warm-up, median.

moequant's stacks are in the format of --quant-type (nf4, fp4, int8) and --double-quant /
--no-double-quant (4-bit statistics; default plain). --also-formats times more formats in the
same run against the same baseline (e.g. nf4_dq,fp4,int8,nf4: "<type>[_dq]"; the primary format
again is a control of the run's noise), each recorded as impl "moequant[<format>]" with its own
ratios.

    python benchmarks/bench_experts.py [--shapes qwen3_30b_a3b,...] [--tokens 1,8,256,4096,16384]
        [--reps 10] [--no-lora] [--compare-rungs] [--compare-tile-plans] [--compare-scratch 2,4]
        [--quant-type nf4] [--double-quant]
        [--also-formats nf4_dq,fp4,int8] [--out benchmarks/results/bench_experts-<device>.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moequant  # noqa: E402
from moequant import ops  # noqa: E402
from moequant.experts import experts_op_args  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import default_results_path, device_name, run_metadata, write_results  # noqa: E402

# name: (hidden H, expert intermediate I, experts E, top-k)
SHAPES = {
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "olmoe_1b_7b": (2048, 1024, 64, 8),
    "mixtral_8x7b": (4096, 14336, 8, 2),
    "deepseek_v3": (7168, 2048, 256, 8),
}
RANK = 16
LORA_ALPHA = 32


def time_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profiled_kernels(step, reps, warmups=2):
    """The CUDA kernels of `reps` calls of step() under torch.profiler, after `warmups` calls:
    (profiler events with device time, ms of kernels per call)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmups):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    return events, sum(e.self_device_time_total for e in events) / 1e3 / reps


def first_host_sync(fn):
    """None if fn() makes no host synchronization, else the error and where it was raised."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as err:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if "site-packages/torch/" not in f.filename]
        where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"
        return f"{str(err).strip().splitlines()[0]} at {where}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def transient_mb(fn):
    """Peak bytes allocated during fn() beyond what was allocated before it, in MB."""
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def routing(T, E, k, device, gen):
    logits = torch.randn(T, E, device=device, generator=gen)
    w, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def build_bf16_experts(H, I, E, k, device):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                            hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    experts = Qwen3MoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H, dtype=torch.bfloat16, device=device)
                                                  * H ** -0.5)
        experts.down_proj = torch.nn.Parameter(torch.randn(E, H, I, dtype=torch.bfloat16, device=device) * I ** -0.5)
    experts.requires_grad_(False)
    return experts


class Holder(torch.nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, idx, w):
        return self.experts(x, idx, w)


def peft_wrap(experts):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = get_peft_model(Holder(experts), cfg)
    for n, p in model.named_parameters():
        if "lora" in n:
            p.data = p.data.to(torch.bfloat16)
            if "lora_B" in n:  # non-zero B so the LoRA path does real work
                torch.nn.init.normal_(p, std=0.01)
    return model


@contextlib.contextmanager
def env_vars(settings):
    """os.environ updated with `settings` ({name: value}) inside the block, restored after it. The
    kernels read their MOEQUANT_* knobs on every call (backward included), e.g.
    MOEQUANT_EXPERTS_FUSED_GEMM="0" (rung (a) only) or "1" (the fused kernel wherever the shapes
    allow), MOEQUANT_EXPERTS_WGMMA="0" (the fused kernel's mma.sync form on Hopper too)."""
    old = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure(fwd, x, grad, reps, **knobs):
    """fwd(x) -> out. Returns fwd (grad enabled), fwd under no_grad, fwd+bwd ms and fwd+bwd transient MB,
    with the MOEQUANT_* `knobs` set for forward and backward alike."""
    def f_grad():
        return fwd(x)

    def f_nograd():
        with torch.no_grad():
            return fwd(x)

    def f_train():
        out = fwd(x)
        out.backward(grad)
        x.grad = None

    with env_vars(knobs):
        return {
            "fwd_ms": time_ms(f_grad, reps),
            "fwd_nograd_ms": time_ms(f_nograd, reps),
            "fwd_bwd_ms": time_ms(f_train, reps),
            "fwd_bwd_transient_mb": transient_mb(f_train),
            "fwd_nograd_transient_mb": transient_mb(f_nograd),
        }


def format_name(quant_type, double_quant):
    return quant_type + ("_dq" if double_quant else "")


def parse_format(spec):
    quant_type, _, dq = spec.partition("_")
    if quant_type not in ("nf4", "fp4", "int8") or dq not in ("", "dq") or (quant_type == "int8" and dq):
        raise ValueError(f"unknown format {spec!r}: expected nf4, nf4_dq, fp4, fp4_dq or int8")
    return quant_type, dq == "dq"


def quantize_experts(experts, quant_type, double_quant, blocksize=64):
    """The op's stack arguments for both projections in one format: positional (packed, absmax)
    pairs and the keyword arguments (quant_type, double-quant statistics)."""
    # Every format passes the statistics keywords (None when plain), as the transformers
    # integration does (QuantStack.op_kwargs): the host cost of the call is then the format's own.
    positional, kwargs = [], {"quant_type": quant_type}
    for name, w in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
        packed, absmax = ops.quantize_nf4(w.detach(), blocksize, quant_type)
        kwargs[f"{name}_absmax_scale"] = kwargs[f"{name}_absmax_offset"] = None
        if double_quant:
            absmax, kwargs[f"{name}_absmax_scale"], kwargs[f"{name}_absmax_offset"] = ops.compress_statistics(absmax)
        positional += [packed, absmax]
    stack_bytes = sum(t.numel() * t.element_size() for t in positional) + sum(
        v.numel() * v.element_size() for v in kwargs.values() if torch.is_tensor(v))
    return positional, kwargs, stack_bytes


LORA_STORAGES = ("bf16", "fp32", "peft")


def lora_factors(H, I, E, rank, device, storage="bf16"):
    """Inference LoRA kwargs on both projections (B non-zero), the same values in every storage:
    contiguous bfloat16 or float32 [E, r, in] / [E, out, r], or "peft": float32 as PEFT stores the
    factors and passes them at inference (B a view of lora_B.weight [out, r*E]: expert-minor)."""
    gen = torch.Generator().manual_seed(1)
    kw = dict(gate_up_lora_A=torch.randn(E, rank, H, generator=gen) * H**-0.5,
              gate_up_lora_B=torch.randn(E, 2 * I, rank, generator=gen) * 0.01,
              down_lora_A=torch.randn(E, rank, I, generator=gen) * I**-0.5,
              down_lora_B=torch.randn(E, H, rank, generator=gen) * 0.01)
    for name, f in kw.items():
        f = f.to(device, torch.bfloat16)
        if storage == "peft" and name.endswith("_B"):
            f = f.float().permute(1, 2, 0).contiguous().permute(2, 0, 1)
        kw[name] = f if storage == "bf16" else f.float()
    return dict(kw, gate_up_lora_scaling=2.0, down_lora_scaling=2.0)


def lora_kwargs(H, I, E, device):
    """The op's LoRA keyword arguments, r=RANK on both projections, factors requiring grad, B non-zero."""
    lora = {
        "gate_up_lora_A": torch.randn(E, RANK, H, device=device, dtype=torch.bfloat16) * H ** -0.5,
        "gate_up_lora_B": torch.randn(E, 2 * I, RANK, device=device, dtype=torch.bfloat16) * 0.01,
        "gate_up_lora_scaling": LORA_ALPHA / RANK,
        "down_lora_A": torch.randn(E, RANK, I, device=device, dtype=torch.bfloat16) * I ** -0.5,
        "down_lora_B": torch.randn(E, H, RANK, device=device, dtype=torch.bfloat16) * 0.01,
        "down_lora_scaling": LORA_ALPHA / RANK,
    }
    for v in lora.values():
        if torch.is_tensor(v):
            v.requires_grad_(True)
    return lora


def default_scratch_bytes(H, I, E):
    """The experts ops' default dequant scratch budget for a bf16 layer (experts_scratch_budget in
    csrc/cuda/experts_stack_gemm.cu): 5% of the layer, at least min(layer, 8 MiB). Set through
    MOEQUANT_EXPERTS_SCRATCH_BYTES, a budget is fixed: the products do not grow it to fill the GPU."""
    layer = 2 * (E * 2 * I * H + E * H * I)
    return max(layer // 20, min(layer, 8 << 20))


def bench_shape(name, tokens, reps, rows, device, with_lora=True, compare_rungs=False, formats=(("nf4", False),),
                compare_tile_plans=False, scratch_multiples=()):
    H, I, E, k = SHAPES[name]
    gen = torch.Generator(device=device).manual_seed(0)
    hopper = torch.cuda.get_device_capability(device) == (9, 0)
    experts = build_bf16_experts(H, I, E, k, device)
    layer_mb = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * 2 / 1e6
    stacks = {fmt: quantize_experts(experts, *fmt) for fmt in formats}
    primary = formats[0]
    lora = lora_kwargs(H, I, E, device)
    peft_model = None
    for T in tokens:
        idx, w = routing(T, E, k, device, gen)
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
        grad = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen)

        def mq(kw, fmt=primary):
            positional, format_kw, _ = stacks[fmt]
            return lambda xx: ops.experts_forward(*experts_op_args(xx, idx, w, *positional, **format_kw, **kw))

        results = {}
        try:
            results["moequant"] = measure(mq({}), x, grad, reps)
            results["bf16_grouped_mm"] = measure(lambda xx: experts(xx, idx, w), x, grad, reps)
            for fmt in formats[1:]:
                results[f"moequant[{format_name(*fmt)}]"] = measure(mq({}, fmt), x, grad, reps)
                if with_lora:
                    results[f"moequant_lora[{format_name(*fmt)}]"] = measure(mq(lora, fmt), x, grad, reps)
            if compare_rungs:
                results["moequant_rung_a"] = measure(mq({}), x, grad, reps, MOEQUANT_EXPERTS_FUSED_GEMM="0")
                results["moequant_rung_b"] = measure(mq({}), x, grad, reps, MOEQUANT_EXPERTS_FUSED_GEMM="1")
                if hopper:  # rung (b) with its [N, K] products on mma.sync instead of wgmma
                    results["moequant_rung_b_mma"] = measure(mq({}), x, grad, reps, MOEQUANT_EXPERTS_FUSED_GEMM="1",
                                                             MOEQUANT_EXPERTS_WGMMA="0")
            if compare_tile_plans:  # the fused GEMM's previous row-tile rule, same stacks and inputs
                results["moequant_plan_mean"] = measure(mq({}), x, grad, reps, MOEQUANT_TILE_PLAN="mean")
            for m in scratch_multiples:  # a fixed scratch budget, m times the default (x1: no growth)
                budget = dict(MOEQUANT_EXPERTS_SCRATCH_BYTES=str(int(m * default_scratch_bytes(H, I, E))))
                results[f"moequant_scratch_x{m:g}"] = measure(mq({}), x, grad, reps, **budget)
                if with_lora:
                    results[f"moequant_lora_scratch_x{m:g}"] = measure(mq(lora), x, grad, reps, **budget)
            if with_lora:
                results["moequant_lora"] = measure(mq(lora), x, grad, reps)
                if compare_tile_plans:
                    results["moequant_lora_plan_mean"] = measure(mq(lora), x, grad, reps, MOEQUANT_TILE_PLAN="mean")
                if peft_model is None:
                    peft_model = peft_wrap(experts)
                results["peft_lora_bf16"] = measure(lambda xx: peft_model(xx, idx, w), x, grad, reps)
        except torch.OutOfMemoryError as err:
            print(f"{name} T={T}: out of memory ({err}); skipped", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        for impl, r in results.items():
            fmt = primary
            if impl.endswith("]"):
                fmt = parse_format(impl[impl.index("[") + 1 : -1])
            extra = {}
            if impl.startswith("moequant"):
                extra = dict(quant_type=fmt[0], double_quant=fmt[1],
                             stack_bytes_per_weight=stacks[fmt][2] / (layer_mb * 1e6 / 2))
            rows.append(dict(shape=name, T=T, H=H, I=I, E=E, k=k, impl=impl, layer_bf16_mb=layer_mb, **extra, **r))
        base, m = results["bf16_grouped_mm"], results["moequant"]
        for fmt in formats[1:]:
            fname = format_name(*fmt)
            mf = results[f"moequant[{fname}]"]
            fr = dict(shape=name, T=T, impl=f"ratios[{fname}]", quant_type=fmt[0], double_quant=fmt[1],
                      fwd_vs_bf16=mf["fwd_ms"] / base["fwd_ms"],
                      fwd_nograd_vs_bf16=mf["fwd_nograd_ms"] / base["fwd_nograd_ms"],
                      fwd_bwd_vs_bf16=mf["fwd_bwd_ms"] / base["fwd_bwd_ms"],
                      fwd_vs_primary=mf["fwd_ms"] / m["fwd_ms"],
                      fwd_nograd_vs_primary=mf["fwd_nograd_ms"] / m["fwd_nograd_ms"],
                      fwd_bwd_vs_primary=mf["fwd_bwd_ms"] / m["fwd_bwd_ms"])
            if with_lora:
                ml_f = results[f"moequant_lora[{fname}]"]
                fr["lora_fwd_bwd_vs_bf16"] = ml_f["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                fr["lora_fwd_bwd_vs_primary"] = ml_f["fwd_bwd_ms"] / results["moequant_lora"]["fwd_bwd_ms"]
            rows.append(fr)
            print(f"{name:14s} T={T:6d} [{fname:7s}] fwd {fr['fwd_vs_bf16']:.2f}x nograd {fr['fwd_nograd_vs_bf16']:.2f}x"
                  f" f+b {fr['fwd_bwd_vs_bf16']:.2f}x" + (f" LoRA f+b {fr['lora_fwd_bwd_vs_bf16']:.2f}x" if with_lora else "")
                  + f" | vs {format_name(*primary)}: fwd {fr['fwd_vs_primary']:.3f} nograd {fr['fwd_nograd_vs_primary']:.3f}"
                  f" f+b {fr['fwd_bwd_vs_primary']:.3f}"
                  + (f" LoRA f+b {fr['lora_fwd_bwd_vs_primary']:.3f}" if with_lora else ""), flush=True)
        ratio = dict(shape=name, T=T, impl="ratios", quant_type=primary[0], double_quant=primary[1],
                     fwd_vs_bf16=m["fwd_ms"] / base["fwd_ms"],
                     fwd_nograd_vs_bf16=m["fwd_nograd_ms"] / base["fwd_nograd_ms"],
                     fwd_bwd_vs_bf16=m["fwd_bwd_ms"] / base["fwd_bwd_ms"])
        line = (f"{name:14s} T={T:6d} | fwd {m['fwd_ms']:8.3f} vs {base['fwd_ms']:8.3f} ({ratio['fwd_vs_bf16']:.2f}x)"
                f" | nograd {m['fwd_nograd_ms']:8.3f} vs {base['fwd_nograd_ms']:8.3f}"
                f" ({ratio['fwd_nograd_vs_bf16']:.2f}x)"
                f" | f+b {m['fwd_bwd_ms']:8.3f} vs {base['fwd_bwd_ms']:8.3f} ({ratio['fwd_bwd_vs_bf16']:.2f}x)")
        if compare_rungs:
            rungs = [("a", "moequant_rung_a"), ("b", "moequant_rung_b"), ("b_mma", "moequant_rung_b_mma")]
            rungs = [(rung, results[key]) for rung, key in rungs if key in results]
            for rung, rr in rungs:
                for phase in ("fwd", "fwd_nograd", "fwd_bwd"):
                    ratio[f"rung_{rung}_{phase}_vs_bf16"] = rr[f"{phase}_ms"] / base[f"{phase}_ms"]
            names = "/".join(rung for rung, _ in rungs)
            for phase, label in (("fwd_nograd", "nograd"), ("fwd", "fwd"), ("fwd_bwd", "f+b")):
                line += f" | rung {names} {label} " + "/".join(
                    f"{ratio[f'rung_{rung}_{phase}_vs_bf16']:.2f}" for rung, _ in rungs) + "x"
        if compare_tile_plans:
            pm = results["moequant_plan_mean"]
            for phase in ("fwd", "fwd_nograd", "fwd_bwd"):
                ratio[f"plan_mean_{phase}_vs_bf16"] = pm[f"{phase}_ms"] / base[f"{phase}_ms"]
            line += (f" | mean-height plan fwd {ratio['plan_mean_fwd_vs_bf16']:.2f}x"
                     f" f+b {ratio['plan_mean_fwd_bwd_vs_bf16']:.2f}x")
            if with_lora:
                ratio["lora_plan_mean_fwd_bwd_vs_bf16"] = (results["moequant_lora_plan_mean"]["fwd_bwd_ms"]
                                                           / base["fwd_bwd_ms"])
                line += f" LoRA f+b {ratio['lora_plan_mean_fwd_bwd_vs_bf16']:.2f}x"
        for m in scratch_multiples:
            sm = results[f"moequant_scratch_x{m:g}"]
            ratio[f"scratch_x{m:g}_fwd_vs_bf16"] = sm["fwd_ms"] / base["fwd_ms"]
            ratio[f"scratch_x{m:g}_fwd_bwd_vs_bf16"] = sm["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            line += f" | scratch x{m:g} fwd {ratio[f'scratch_x{m:g}_fwd_vs_bf16']:.2f}x f+b {ratio[f'scratch_x{m:g}_fwd_bwd_vs_bf16']:.2f}x"
            if with_lora:
                lm = results[f"moequant_lora_scratch_x{m:g}"]
                ratio[f"scratch_x{m:g}_lora_fwd_bwd_vs_bf16"] = lm["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                line += (f" LoRA f+b {ratio[f'scratch_x{m:g}_lora_fwd_bwd_vs_bf16']:.2f}x"
                         f" (transient {lm['fwd_bwd_transient_mb']:.0f} MB)")
        if with_lora:
            ml, peft = results["moequant_lora"], results["peft_lora_bf16"]
            ratio.update(lora_fwd_bwd_vs_bf16=ml["fwd_bwd_ms"] / base["fwd_bwd_ms"],
                         lora_fwd_bwd_vs_peft=ml["fwd_bwd_ms"] / peft["fwd_bwd_ms"],
                         lora_transient_vs_layer=ml["fwd_bwd_transient_mb"] / layer_mb,
                         # What LoRA on packed weights holds beyond bf16 grouped_mm's own
                         # activations (negative: less than bf16 without LoRA).
                         lora_transient_over_bf16_vs_layer=(ml["fwd_bwd_transient_mb"]
                                                            - base["fwd_bwd_transient_mb"]) / layer_mb)
            line += (f" | LoRA f+b {ml['fwd_bwd_ms']:8.3f} vs peft {peft['fwd_bwd_ms']:8.3f}"
                     f" ({ratio['lora_fwd_bwd_vs_bf16']:.2f}x bf16)"
                     f" | LoRA transient {ml['fwd_bwd_transient_mb']:7.0f} MB vs peft"
                     f" {peft['fwd_bwd_transient_mb']:7.0f} MB, bf16 {base['fwd_bwd_transient_mb']:7.0f} MB"
                     f" (layer {layer_mb:.0f} MB)")
        rows.append(ratio)
        print(line, flush=True)
        del x, grad, idx, w
    del experts, peft_model, stacks, lora
    gc.collect()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,8,256,4096,16384")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-lora", action="store_true", help="skip moequant LoRA and the PEFT baseline")
    ap.add_argument("--compare-rungs", action="store_true",
                    help="also time rung (a) (dequant scratch + grouped_mm) and rung (b) (fused NF4 GEMM) forced, and on "
                         "Hopper rung (b) with mma.sync in place of wgmma")
    ap.add_argument("--compare-tile-plans", action="store_true",
                    help="also time the fused GEMM with its previous row-tile rule (MOEQUANT_TILE_PLAN=mean)")
    ap.add_argument("--compare-scratch", default="",
                    help="also time the ops with a fixed dequant scratch budget, these multiples of its default, "
                         "e.g. 1,4 (MOEQUANT_EXPERTS_SCRATCH_BYTES; x1 is the budget before chunks grew to fill the GPU)")
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int8"], help="moequant's stack format")
    ap.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=False,
                    help="4-bit: double-quantized statistics (default: plain fp32 absmax)")
    ap.add_argument("--also-formats", default="",
                    help="more formats timed in the same run, e.g. nf4_dq,fp4,int8 (<type>[_dq])")
    args = ap.parse_args()
    if args.quant_type == "int8" and args.double_quant:
        ap.error("--double-quant applies to 4-bit formats only (int8 has one absmax per row)")
    formats = [(args.quant_type, args.double_quant)]
    for spec in filter(None, args.also_formats.split(",")):
        fmt = parse_format(spec)
        if fmt not in formats[1:]:  # the primary format again: a same-run control of the noise
            formats.append(fmt)
    device = torch.device("cuda")
    dev_name = device_name(device)
    out_path = args.out or default_results_path("bench_experts", dev_name)
    rows = []
    meta = dict(run_metadata(dev_name, ("transformers", "peft")), rank=RANK, timing="CUDA events, 3 warm-ups, median of --reps",
                quant_type=args.quant_type, double_quant=args.double_quant,
                formats=[format_name(*f) for f in formats], rows=rows)
    for name in args.shapes.split(","):
        bench_shape(name, [int(t) for t in args.tokens.split(",")], args.reps, rows, device, not args.no_lora,
                    args.compare_rungs, tuple(formats), args.compare_tile_plans,
                    tuple(float(m) for m in filter(None, args.compare_scratch.split(","))))
        write_results(out_path, meta)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
