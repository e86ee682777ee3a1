"""Greedy generation with a static KV cache and CUDA graphs: a Qwen3-30B-A3B-shaped model cut to
--layers layers (random weights built on the device, nothing downloaded), bf16 against moequant
quantized experts (with and without a LoRA adapter attached, unmerged), batch 1 and 8.

Configurations (--configs):
  bf16           the bf16 model, transformers' `grouped_mm` experts
  moequant       experts quantized in place (moequant.quantize_model_experts, --quant-type /
                 --double-quant), decode through the fused GEMV
  moequant_lora  the same plus a PEFT LoRA adapter (r=16 on the experts' gate_up/down via
                 target_parameters and on q/k/v/o_proj), unmerged, lora_B non-zero; the experts'
                 LoRA runs inside the decode GEMV path (per-pair products), so it captures too

Modes (--modes; each configuration runs in its own process, its modes one after the other):
  graph     prefill eagerly into a transformers StaticCache, then capture ONE decode step
            (forward of the last tokens, greedy argmax, next position) in a torch.cuda.CUDAGraph
            and replay it --new-tokens times; no host work between tokens. Before capturing, the
            step runs once under torch.cuda.set_sync_debug_mode("error"): a step that synchronizes
            with the host cannot be captured, and the row records where it synchronized.
  eager     the same loop without a graph.
  generate  model.generate(cache_implementation="static", ...): transformers compiles the decode
            forward with torch.compile per generation_config.compile_config (its default is
            inductor, mode="reduce-overhead", i.e. CUDA graphs). --generate-backend cudagraphs uses
            torch's "cudagraphs" backend instead (CUDA graphs without inductor codegen: faster to
            compile). Two warm-up generate calls (compile, graph recording), then one timed.

Reported per row: decode tokens/s (batch * new tokens / decode time), prefill ms, the whole
generation's tokens/s, resident model MB (after building/quantizing/attaching), peak MB during the
run, the first generated tokens (graph and eager rows of one configuration should agree).

    python benchmarks/bench_generate.py [--layers 2] [--batches 1,8] [--prompt-len 64] [--new-tokens 128]
        [--configs bf16,moequant,moequant_lora] [--modes graph,eager] [--out results/bench_generate-<device>.json]
    python benchmarks/bench_generate.py --device cpu --size tiny --modes eager --new-tokens 4   # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_experts import first_host_sync  # noqa: E402
from results_io import default_results_path, device_name, run_metadata, write_results  # noqa: E402

# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B), layers cut by --layers.
QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936,
    max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, norm_topk_prob=True,
    tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
)
TINY = dict(QWEN3_30B_A3B, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, vocab_size=512,
            max_position_embeddings=1024)
SIZES = {"qwen3_30b_a3b": QWEN3_30B_A3B, "tiny": TINY}
CONFIGS = ("bf16", "moequant", "moequant_lora")
MODES = ("graph", "eager", "generate")
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def mb(nbytes):
    return nbytes / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(args, device):
    """The model of `args.config` on `device`, in eval mode, with its resident bytes."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**dict(SIZES[args.size], num_hidden_layers=args.layers))
    config._experts_implementation = "grouped_mm"  # the bf16 baseline; capturable (routing by histc)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    if args.config.startswith("moequant"):
        import moequant

        moequant.quantize_model_experts(model, quant_type=args.quant_type, double_quant=args.double_quant)
    if args.config == "moequant_lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=ATTENTION_TARGETS,
                          target_parameters=EXPERT_TARGETS)
        model = get_peft_model(model, lora)
        gen = torch.Generator(device="cpu").manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # PEFT initialises B to zero: make the adapter do real work
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        model.eval()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated(device)
    else:
        resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return model, resident


def text_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def static_cache(model, max_len):
    from transformers import StaticCache

    return StaticCache(config=text_config(model), max_cache_len=max_len)


def next_tokens(model, ids, cache, positions):
    """Greedy next token [B, 1] after ids [B, S] at cache positions [S]."""
    out = model(input_ids=ids, past_key_values=cache, cache_position=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].argmax(-1, keepdim=True)


