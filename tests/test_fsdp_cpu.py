"""FSDP2 on the CPU (gloo, two processes): a quantize-on-load tiny Qwen3-MoE with LoRA on experts and
attention, sharded by moequant.integrations.fsdp.shard_model, trains to the losses and adapter of one
process on the same global batch; its shards hold packed bytes only; so does a model that only rank 0
loaded (shard_model_from_rank0); adapter and quantized cache save from the sharded model; bad meshes
are refused."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch

from _integration_models import NoDequantize, save_tiny_checkpoint, tiny_config

pytest.importorskip("transformers")
pytest.importorskip("peft")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import moequant  # noqa: E402
from moequant.integrations import quantize_model_experts  # noqa: E402
from moequant.integrations.fsdp import (  # noqa: E402
    full_state_dict,
    save_adapter,
    shard_model,
    shard_model_from_rank0,
    stack_tensors,
)
from moequant.integrations.transformers import quantized_stacks  # noqa: E402

WORLD = 2
STEPS = 3
TIMEOUT_S = 150  # the whole two-process run; it takes ~10 s
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def load_peft_model(path, on_meta=False):
    """The tiny model quantized on load, with LoRA; ``on_meta``: its empty twin (meta parameters,
    experts quantized on meta, LoRA on meta), what ranks other than 0 build for rank-0 loading."""
    if on_meta:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        quantize_model_experts(model)
    else:
        with moequant.quantize_experts_on_load():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj"],
                        target_parameters=EXPERT_TARGETS)
    torch.manual_seed(0)  # the same LoRA A init in every process
    with NoDequantize():
        return get_peft_model(model, config)


def global_batch():
    return torch.randint(0, 96, (WORLD, 16), generator=torch.Generator().manual_seed(1))


def train(model, ids, on_step=None):
    """AdamW steps; returns each step's loss (``ids`` is this process's part of the global batch)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if on_step is not None:
            on_step(model, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, optimizer


def assert_shards_hold_packed_bytes(model):
    """Every stack tensor is a DTensor split along the experts: this rank holds E/2 experts' codes
    (uint8) and statistics, in their stored dtypes."""
    from torch.distributed.tensor import DTensor, Shard

    stacks = list(quantized_stacks(model))
    assert len(stacks) == 4  # 2 layers x (gate_up, down)
    for name, module, pname in stacks:
        tensors = stack_tensors(module, pname)
        num_experts = tensors["packed"].shape[0]
        assert set(tensors) >= {"packed", "absmax"}, name
        for tname, tensor in tensors.items():
            assert isinstance(tensor, DTensor) and tensor.placements == (Shard(0),), (name, tname)
            local = tensor.to_local()
            assert tuple(local.shape) == (num_experts // WORLD, *tensor.shape[1:]), (name, tname)
            assert local.dtype == tensor.dtype and not tensor.requires_grad, (name, tname)
        assert tensors["packed"].dtype == torch.uint8
        assert tensors["packed"].to_local().shape[-1] * 2 == module.parametrizations[pname][0].shape[-1]


def assert_bad_combinations_refused():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    config = tiny_config("qwen3_moe")
    config.num_experts = 5  # odd: two ranks cannot each hold whole experts
    odd = quantize_model_experts(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"has 5 experts, which the mesh's 2 shards do not divide.*one of \[1, 5\]"):
        shard_model(odd)
    even = quantize_model_experts(AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), dtype=torch.float32))
    with pytest.raises(ValueError, match=r"dims \('dp', 'tp'\); moequant supports data parallel meshes only"):
        shard_model(even, init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp")))
    with pytest.raises(ValueError, match="mesh has 3 dims"):
        shard_model(even, init_device_mesh("cpu", (1, 1, WORLD)))
    with pytest.raises(ValueError, match=r"shard_placement_fn places .*gate_up_proj.packed.*splits an expert's blocks"):
        shard_model(even, shard_placement_fn=lambda p: Shard(1))
    # HSDP, (replicate, shard) = (1, 2): accepted, stacks split over the shard dim
    from torch.distributed.tensor import Replicate

    shard_model(even, init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")))
    packed = even.model.layers[0].mlp.experts.parametrizations.gate_up_proj.original
    assert packed.placements == (Replicate(), Shard(0)) and packed.to_local().shape[0] == packed.shape[0] // WORLD
    with pytest.raises(ValueError, match="already a DTensor"):
        shard_model(even)


def assert_mixed_precision_keeps_statistics():
    """With ``param_dtype=bfloat16`` the layers compute in bf16 while the experts units gather their
    statistics in float32 (cast, they would be another format: the op refuses them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = quantize_model_experts(AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), dtype=torch.float32))
    shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    layer = model.model.layers[0]
    seen = {}

    def record(module, args):
        seen["q_proj"] = layer.self_attn.q_proj.weight.dtype
        seen.update({n: t.dtype for n, t in stack_tensors(module, "gate_up_proj").items()})

    layer.mlp.experts.register_forward_pre_hook(record)
    with torch.no_grad():
        logits = model(input_ids=global_batch()).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
    assert seen == {"q_proj": torch.bfloat16, "packed": torch.uint8, "absmax": torch.uint8,
                    "absmax_scale": torch.float32, "absmax_offset": torch.float32}, seen


def worker(rank, path, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        assert_bad_combinations_refused()
        assert_mixed_precision_keeps_statistics()

        model = load_peft_model(path)
        ids = global_batch()[rank : rank + 1]
        sharded_grads = []

        def check_step(model, optimizer):
            from torch.distributed.tensor import DTensor

            grads = [p.grad for p in model.parameters() if p.requires_grad]
            sharded_grads.append(all(isinstance(g, DTensor) and g.to_local().numel() < g.numel() for g in grads))

        with NoDequantize():
            shard_model(model)
            assert_shards_hold_packed_bytes(model)
            losses, optimizer = train(model, ids, check_step)
            save_adapter(model, os.path.join(out_dir, "adapter"))
        mean_losses = torch.stack(losses)
        dist.all_reduce(mean_losses)
        mean_losses /= WORLD
        states = [s for s in optimizer.state.values() if "exp_avg" in s]
        assert len(states) == len([p for p in model.parameters() if p.requires_grad]) > 0
        assert all(s["exp_avg"].to_local().numel() < s["exp_avg"].numel() for s in states)
        assert all(sharded_grads) and len(sharded_grads) == STEPS

        # rank-0 loading: rank 0 alone loads (quantizing once); the others build on meta and
        # receive only their shards
        rank0_state = load_peft_model(path).state_dict() if rank == 0 else None
        scattered = load_peft_model(path, on_meta=True)
        with NoDequantize():
            shard_model_from_rank0(scattered, rank0_state)
            assert_shards_hold_packed_bytes(scattered)
            assert not any(p.device.type == "meta" for p in scattered.parameters())
            scattered_losses = torch.stack(train(scattered, ids)[0])
        dist.all_reduce(scattered_losses)
        scattered_losses /= WORLD

        # save_quantized from a sharded (inference) model: gathered codes, nothing dequantized
        with moequant.quantize_experts_on_load():
            plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with NoDequantize():
            shard_model(plain)
            with torch.no_grad():
                logits = plain(input_ids=global_batch()).logits
            # a directory per rank, to see that rank 1 writes nothing (not even the directory)
            moequant.save_quantized(plain, os.path.join(out_dir, f"cache{rank}"))
            assert os.path.exists(os.path.join(out_dir, f"cache{rank}")) == (rank == 0)
            trainable = full_state_dict(plain, trainable_only=True)  # not frozen: every float weight but the stacks
            if rank == 0:
                expected = {n for n, p in plain.named_parameters() if p.requires_grad}
                assert trainable.keys() == expected and not any("parametrizations" in k for k in expected)
                assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in trainable.values())
            else:
                assert trainable is None
        dist.barrier()
        if rank == 0:
            torch.save({"losses": mean_losses, "scattered_losses": scattered_losses, "logits": logits},
                       os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(path, out_dir):
    """Two spawned processes; fails (and kills them) after TIMEOUT_S instead of hanging CI."""
    context = mp.start_processes(worker, args=(path, free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise AssertionError(f"FSDP2 workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("qwen3_moe")))


def test_fsdp2_matches_one_process(checkpoint, tmp_path):
    run_workers(checkpoint, str(tmp_path))

    model = load_peft_model(checkpoint)
    losses, _ = train(model, global_batch())
    model.save_pretrained(str(tmp_path / "adapter_one_process"))
    result = torch.load(tmp_path / "result.pt")
    torch.testing.assert_close(result["losses"], torch.stack(losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["scattered_losses"], torch.stack(losses), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0] - 0.05  # it trained: the comparison is meaningful

    sharded = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "adapter_one_process" / "adapter_model.safetensors"))
    assert sharded.keys() == single.keys() and len(single) == 2 * (2 + 2) * 2  # layers x targets x (A, B)
    for key in single:
        assert sharded[key].shape == single[key].shape, key
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert max((single[k] - sharded[k]).abs().max() for k in single) < 1e-4 < max(single[k].abs().max() for k in single)

    # the cache written from the sharded model: the same bytes as one process writes, and it loads
    with moequant.quantize_experts_on_load():
        plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    moequant.save_quantized(plain, str(tmp_path / "cache_one_process"))
    saved = load_file(str(tmp_path / "cache0" / "moequant_model.safetensors"))
    expected = load_file(str(tmp_path / "cache_one_process" / "moequant_model.safetensors"))
    assert saved.keys() == expected.keys()
    for key in expected:
        assert saved[key].dtype == expected[key].dtype and torch.equal(saved[key], expected[key]), key
    assert any(t.dtype == torch.uint8 for t in saved.values())
    reloaded = moequant.load_quantized(str(tmp_path / "cache0"))
    with torch.no_grad():
        logits = reloaded(input_ids=global_batch()).logits
    torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5)


def test_shard_model_needs_a_process_group(checkpoint):
    with moequant.quantize_experts_on_load():
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        shard_model(model)
    state = full_state_dict(model)  # not sharded: the plain state dict, on this (only) process
    assert state.keys() == model.state_dict().keys()
