"""FSDP2 QLoRA on N GPUs vs one: per-GPU memory, step time and loss of a Qwen3-30B-A3B-shaped model.

The model has Qwen3-30B-A3B's shapes (H=2048, 128 experts of I=768, top-8, 32 heads, 4 KV heads,
vocabulary 151936) truncated to --layers layers, random bf16 weights built on each rank from the
same seed (identical on every rank, as a checkpoint would be), experts quantized by
``moequant.quantize_model_experts``. PEFT LoRA r=16 on both expert projections
(``target_parameters``) and the attention projections, AdamW, --global-batch sequences of --seq
tokens per step split evenly over the ranks. With more than one rank the model is sharded by
``moequant.integrations.fsdp.shard_model``; one rank runs it unsharded (the baseline).

Per rank: resident bytes after sharding (all and the experts' stack shards alone), each step's
peak ``max_memory_allocated`` (the first step's against the steady ones: no first-step spike),
and step times; the global loss of every step. Run it once on one GPU, then on N with
``--baseline`` pointing at the first JSON: the N-GPU JSON gets the ratios (resident experts vs
1/N of one GPU's, scaling efficiency = t_1 / (N t_N) at the same global batch, max loss difference).

    export NCCL_NVLS_ENABLE=0
    torchrun --standalone --nproc-per-node 1 benchmarks/bench_fsdp.py --out one.json
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_fsdp.py --baseline one.json --out two.json

``--rank0-load``: rank 0 alone builds (and quantizes) the model, the other ranks build it on meta
and receive their shards (``shard_model_from_rank0``); ``setup_peak_bytes`` shows what each rank held
while loading. ``--device cpu --smoke`` runs the same pipeline at toy size with gloo (numbers
meaningless).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The model shape and the CPU smoke shape are bench_load_train's (same Qwen3-30B-A3B config).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_load_train import QWEN3_30B_A3B, SMOKE  # noqa: E402
from results_io import device_name, run_metadata, write_results  # noqa: E402

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, over all ranks")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6, help="measured steps (the first is reported apart)")
    p.add_argument("--rank-lora", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--plain-absmax", action="store_true", help="float32 absmax (no double-quantized statistics)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-reshard-after-forward", action="store_true")
    p.add_argument("--rank0-load", action="store_true",
                   help="rank 0 alone builds the model; the others build it on meta and get their shards")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="toy shapes (for a CPU check of the script)")
    p.add_argument("--baseline", help="JSON of the one-rank run, to compare against")
    p.add_argument("--out", help="JSON to write (rank 0)")
    return p.parse_args(argv)


def build_model(args, device: torch.device, on_meta: bool = False):
    """The quantized model on ``device``; ``on_meta``: its empty twin (meta parameters, experts
    quantized on meta, real buffers), what ranks other than 0 build for --rank0-load."""
    import transformers
    from accelerate import init_empty_weights

    import moequant

    config = transformers.Qwen3MoeConfig(**(SMOKE if args.smoke else QWEN3_30B_A3B), num_hidden_layers=args.layers)
    torch.manual_seed(0)
    # identical weights on every rank (same seed, same device type)
    with init_empty_weights(include_buffers=False) if on_meta else device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    formats = {} if not args.plain_absmax else {"double_quant": False}
    moequant.quantize_model_experts(model, blocksize=args.blocksize, **formats)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model.train()


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=args.rank_lora, lora_alpha=2 * args.rank_lora, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=EXPERT_TARGETS)
    return get_peft_model(model, config)


def stack_bytes(model) -> tuple[int, int]:
    """(bytes of the quantized stacks this rank holds, bytes of the whole stacks)."""
    from torch.distributed.tensor import DTensor

    from moequant.integrations.fsdp import stack_tensors
    from moequant.integrations.transformers import quantized_stacks

    local = full = 0
    for _, module, pname in quantized_stacks(model):
        for tensor in stack_tensors(module, pname).values():
            shard = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            local += shard.numel() * shard.element_size()
            full += tensor.numel() * tensor.element_size()
    return local, full


def batch(args, step: int, rank: int, world: int, vocab: int, device) -> torch.Tensor:
    """This rank's rows of step ``step``'s global batch (the same global batch whatever ``world``)."""
    ids = torch.randint(0, vocab, (args.global_batch, args.seq), generator=torch.Generator().manual_seed(100 + step))
    rows = args.global_batch // world
    return ids[rank * rows:(rank + 1) * rows].to(device)


class Memory:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def allocated(self, model) -> int:
        """CUDA: allocated bytes; CPU: bytes of this rank's parameters and buffers (local shards)."""
        if self.cuda:
            return torch.cuda.memory_allocated()
        from torch.distributed.tensor import DTensor

        tensors = [t.to_local() if isinstance(t, DTensor) else t for t in [*model.parameters(), *model.buffers()]]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def run(args) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise ValueError(f"--global-batch {args.global_batch} must be a multiple of the world size {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    memory = Memory(device)

    start = time.perf_counter()
    memory.reset_peak()
    shard_kwargs = dict(reshard_after_forward=not args.no_reshard_after_forward)
    if world > 1 and args.rank0_load:
        from moequant.integrations.fsdp import shard_model_from_rank0

        rank0_state = add_lora(build_model(args, device), args).state_dict() if rank == 0 else None
        model = add_lora(build_model(args, device, on_meta=True), args)
        shard_model_from_rank0(model, rank0_state, **shard_kwargs)
        del rank0_state
    else:
        model = add_lora(build_model(args, device), args)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if world > 1:
            from moequant.integrations.fsdp import shard_model

            shard_model(model, **shard_kwargs)
    setup_s = time.perf_counter() - start
    setup_peak = memory.peak()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    resident = memory.allocated(model)
    experts_local, experts_full = stack_bytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    vocab = model.config.vocab_size

    losses, times, peaks = [], [], []
    for step in range(args.steps):
        ids = batch(args, step, rank, world, vocab, device)
        memory.reset_peak()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory.sync()
        times.append(time.perf_counter() - t0)
        peaks.append(memory.peak())
        global_loss = loss.detach().float().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)

    per_rank = {
        "resident_bytes": resident, "experts_local_bytes": experts_local, "step_peak_bytes": peaks,
        "step_s": times, "setup_s": setup_s, "setup_peak_bytes": setup_peak,
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, per_rank)
    steady = slice(1, None) if args.steps > 1 else slice(0, None)
    steady_steps = range(args.steps)[steady]
    result = {
        **run_metadata(device_name(device)), "world_size": world, "args": vars(args),
        "losses": losses, "experts_full_bytes": experts_full, "per_rank": gathered,
        # a step lasts as long as its slowest rank
        "step_s_mean": sum(max(r["step_s"][i] for r in gathered) for i in steady_steps) / len(steady_steps),
        "resident_bytes_max": max(r["resident_bytes"] for r in gathered),
        "experts_local_bytes_max": max(r["experts_local_bytes"] for r in gathered),
        "first_step_peak_bytes_max": max(r["step_peak_bytes"][0] for r in gathered),
        "steady_step_peak_bytes_max": max(max(r["step_peak_bytes"][steady]) for r in gathered),
    }
    if args.baseline:
        with open(args.baseline) as f:
            base = json.load(f)
        if base["world_size"] != 1 or len(base["losses"]) != len(losses):
            raise ValueError(f"--baseline {args.baseline}: expected a one-rank run of {len(losses)} steps")
        result["vs_one_rank"] = {
            "experts_resident_fraction": result["experts_local_bytes_max"] / base["experts_local_bytes_max"],
            "experts_resident_target": 1 / world + 0.05,
            "resident_fraction": result["resident_bytes_max"] / max(base["resident_bytes_max"], 1),
            "steady_peak_fraction": result["steady_step_peak_bytes_max"] / max(base["steady_step_peak_bytes_max"], 1),
            "first_step_spike": result["first_step_peak_bytes_max"] / max(result["steady_step_peak_bytes_max"], 1),
            "scaling_efficiency": base["step_s_mean"] / (world * result["step_s_mean"]),
            "speedup": base["step_s_mean"] / result["step_s_mean"],
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses, base["losses"])),
        }
    return result


def main(argv=None):
    args = parse_args(argv)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if "RANK" not in os.environ:  # plain `python bench_fsdp.py`: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    try:
        result = run(args)
        if dist.get_rank() == 0:
            text = json.dumps(result, indent=1)
            summary = {k: v for k, v in result.items() if k != "per_rank"}
            print(text if len(text) < 4000 else json.dumps(summary, indent=1))
            if args.out:
                write_results(args.out, result)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