@torch.no_grad()
def run_loop(model, prompt, args, device, use_graph):
    """Prefill + --new-tokens greedy steps with a static cache; returns the row's measurements."""
    B, P, N = prompt.shape[0], prompt.shape[1], args.new_tokens
    cache = static_cache(model, P + N + 1)
    generated = torch.zeros(B, N, dtype=torch.long, device=device)
    step_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)  # cache position of step_ids
    step = torch.zeros(1, dtype=torch.long, device=device)  # index into generated

    def prefill():
        step_ids.copy_(next_tokens(model, prompt, cache, torch.arange(P, device=device)))
        position.fill_(P)
        step.zero_()

    def decode_step():  # all on the device: nothing for the host to do between tokens
        generated.index_copy_(1, step, step_ids)
        step_ids.copy_(next_tokens(model, step_ids, cache, position))
        position.add_(1)
        step.add_(1)

    row = {}
    graph = None
    if use_graph:
        prefill()
        decode_step()  # first call: lazy cache allocation, kernel/handle set-up
        row["host_sync"] = first_host_sync(decode_step)
        if row["host_sync"] is not None:
            row["error"] = "the decode step synchronizes with the host: cannot be captured"
            return row
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_step()
        run_step = graph.replay
    else:
        run_step = decode_step
        prefill()
        for _ in range(2):  # warm-up
            run_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_ms, decode_s = [], []
    for _ in range(args.reps):
        cache.reset()  # in place: the graph's addresses stay valid
        sync(device)
        t0 = time.perf_counter()
        prefill()
        sync(device)
        t1 = time.perf_counter()
        for _ in range(N):
            run_step()
        sync(device)
        t2 = time.perf_counter()
        prefill_ms.append((t1 - t0) * 1e3)
        decode_s.append(t2 - t1)
    decode = sorted(decode_s)[len(decode_s) // 2]
    prefill_med = sorted(prefill_ms)[len(prefill_ms) // 2]
    row.update(
        decode_tokens_per_s=B * N / decode, decode_ms_per_step=decode / N * 1e3, prefill_ms=prefill_med,
        total_tokens_per_s=B * N / (decode + prefill_med / 1e3),
        first_tokens=generated[0, : min(N, 16)].tolist(),
    )
    del graph
    return row


@torch.no_grad()
def run_generate(model, prompt, args, device):
    from transformers import CompileConfig

    B, N = prompt.shape[0], args.new_tokens
    if args.generate_backend == "inductor":
        compile_config = CompileConfig(dynamic=False)  # transformers' default: inductor, mode="reduce-overhead"
    else:
        compile_config = CompileConfig(backend=args.generate_backend, mode="default", fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = device.type != "cuda"  # CPU smoke runs compile too
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                  cache_implementation="static", compile_config=compile_config, pad_token_id=0)
    t0 = time.perf_counter()
    for _ in range(2):  # compile + graph recording
        model.generate(prompt, **kwargs)
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.reps):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        sync(device)
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    from torch._dynamo.utils import counters

    return dict(total_tokens_per_s=B * N / t, generate_ms=t * 1e3, warmup_compile_s=warmup_s,
                dynamo_graphs=counters["stats"]["unique_graphs"], dynamo_graph_breaks=sum(counters["graph_break"].values()),
                cudagraph_skips=counters["inductor"]["cudagraph_skips"],
                compile_backend=args.generate_backend, first_tokens=out[0, prompt.shape[1]:][:16].tolist())


def worker(args):
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, resident = build_model(args, device)
    build_s = time.perf_counter() - t0
    rows = []
    for mode in args.mode_list:
        for batch in args.batch_list:
            gen = torch.Generator(device="cpu").manual_seed(batch)
            prompt = torch.randint(0, text_config(model).vocab_size, (batch, args.prompt_len), generator=gen)
            prompt = prompt.to(device)
            row = dict(config=args.config, mode=mode, batch=batch, layers=args.layers, size=args.size,
                       prompt_len=args.prompt_len, new_tokens=args.new_tokens, model_resident_mb=mb(resident),
                       build_s=build_s)
            if args.config.startswith("moequant"):
                row["format"] = args.quant_type + ("_dq" if args.double_quant else "")
            try:
                if mode == "generate":
                    row.update(run_generate(model, prompt, args, device))
                else:
                    row.update(run_loop(model, prompt, args, device, use_graph=mode == "graph"))
            except Exception as err:  # recorded, so the other rows still run
                row["error"] = f"{type(err).__name__}: {str(err).strip()[:2000]}"
                traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            if device.type == "cuda":
                row["peak_mb"] = mb(torch.cuda.max_memory_allocated(device))
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(args.worker_out, "w") as f:  # after every row: a timed-out worker keeps what it measured
                json.dump(rows, f)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--size", default="qwen3_30b_a3b", choices=list(SIZES), help="tiny: CPU smoke runs")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="timed generations per row (median)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--modes", default="graph,eager")
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int8"])
    ap.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                    help="4-bit statistics double-quantized (default: on for 4-bit, as the loader)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--generate-backend", default="cudagraphs", choices=["cudagraphs", "inductor", "eager"],
                    help="generate mode's torch.compile backend (eager: dynamo tracing only, no graphs; CPU smoke)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--timeout", type=int, default=600, help="seconds per configuration (one process)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--config", help=argparse.SUPPRESS)  # worker process: one configuration
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.double_quant is None:
        args.double_quant = args.quant_type != "int8"
    if args.quant_type == "int8" and args.double_quant:
        ap.error("--double-quant applies to 4-bit formats only")
    if args.new_tokens < 4:
        ap.error("--new-tokens must be >= 4 (the warm-up steps run inside the static cache's length)")
    args.batch_list = [int(b) for b in args.batches.split(",") if b]
    configs = [c for c in args.configs.split(",") if c]
    modes = args.mode_list = [m for m in args.modes.split(",") if m]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}: expected some of {', '.join(CONFIGS)}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}: expected some of {', '.join(MODES)}")
        if args.device == "cpu" and not (m == "eager" or (m == "generate" and args.generate_backend == "eager")):
            ap.error(f"--device cpu runs --modes eager, or generate with --generate-backend eager (not {m!r})")
    if args.config:
        worker(args)
        return

    device = torch.device(args.device)
    dev_name = device_name(device)
    out_path = args.out or default_results_path("bench_generate", dev_name)
    rows, failures = [], []
    meta = dict(run_metadata(dev_name, ("transformers", "peft")),
                model=dict(SIZES[args.size], num_hidden_layers=args.layers), rows=rows, failures=failures)
    passthrough = ["--layers", str(args.layers), "--size", args.size, "--batches", args.batches,
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--reps", str(args.reps),
                   "--quant-type", args.quant_type, "--double-quant" if args.double_quant else "--no-double-quant",
                   "--rank", str(args.rank), "--generate-backend", args.generate_backend, "--device", args.device]
    for config in configs:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            worker_out = tmp.name
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--modes", args.modes, "--config", config,
               "--worker-out", worker_out]
        print(f"== {config}", flush=True)
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True)
            sys.stdout.write(r.stdout)
            if r.returncode != 0:
                failures.append(dict(config=config, returncode=r.returncode, stderr=r.stderr[-4000:]))
                sys.stdout.write(r.stderr[-4000:])
        except subprocess.TimeoutExpired as err:
            stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
            failures.append(dict(config=config, error=f"timed out after {args.timeout} s", stderr=stderr[-4000:]))
        finally:
            if os.path.exists(worker_out):
                if os.path.getsize(worker_out):
                    with open(worker_out) as f:
                        rows.extend(json.load(f))
                os.unlink(worker_out)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
        summarize(rows, meta)
        write_results(out_path, meta)
    print_table(rows)
    print(f"wrote {out_path}")


