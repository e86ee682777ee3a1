"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models with moequant-quantized experts.

    model = get_peft_model(model, lora_config)          # model loaded under quantize_experts_on_load
    shard_model(model)                                  # after init_process_group
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    ...
    save_adapter(model, "adapter")                      # every rank calls, rank 0 writes

``moequant.save_quantized`` also takes a sharded model (one without adapters): every rank calls it,
the shards are gathered to rank 0 as stored, and rank 0 writes what one process would.
:func:`shard_model_from_rank0` shards a model that only rank 0 loaded (the other ranks build it on
meta); :func:`shard_experts` is the experts-only first step, for wrappers that shard the rest.

A quantized stack is stored as frozen parameters whose dim 0 is the expert: the packed codes
``uint8 [E, N, K/2]`` and their statistics (``absmax [E, N*K/B]``, and the double-quant tensors).
:func:`shard_model` lets ``fully_shard`` split every one of them along dim 0, so each rank holds
``E / N`` whole experts of codes and statistics (no NF4 block is split), the pre-forward all-gather
moves those bytes as they are (FSDP2 gathers mixed dtypes as ``uint8``), and the fused experts op
runs on the gathered packed stack: no rank ever dequantizes a stack to shard or gather it. LoRA
factors, their gradients and the optimizer state shard like any parameter.

Units: every experts module is its own FSDP unit, without mixed precision (``param_dtype`` would
cast the float32 statistics, which the formats fix), then every decoder layer (the entries of each
``nn.ModuleList`` holding experts; LoRA factors, attention and router belong to these units, with
the caller's ``mp_policy``), then the root.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional, Union

import torch
from torch import nn

from .parametrize import is_quantized

# Words of mesh dim names that denote a parallelism other than data parallel (torchtitan, accelerate).
_OTHER_PARALLELISMS = frozenset(
    {"tp", "etp", "ep", "cp", "pp", "sp", "tensor", "expert", "experts", "context", "pipeline", "sequence"}
)


def _fsdp():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import Shard
    except ImportError as err:  # torch < 2.6
        raise ImportError(f"moequant's FSDP2 support needs torch.distributed.fsdp.fully_shard (torch>=2.6): {err}")
    return fully_shard, MixedPrecisionPolicy, Shard


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def stack_tensors(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor stored for the quantized ``module.<name>``: ``packed`` (the parametrization's
    ``original``) and the parametrization's statistics, by their names there."""
    plist = module.parametrizations[name]
    tensors = {"packed": plist.original}
    for parametrization in plist:
        tensors.update(parametrization.named_parameters(recurse=False))
        tensors.update(parametrization.named_buffers(recurse=False))
    return tensors


def _quantized_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, experts module)`` of every experts module with at least one quantized stack."""
    found = []
    for name, module in model.named_modules():
        layout = getattr(module, "_moequant_layout", None)
        if layout is not None and any(is_quantized(module, p) for p in layout.weight_names):
            found.append((name, module))
    return found


def _decoder_layers(model: nn.Module, experts: list[nn.Module]) -> list[nn.Module]:
    """The entries of every ``nn.ModuleList`` that holds an experts module (dense layers of the same
    list included, e.g. DeepSeek's first layers), in model order."""
    experts_ids = {id(m) for m in experts}
    layers = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        entries = list(module)
        if any(id(m) in experts_ids for entry in entries for m in entry.modules()):
            layers.extend(e for e in entries if not any(e is l for l in layers))
    return layers


def _shard_size(mesh) -> int:
    """Ranks a tensor is split over: the mesh for FSDP, its second dim for HSDP (replicate, shard)."""
    words = {w for n in (mesh.mesh_dim_names or ()) for w in re.split(r"[_\-\s]+", n.lower())}
    if words & _OTHER_PARALLELISMS:
        raise ValueError(
            f"shard_model: mesh has dims {tuple(mesh.mesh_dim_names)}; moequant supports data parallel meshes only "
            "(1-D: FSDP, 2-D: HSDP as (replicate, shard)), not tensor/expert/context/pipeline parallel ones. Pass "
            "the data-parallel (sub)mesh only"
        )
    if mesh.ndim == 1:
        return mesh.size()
    if mesh.ndim == 2:
        return mesh.size(1)
    raise ValueError(
        f"shard_model: mesh has {mesh.ndim} dims {tuple(mesh.mesh_dim_names or ())}; expected a 1-D mesh (FSDP) or a "
        "2-D (replicate, shard) mesh (HSDP). Tensor, expert and pipeline parallelism are not supported"
    )


def _default_mesh(model: nn.Module):
    from torch.distributed.device_mesh import init_device_mesh

    device_types = {p.device.type for p in model.parameters() if p.device.type != "meta"}
    if not device_types:  # built on meta: the device the process group's default backend drives
        device_types = {"cuda" if torch.distributed.get_backend() == "nccl" else "cpu"}
    device_type = "cuda" if "cuda" in device_types else (device_types.pop() if len(device_types) == 1 else "cpu")
    return init_device_mesh(device_type, (torch.distributed.get_world_size(),))


def check_shardable(
    model: nn.Module, mesh, shard_placement_fn: Optional[Callable] = None
) -> list[tuple[str, nn.Module]]:
    """Raise ``ValueError`` for a model/mesh combination :func:`shard_model` cannot shard correctly;
    returns the quantized experts modules."""
    _, _, Shard = _fsdp()
    experts = _quantized_experts(model)
    if not experts:
        raise ValueError(
            f"shard_model: {type(model).__name__} has no moequant-quantized experts (load it under "
            "moequant.quantize_experts_on_load, or call moequant.quantize_model_experts, first)"
        )
    distributed = [n for n, p in model.named_parameters() if _is_dtensor(p)]
    if distributed:
        raise ValueError(
            f"shard_model: parameter {distributed[0]} is already a DTensor (fully_shard, tensor or expert parallel "
            "already applied); shard_model takes a model that is not distributed yet and supports FSDP/HSDP only"
        )
    shard_size = _shard_size(mesh)
    for name, module in experts:
        for pname in module._moequant_layout.weight_names:
            if not is_quantized(module, pname):
                continue
            tensors = stack_tensors(module, pname)
            packed = tensors["packed"]
            num_experts = packed.shape[0]
            where = f"{name}.{pname}"
            if packed.dim() != 3:
                raise ValueError(f"shard_model: {where} packed has shape {tuple(packed.shape)}; expected [E, N, K/2]")
            if num_experts % shard_size != 0:
                raise ValueError(
                    f"shard_model: {where} has {num_experts} experts, which the mesh's {shard_size} shards do not "
                    f"divide; each rank must hold whole experts (codes with their statistics), so the shard size "
                    f"must divide the number of experts (here: one of {_divisors(num_experts)})"
                )
            for tname, tensor in tensors.items():
                if not isinstance(tensor, nn.Parameter):
                    raise ValueError(
                        f"shard_model: {where} stores {tname} as a buffer; FSDP2 shards parameters only, so every "
                        "rank would hold it whole. moequant stores quantized stacks as frozen parameters"
                    )
                if tensor.dim() == 0 or tensor.shape[0] != num_experts:
                    raise ValueError(
                        f"shard_model: {where}.{tname} has shape {tuple(tensor.shape)}; expected leading dim "
                        f"{num_experts} (experts) so that it shards with its experts' codes"
                    )
                if shard_placement_fn is not None:
                    placement = shard_placement_fn(tensor)
                    if placement is not None and placement != Shard(0):
                        raise ValueError(
                            f"shard_model: shard_placement_fn places {where}.{tname} as {placement}; a quantized "
                            "stack shards along dim 0 (experts) only, any other dim splits an expert's blocks from "
                            "their statistics"
                        )
    return experts


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _unit_kwargs(reshard_after_forward, offload_policy, shard_placement_fn, mesh) -> dict:
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    if shard_placement_fn is not None:
        kwargs["shard_placement_fn"] = shard_placement_fn
    return kwargs


def shard_experts(
    model: nn.Module,
    mesh=None,
    *,
    reshard_after_forward: Union[bool, int] = True,
    offload_policy=None,
    shard_placement_fn: Optional[Callable] = None,
) -> list[nn.Module]:
    """``fully_shard`` each quantized experts module of ``model`` as its own unit, without mixed
    precision, after the checks of :func:`shard_model`; returns those modules.

    :func:`shard_model` starts with this. It is also the step to run before a wrapper that shards
    the rest of the model itself with a ``param_dtype`` (accelerate's FSDP2 ``prepare`` leaves
    modules that already are FSDP units alone): its decoder-layer units would otherwise hold the
    stacks and cast their float32 statistics.
    """
    fully_shard, MixedPrecisionPolicy, _ = _fsdp()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError("moequant FSDP2: torch.distributed is not initialized; call init_process_group first")
    mesh = mesh if mesh is not None else _default_mesh(model)
    experts = [m for _, m in check_shardable(model, mesh, shard_placement_fn)]
    kwargs = _unit_kwargs(reshard_after_forward, offload_policy, shard_placement_fn, mesh)
    for module in experts:
        fully_shard(module, **kwargs, mp_policy=MixedPrecisionPolicy())
    return experts


def shard_model(
    model: nn.Module,
    mesh=None,
    *,
    reshard_after_forward: Union[bool, int] = True,
    mp_policy=None,
    offload_policy=None,
    shard_placement_fn: Optional[Callable] = None,
) -> nn.Module:
    """``fully_shard`` a model with moequant-quantized experts (PEFT-wrapped or not), in place.

    Units: each quantized experts module (no mixed precision: its stacks are codes and float32
    statistics), each decoder layer (``mp_policy`` applies), then ``model``. ``mesh``: a 1-D
    ``DeviceMesh`` (FSDP) or a 2-D (replicate, shard) one (HSDP); default: all ranks on the
    parameters' device type. Needs ``torch.distributed`` initialized. Raises ``ValueError`` when
    the shard size does not divide every stack's number of experts, when a parameter is already
    distributed (tensor/expert parallel), for meshes of other parallelisms, and for a
    ``shard_placement_fn`` that would split a stack along another dim than its experts.
    """
    fully_shard = _fsdp()[0]
    mesh = mesh if mesh is not None or not torch.distributed.is_initialized() else _default_mesh(model)
    experts = shard_experts(model, mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload_policy,
                            shard_placement_fn=shard_placement_fn)
    kwargs = _unit_kwargs(reshard_after_forward, offload_policy, shard_placement_fn, mesh)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    # reversed pre-order: a nested unit is sharded before any unit that contains it
    for layer in reversed(_decoder_layers(model, experts)):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def shard_model_from_rank0(model: nn.Module, rank0_state: Optional[dict], mesh=None, **shard_kwargs) -> nn.Module:
    """Shard a model whose weights only rank 0 holds (the ``cpu_ram_efficient_loading`` case).

    ``model``: on every rank, the model built with empty (meta) parameters, its experts quantized
    on meta (``quantize_model_experts``, same format as rank 0's) and wrapped as on rank 0 (PEFT).
    ``rank0_state``: on rank 0, the ``state_dict()`` of the real model (loaded once, experts
    quantized once: packed codes and statistics, LoRA factors); ignored elsewhere. The meta model is
    sharded by :func:`shard_model` (``mesh`` and ``shard_kwargs`` as there), then rank 0 sends one
    tensor at a time and every rank keeps its shards; no rank but 0 ever holds the whole model, and
    no stack is dequantized. Every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0 and not rank0_state:
        raise ValueError("shard_model_from_rank0: rank 0 must pass the full state dict of the loaded model")
    shard_model(model, mesh, **shard_kwargs)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, rank0_state if torch.distributed.get_rank() == 0 else {}, options=options)
    return model


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> Optional[dict]:
    """``model.state_dict()`` with FSDP2 shards gathered, on the CPU of rank 0 (None on other ranks).

    Packed stacks are gathered as their stored bytes (never dequantized); ``trainable_only`` keeps
    the parameters that require grad (the adapter), gathering nothing else. A model without
    DTensors returns its plain ``state_dict()`` (filtered the same way) on every rank. When sharded,
    every rank must call it (it all-gathers).
    """
    if not any(_is_dtensor(p) for p in model.parameters()):
        state = model.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(model, options=options)
        if torch.distributed.get_rank() != 0:
            return None
    if trainable_only:  # ignore_frozen_params drops frozen parameters, not buffers
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    return state


def save_adapter(model: nn.Module, save_directory: Union[str, os.PathLike], **kwargs) -> None:
    """``PeftModel.save_pretrained`` for a sharded PEFT model: the trainable parameters are gathered
    to rank 0, which writes an adapter with the keys of a single-GPU run. Every rank must call it."""
    state = full_state_dict(model, trainable_only=True)
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    model.save_pretrained(save_directory, state_dict=state if is_main else {}, is_main_process=is_main, **kwargs)