def summarize(rows, meta):
    """Ratios to bf16 in the same mode and batch; whether graph and eager tokens agree."""
    by_key = {(r["config"], r["mode"], r["batch"]): r for r in rows}
    for r in rows:
        base = by_key.get(("bf16", r["mode"], r["batch"]))
        rate = "decode_tokens_per_s" if "decode_tokens_per_s" in r else "total_tokens_per_s"
        if base is not None and rate in r and rate in base:
            r["tokens_per_s_vs_bf16"] = r[rate] / base[rate]
            r["resident_vs_bf16"] = r["model_resident_mb"] / base["model_resident_mb"]
        eager = by_key.get((r["config"], "eager", r["batch"]))
        if r["mode"] != "eager" and eager is not None and "first_tokens" in r and "first_tokens" in eager:
            r["tokens_match_eager"] = r["first_tokens"] == eager["first_tokens"]


def print_table(rows):
    print(f"{'config':14s} {'mode':8s} {'B':>2s} {'decode tok/s':>12s} {'vs bf16':>7s} {'total tok/s':>11s} "
          f"{'resident MB':>11s} {'peak MB':>8s}  note")
    for r in rows:
        note = r.get("error") or r.get("host_sync") or ""
        print(f"{r['config']:14s} {r['mode']:8s} {r['batch']:2d} {r.get('decode_tokens_per_s', float('nan')):12.1f} "
              f"{r.get('tokens_per_s_vs_bf16', float('nan')):7.2f} {r.get('total_tokens_per_s', float('nan')):11.1f} "
              f"{r['model_resident_mb']:11.0f} {r.get('peak_mb', float('nan')):8.0f}  {note[:120]}")


if __name__ == "__main__":
    main()
