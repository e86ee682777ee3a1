"""Quantize transformers' fused MoE experts (NF4 by default; FP4, int8, double-quantized
statistics: see :mod:`moequant.formats`) while ``from_pretrained`` loads them.

    with moequant.quantize_experts_on_load():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")

How: transformers' loader calls ``transformers.core_model_loading.set_param_for_module`` once
per final (already fused, already on its target device) tensor. While the context is active that
function is wrapped: right after an experts module's ``gate_up_proj`` / ``down_proj`` is set, it is
quantized and the dense tensor dropped, before the loader materializes the next tensor. This is
independent of any ``quantization_config``, so bitsandbytes' 4-bit ``nn.Linear`` replacement
(``BitsAndBytesConfig(load_in_4bit=True)``) composes with it, and it works without bitsandbytes.

Three loader behaviours would otherwise hold several dense expert tensors at once and erase the
saving; the context changes them, and only while it is active: ``caching_allocator_warmup``
(reserves the whole model at its dense size on the GPU) is skipped; the asynchronous loader, whose
thread pool prefetches many dense tensors ahead of the one being set, is turned off
(``HF_DEACTIVATE_ASYNC_LOAD``); and ``device_map="auto"`` sizes expert tensors at their quantized size
(``compute_module_sizes``), instead of offloading layers that would fit once quantized.

Checkpoints that store one tensor per expert (transformers fuses them with ``MergeModulelist`` /
``Concatenate`` converters) are handled according to ``fuse``:

* ``"quantized"`` (default): each per-expert tensor is read onto the target device and quantized
  straight into its rows of the packed stack, then dropped; no dense fused tensor ever exists, so
  the load peaks at the final model plus one expert's tensor, at the speed of a device-side load.
  The packed result is bit-identical to quantizing the fused tensor (a block never straddles two
  experts or two concatenated projections). Converter chains of another form fall back to ``"cpu"``.
* ``"cpu"``: transformers fuses on the CPU (the converters' ``force_cpu``); the device holds one
  dense fused tensor at a time.
* ``"device"``: transformers fuses on the target device (its pieces, their stack and their
  concatenation coexist there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from .experts import ExpertsLayout, experts_layout, is_experts_module, select_experts_implementation
from ..formats import check_format, compress_statistics, format_name, stack_nbytes
from .parametrize import STATISTICS, is_quantized, nf4_stack_of, quantize_parameter, stored_numel
from .peft import patch_peft

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Quantizing modules and models
# ---------------------------------------------------------------------------------------------


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every transformers fused-experts module (``@use_experts_implementation``)."""
    return [(name, m) for name, m in model.named_modules() if is_experts_module(m)]


def _check_model(model: nn.Module) -> list[tuple[str, nn.Module]]:
    experts = find_experts_modules(model)
    if not experts:
        raise ValueError(
            f"{type(model).__name__} has no fused experts module (a transformers module decorated with "
            "@use_experts_implementation holding 3-D gate_up_proj/down_proj parameters); moequant has nothing "
            "to quantize"
        )
    for name, module in experts:
        try:
            module._moequant_layout = experts_layout(module)
        except ValueError as err:
            raise ValueError(f"{type(model).__name__}.{name}: {err}") from None
        # PEFT nests its ParamWrappers in the order of named_parameters(recurse=False), which loses
        # parametrized parameters: remember the dense order so adapters keep the bf16 model's keys.
        if not hasattr(module, "_moequant_param_order"):
            module._moequant_param_order = tuple(n for n, _ in module.named_parameters(recurse=False))
    return experts


def quantize_experts_module(
    module: nn.Module, blocksize: int = 64, quant_type: str = "nf4", double_quant: Optional[bool] = None
) -> int:
    """Quantize the dense, materialized expert weights of one experts module (both projections in
    one format, see :func:`moequant.quantize`); returns bytes freed."""
    layout: ExpertsLayout = getattr(module, "_moequant_layout", None) or experts_layout(module)
    module._moequant_layout = layout
    freed = 0
    for name in layout.weight_names:
        if is_quantized(module, name):
            continue
        weight = getattr(module, name)
        if weight.device.type == "meta" and not getattr(module, "_moequant_allow_meta", False):
            continue
        freed += weight.numel() * weight.element_size()
        del weight
        quantize_parameter(module, name, blocksize, quant_type=quant_type, double_quant=double_quant)
    select_experts_implementation(module)
    patch_peft()
    return freed


def quantize_model_experts(
    model: nn.Module, blocksize: int = 64, quant_type: str = "nf4", double_quant: Optional[bool] = None
) -> nn.Module:
    """Quantize every fused experts module of an already-built model in place (also works on ``meta``).

    ``quant_type`` is ``"nf4"``, ``"fp4"`` or ``"int8"``; ``double_quant=None`` means
    double-quantized statistics for the 4-bit formats (bitsandbytes ``compress_statistics``)."""
    check_format(quant_type, double_quant, where="quantize_model_experts")
    for _, module in _check_model(model):
        module._moequant_allow_meta = True
        try:
            quantize_experts_module(module, blocksize, quant_type, double_quant)
        finally:
            del module._moequant_allow_meta
    install_parameter_accounting(model)
    return model


def quantized_stacks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(qualified name, experts module, parameter name)`` of every quantized expert stack."""
    for name, module in model.named_modules():
        layout = getattr(module, "_moequant_layout", None)
        if layout is None:
            continue
        for pname in layout.weight_names:
            if is_quantized(module, pname):
                yield f"{name}.{pname}" if name else pname, module, pname


# ---------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------


def _num_parameters_with_logical_experts(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    total = type(self).num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    if only_trainable:  # the packed codes are frozen; so are the logical weights they stand for
        return total
    for _, module, pname in quantized_stacks(self):
        total += nf4_stack_of(module, pname).shape.numel() - stored_numel(module, pname)
    return total


def dense_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every quantized stack replaced by its dequantized tensor under the
    dense name (``…experts.gate_up_proj``), moved to the CPU one stack at a time."""
    state = model.state_dict()
    for name, module, pname in quantized_stacks(model):
        prefix = name[: -len(pname)]
        state.pop(f"{prefix}parametrizations.{pname}.original", None)
        for statistic in STATISTICS:
            state.pop(f"{prefix}parametrizations.{pname}.0.{statistic}", None)
        state[name] = nf4_stack_of(module, pname).dequantize().cpu()
    return state


def _save_pretrained_dense(self, save_directory, *args, state_dict=None, **kwargs):
    if state_dict is None and next(quantized_stacks(self), None) is not None:
        logger.warning(
            "moequant: save_pretrained writes the experts dequantized (a plain %s checkpoint, reloadable with or "
            "without quantize-on-load); moequant.save_quantized keeps them packed",
            type(self).__name__,
        )
        state_dict = dense_state_dict(self)
    return type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)


def install_parameter_accounting(model: nn.Module) -> None:
    """Per-instance methods of a model with quantized experts.

    ``num_parameters()`` counts each quantized stack as its logical ``E*N*K`` weights
    (``get_memory_footprint()`` needs nothing: it already sums the packed ``uint8`` parameter and the
    ``absmax`` buffer, the real bytes). ``save_pretrained()`` writes a plain checkpoint with the
    dequantized experts under their usual names, instead of parametrization keys that a plain load
    would silently drop.
    """
    if hasattr(type(model), "num_parameters"):
        model.num_parameters = types.MethodType(_num_parameters_with_logical_experts, model)
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = types.MethodType(_save_pretrained_dense, model)


@dataclass
class MemorySummary:
    """Bytes of a model with quantized experts; ``experts_dense_bytes`` is what the experts took before."""

    experts_dense_bytes: int = 0
    experts_packed_bytes: int = 0
    other_bytes: int = 0
    num_stacks: int = 0
    experts_weights: int = 0  # logical weights of the quantized stacks
    formats: tuple = ()  # sorted format names of the stacks, e.g. ("nf4+dq",)

    @property
    def total_bytes(self) -> int:
        return self.experts_packed_bytes + self.other_bytes

    @property
    def bytes_per_weight(self) -> float:
        """Real bytes per expert weight: codes plus every statistic."""
        return self.experts_packed_bytes / max(self.experts_weights, 1)

    def format(self) -> str:
        ratio = self.experts_dense_bytes / max(self.experts_packed_bytes, 1)
        return (
            f"{self.num_stacks} expert stacks: {self.experts_dense_bytes / _MB:.1f} MB dense -> "
            f"{self.experts_packed_bytes / _MB:.1f} MB {'/'.join(self.formats) or 'quantized'} "
            f"({self.bytes_per_weight:.4f} B/weight, {ratio:.2f}x smaller); "
            f"other weights {self.other_bytes / _MB:.1f} MB; model {self.total_bytes / _MB:.1f} MB"
        )


def memory_summary(model: nn.Module) -> MemorySummary:
    """Dense vs packed bytes of the quantized experts, and the bytes of everything else."""
    summary = MemorySummary()
    packed_ids, formats = set(), set()
    for _, module, pname in quantized_stacks(model):
        stack = nf4_stack_of(module, pname)
        summary.num_stacks += 1
        summary.experts_weights += stack.shape.numel()
        summary.experts_dense_bytes += stack.shape.numel() * torch.empty((), dtype=stack.dtype).element_size()
        summary.experts_packed_bytes += stack.nbytes()
        packed_ids.update(id(t) for t in stack.tensors())
        formats.add(stack.format)
    summary.formats = tuple(sorted(formats))
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in packed_ids or id(t) in seen:
            continue
        seen.add(id(t))
        summary.other_bytes += t.numel() * t.element_size()
    return summary


# ---------------------------------------------------------------------------------------------
# The loader hook
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadStats:
    """What the hook did during one ``from_pretrained``; ``peak_resident_bytes`` counts the model's
    tensors plus the dense expert tensor being quantized (the loader's own transient buffers aside)."""

    blocksize: int = 64
    quant_type: str = "nf4"
    double_quant: bool = True
    num_stacks: int = 0
    dense_bytes: int = 0
    packed_bytes: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    quantize_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    cuda_peak_bytes: dict = field(default_factory=dict)


class _Hook:
    """Process-wide state of the patched loader (the context manager may be nested or re-entered)."""

    lock = threading.RLock()
    depth = 0
    saved: dict = {}
    blocksize = 64
    quant_type = "nf4"
    double_quant = True
    fuse = "quantized"
    device_map = None  # of the from_pretrained call being served
    stats: "weakref.WeakKeyDictionary[nn.Module, LoadStats]" = weakref.WeakKeyDictionary()


def _tensor_bytes(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.numel() * t.element_size()


def _set_param_and_quantize(model, target_name, param_value, *args, **kwargs):
    """Wraps ``core_model_loading.set_param_for_module`` (its signature changed during 5.x: pass through)."""
    stats = _Hook.stats.get(model)
    if stats is None:
        _check_model(model)  # fail fast, before anything is loaded, on unsupported layouts
        stats = _Hook.stats[model] = LoadStats(
            blocksize=_Hook.blocksize, quant_type=_Hook.quant_type, double_quant=_Hook.double_quant
        )
        logger.info("moequant: quantizing fused experts of %s to %s while loading", type(model).__name__,
                    format_name(stats.quant_type, stats.double_quant))
    module_path, _, param_name = target_name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if isinstance(param_value, _QuantizedExperts):
        _install_quantized_experts(module, target_name, param_name, param_value, stats, *args, **kwargs)
        return
    _Hook.saved["set_param_for_module"](model, target_name, param_value, *args, **kwargs)

    layout = getattr(module, "_moequant_layout", None)
    incoming = _tensor_bytes(param_value)
    if layout is None or param_name not in layout.weight_names or is_quantized(module, param_name):
        stats.resident_bytes += incoming
        stats.peak_resident_bytes = max(stats.peak_resident_bytes, stats.resident_bytes)
        if layout is not None:
            _mark_loaded(module, layout)
        return
    dense = getattr(module, param_name)
    if dense.device.type == "meta":
        return
    if type(dense).__name__ == "DTensor":
        raise ValueError(
            f"{target_name} was loaded as a DTensor (tensor parallel / FSDP sharding); moequant quantizes whole "
            "expert stacks on one device and does not support sharded loading yet"
        )
    del dense
    stats.peak_resident_bytes = max(stats.peak_resident_bytes, stats.resident_bytes + incoming)
    start = time.perf_counter()
    stack = quantize_parameter(module, param_name, stats.blocksize, quant_type=stats.quant_type,
                               double_quant=stats.double_quant)
    # The loader keeps its own reference to the dense tensor until it has materialized the next
    # one (a loop variable); release the storage now so two dense tensors never coexist.
    if isinstance(param_value, torch.Tensor) and not isinstance(param_value, nn.Parameter):
        param_value.data = torch.empty(0, dtype=param_value.dtype, device=param_value.device)
    del param_value
    stats.quantize_seconds += time.perf_counter() - start
    _record_stack(module, layout, stack, incoming, stats)


def _mark_loaded(module: nn.Module, layout: ExpertsLayout) -> None:
    """Flag loaded packed stacks (and, once nothing of it is left to load, the experts module) as
    initialized, as transformers flags the tensors it sets: otherwise its post-load
    ``_init_weights`` reads ``module.gate_up_proj``, which dequantizes the whole stack, only to
    overwrite that temporary."""
    for name in layout.weight_names:
        if is_quantized(module, name):
            module.parametrizations[name].original._is_hf_initialized = True
    if all(is_quantized(module, n) for n in layout.weight_names) and all(
        getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False)
    ):
        module._is_hf_initialized = True


def _record_stack(module: nn.Module, layout: ExpertsLayout, stack, dense_bytes: int, stats: "LoadStats") -> None:
    """Bookkeeping after one expert stack of ``module`` was installed quantized."""
    _mark_loaded(module, layout)
    if all(is_quantized(module, n) for n in layout.weight_names):
        select_experts_implementation(module)
        patch_peft()
    stats.num_stacks += 1
    stats.dense_bytes += dense_bytes
    stats.packed_bytes += stack.nbytes()
    stats.resident_bytes += stack.nbytes()
    stats.peak_resident_bytes = max(stats.peak_resident_bytes, stats.resident_bytes)
    if stack.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(stack.device)
        stats.cuda_peak_bytes[str(stack.device)] = max(stats.cuda_peak_bytes.get(str(stack.device), 0), peak)
    if stats.num_stacks % 16 == 0:
        logger.info(
            "moequant: %d expert stacks quantized (%.1f MB dense -> %.1f MB %s)",
            stats.num_stacks, stats.dense_bytes / _MB, stats.packed_bytes / _MB,
            format_name(stats.quant_type, stats.double_quant),
        )


def _is_expert_fusion(converter) -> bool:
    """A converter that stacks per-expert checkpoint tensors into a fused experts parameter."""
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    return (
        isinstance(converter, WeightConverter)
        and any(isinstance(op, MergeModulelist) for op in converter.operations)
        and any(".experts." in t or t.startswith("experts.") for t in converter.target_patterns)
    )


class _QuantizedExperts:
    """What a per-expert converter hands to ``set_param_for_module`` in place of a dense fused tensor."""

    def __init__(self, stack, seconds: float):
        self.stack = stack
        self.seconds = seconds  # spent loading and quantizing the expert tensors

    @property
    def shape(self) -> torch.Size:
        return self.stack.shape


def _install_quantized_experts(module, target_name, param_name, value, stats, *args, **kwargs) -> None:
    """``set_param_for_module`` for a stack quantized expert by expert: checks it against the
    model's (meta) parameter and installs it; what transformers' function does for a tensor."""
    layout = getattr(module, "_moequant_layout", None)
    if layout is None or param_name not in layout.weight_names:
        raise ValueError(f"moequant: {target_name} was quantized per expert but is not an expert weight of a "
                         f"supported experts module ({type(module).__name__})")
    ref = getattr(module, param_name)
    if tuple(ref.shape) != tuple(value.shape):
        raise ValueError(f"moequant: checkpoint experts for {target_name} fuse to shape {tuple(value.shape)}, the "
                         f"model expects {tuple(ref.shape)}")
    stack = dataclasses.replace(value.stack, dtype=ref.dtype)  # the model's dtype; codes and absmax do not depend on it
    loading_info = kwargs.get("loading_info", args[0] if args else None)
    if loading_info is not None:
        loading_info.missing_keys.discard(target_name)
    del ref
    quantize_parameter(module, param_name, stack=stack)
    stats.quantize_seconds += value.seconds
    _record_stack(module, layout, stack, stack.shape.numel() * torch.finfo(stack.dtype).bits // 8, stats)


def _is_stack_fusion(converter) -> bool:
    """Whether the chain is ``[MergeModulelist(0)]`` of one source or ``[MergeModulelist(0),
    Concatenate(1)]``, the two forms :func:`_quantize_experts_streaming` reproduces."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    if getattr(converter, "quantization_operation", None) is not None or len(converter.target_patterns) != 1:
        return False
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return False
    if len(ops) == 1:
        return len(converter.source_patterns) == 1
    return len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1


def _streamable(converter) -> bool:
    device_map = _Hook.device_map
    offloads = isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}
    return _Hook.fuse == "quantized" and not offloads and _is_expert_fusion(converter) and _is_stack_fusion(converter)


def _quantize_experts_streaming(
    sources: list[list], blocksize: int, quant_type: str = "nf4", double_quant: bool = False
):
    """Quantize ``sources[s][e]()`` (deferred loads of expert e's tensor [N_s, K] for source s) into
    one stack ``[E, sum N_s, K]`` in ``quant_type``, loading and releasing one expert tensor at a
    time; with ``double_quant`` the finished stack's statistics are then compressed per expert
    (the same bits as quantizing the fused tensor with double quantization). Returns None
    (nothing loaded beyond expert 0, which is kept in ``sources`` as loaded tensors) when the
    tensors do not allow it."""
    from ..formats import QuantStack
    from .. import _ops  # noqa: F401  (registers torch.ops.moequant)

    four_bit = quant_type != "int8"

    num_experts = len(sources[0])
    if num_experts == 0 or any(len(s) != num_experts for s in sources):
        return None
    first = []
    for s in sources:
        t = s[0]()
        s[0] = (lambda t=t: t)
        first.append(t)
    k = first[0].shape[-1] if first[0] is not None else 0
    if any(t is None or t.dim() != 2 or t.shape[-1] != k or not t.is_floating_point() or t.device.type not in ("cuda", "cpu")
           or (four_bit and ((t.shape[0] * k) % blocksize or k % 2)) for t in first):
        return None
    rows = [t.shape[0] for t in first]
    dtype, device = first[0].dtype, first[0].device
    del first
    n = sum(rows)
    packed = torch.empty((num_experts, n, k // 2 if four_bit else k), dtype=torch.uint8 if four_bit else torch.int8,
                         device=device)
    absmax = torch.empty((num_experts, n * k // blocksize if four_bit else n), dtype=torch.float32, device=device)
    for e in range(num_experts):
        row = 0
        for s, n_s in zip(sources, rows):
            t = s[e]()
            s[e] = None
            if t is None or tuple(t.shape) != (n_s, k):
                raise ValueError(f"moequant: expert {e} of a fused projection has shape "
                                 f"{None if t is None else tuple(t.shape)}, expected {(n_s, k)}")
            p, a = torch.ops.moequant.quantize_nf4(t.to(device), blocksize, quant_type)
            del t
            packed[e, row:row + n_s] = p
            first_stat = row * k // blocksize if four_bit else row
            absmax[e, first_stat:first_stat + a.numel()] = a
            row += n_s
    stack = QuantStack(packed, absmax, torch.Size((num_experts, n, k)), blocksize, dtype, quant_type)
    return compress_statistics(stack) if double_quant else stack


def _weight_converter_convert(self, layer_name, *args, **kwargs):
    """Wraps ``WeightConverter.convert``: expert fusions are quantized per expert (``fuse="quantized"``)."""
    original = _Hook.saved["WeightConverter.convert"]
    pending = getattr(self, "collected_tensors", None) or {}
    lists = [pending.get(p) for p in self.source_patterns if p in pending]
    deferred = bool(lists) and all(lst and all(callable(f) for f in lst) for lst in lists)  # sync loading
    if not deferred or not _streamable(self):
        return original(self, layer_name, *args, **kwargs)
    start = time.perf_counter()
    stack = _quantize_experts_streaming(lists, _Hook.blocksize, _Hook.quant_type, _Hook.double_quant)
    if stack is None:  # shapes it cannot take: transformers' own chain on what was left
        return original(self, layer_name, *args, **kwargs)
    for p in self.source_patterns:
        pending.pop(p, None)
    # transformers' renaming: the full name when it contains the target pattern, else the pattern
    target = self.target_patterns[0]
    full_name = layer_name.replace("*.", "0.")
    name = full_name if target in full_name else target
    logger.debug("moequant: %s quantized expert by expert in %.3f s", name, time.perf_counter() - start)
    return {name: _QuantizedExperts(stack, time.perf_counter() - start)}


def _convert_and_load(*args, **kwargs):
    """Wraps ``convert_and_load_state_dict_in_model``: records the device map; expert fusions that
    cannot be quantized per expert run on the CPU (``fuse`` "quantized" or "cpu")."""
    original = _Hook.saved["convert_and_load_state_dict_in_model"]
    load_config = kwargs.get("load_config", args[2] if len(args) > 2 else None)
    converters = [c for c in (getattr(load_config, "weight_mapping", None) or []) if _is_expert_fusion(c)]
    _Hook.device_map = getattr(load_config, "device_map", None)
    on_cpu = [c for c in converters if _Hook.fuse == "cpu" or (_Hook.fuse == "quantized" and not _streamable(c))]
    previous = [c.force_cpu for c in on_cpu]
    for c in on_cpu:
        c.force_cpu = True
    try:
        return original(*args, **kwargs)
    finally:
        for c, value in zip(on_cpu, previous):
            c.force_cpu = value
        _Hook.device_map = None


def _module_sizes_at_nf4(model, hf_quantizer=None, *args, **kwargs):
    """Wraps accelerate-integration ``compute_module_sizes``: expert tensors count at their
    quantized size (in the format being loaded)."""
    all_sizes, leaf_sizes = _Hook.saved["compute_module_sizes"](model, hf_quantizer, *args, **kwargs)
    buffers_only = kwargs.get("buffers_only", args[0] if args else False)
    if buffers_only:
        return all_sizes, leaf_sizes
    for module_name, module in find_experts_modules(model):
        for pname in ("gate_up_proj", "down_proj"):
            param = module._parameters.get(pname)
            if param is None or param.dim() != 3 or not param.is_floating_point():
                continue
            name = f"{module_name}.{pname}"
            element = hf_quantizer.param_element_size(model, name, param) if hf_quantizer else param.element_size()
            saved = param.numel() * element - stack_nbytes(param.shape, _Hook.blocksize, _Hook.quant_type,
                                                           _Hook.double_quant)
            parts = name.split(".")
            for i in range(len(parts)):
                all_sizes[".".join(parts[:i])] -= saved
            if name in all_sizes:
                all_sizes[name] -= saved
            leaf_sizes[module_name] -= saved
    return all_sizes, leaf_sizes


def _skip_caching_allocator_warmup(*args, **kwargs) -> None:
    logger.debug("moequant: caching_allocator_warmup skipped (it would reserve the dense expert size)")


def _finish(model: nn.Module, stats: LoadStats) -> None:
    """After ``from_pretrained``: quantize experts the checkpoint lacked (initialized by transformers)."""
    for _, module in find_experts_modules(model):
        quantize_experts_module(module, stats.blocksize, stats.quant_type, stats.double_quant)
    install_parameter_accounting(model)
    summary = memory_summary(model)
    logger.info(
        "moequant: loaded %s in %.2f s (%.2f s quantizing): %s; peak resident while loading %.1f MB%s",
        type(model).__name__, time.perf_counter() - stats.started, stats.quantize_seconds, summary.format(),
        stats.peak_resident_bytes / _MB,
        "".join(f"; {d} peak allocated {b / _MB:.1f} MB" for d, b in stats.cuda_peak_bytes.items()),
    )
    model._moequant_load_stats = stats


def _patch() -> None:
    import transformers.core_model_loading as loading
    import transformers.integrations.accelerate as accelerate_integration
    import transformers.modeling_utils as modeling_utils

    if not hasattr(loading, "set_param_for_module"):
        raise ValueError(
            "moequant.quantize_experts_on_load needs transformers>=5 (transformers.core_model_loading."
            "set_param_for_module); this transformers has no such function"
        )
    _Hook.saved = {
        "set_param_for_module": loading.set_param_for_module,
        "convert_and_load_state_dict_in_model": getattr(modeling_utils, "convert_and_load_state_dict_in_model", None),
        "caching_allocator_warmup": getattr(modeling_utils, "caching_allocator_warmup", None),
        "compute_module_sizes": getattr(accelerate_integration, "compute_module_sizes", None),
        "HF_DEACTIVATE_ASYNC_LOAD": os.environ.get("HF_DEACTIVATE_ASYNC_LOAD"),
        "WeightConverter.convert": getattr(getattr(loading, "WeightConverter", None), "convert", None),
    }
    loading.set_param_for_module = _set_param_and_quantize
    if _Hook.saved["convert_and_load_state_dict_in_model"] is not None:
        modeling_utils.convert_and_load_state_dict_in_model = _convert_and_load
    if _Hook.saved["WeightConverter.convert"] is not None:
        loading.WeightConverter.convert = _weight_converter_convert
    if _Hook.saved["caching_allocator_warmup"] is not None:
        modeling_utils.caching_allocator_warmup = _skip_caching_allocator_warmup
    if _Hook.saved["compute_module_sizes"] is not None:
        accelerate_integration.compute_module_sizes = _module_sizes_at_nf4
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"


def _unpatch() -> None:
    import transformers.core_model_loading as loading
    import transformers.integrations.accelerate as accelerate_integration
    import transformers.modeling_utils as modeling_utils

    if _Hook.saved["compute_module_sizes"] is not None:
        accelerate_integration.compute_module_sizes = _Hook.saved["compute_module_sizes"]
    loading.set_param_for_module = _Hook.saved["set_param_for_module"]
    if _Hook.saved["WeightConverter.convert"] is not None:
        loading.WeightConverter.convert = _Hook.saved["WeightConverter.convert"]
    if _Hook.saved["convert_and_load_state_dict_in_model"] is not None:
        modeling_utils.convert_and_load_state_dict_in_model = _Hook.saved["convert_and_load_state_dict_in_model"]
    if _Hook.saved["caching_allocator_warmup"] is not None:
        modeling_utils.caching_allocator_warmup = _Hook.saved["caching_allocator_warmup"]
    if _Hook.saved["HF_DEACTIVATE_ASYNC_LOAD"] is None:
        os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
    else:
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = _Hook.saved["HF_DEACTIVATE_ASYNC_LOAD"]
    _Hook.saved = {}


_FUSE_MODES = ("quantized", "cpu", "device")


@contextlib.contextmanager
def quantize_experts_on_load(
    blocksize: int = 64, fuse: str = "quantized", quant_type: str = "nf4", double_quant: Optional[bool] = None
):
    """Quantize fused MoE experts inside ``from_pretrained`` calls made in this context.

    ``quant_type``: ``"nf4"`` (default), ``"fp4"`` or ``"int8"`` (row-wise, for 8-bit LoRA;
    ``blocksize`` is then ignored). ``double_quant``: double-quantized 4-bit statistics
    (bitsandbytes ``bnb_4bit_use_double_quant``; ``None`` means on for 4-bit, off for int8).

    ``fuse`` says how checkpoints that store one tensor per expert become a fused stack:
    ``"quantized"`` (default) quantizes expert by expert straight into the packed stack on the
    target device (peak: final model plus one expert tensor; as fast as a device-side load);
    ``"cpu"`` lets transformers fuse on the CPU and quantizes the fused tensor on the device;
    ``"device"`` lets transformers fuse on the target device (the load then peaks at several
    dense expert tensors). Checkpoints that store experts already fused load the same either way.

    Every experts module then keeps its class, its ``gate_up_proj`` / ``down_proj`` read as dense
    (dequantized) tensors, and its forward runs the "moequant" experts implementation on the packed
    weights. Raises ``ValueError`` if a loaded model has no fused experts or an unsupported layout.
    """
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    if fuse not in _FUSE_MODES:
        raise ValueError(f"fuse must be one of {_FUSE_MODES}, got {fuse!r}")
    double_quant = check_format(quant_type, double_quant, where="quantize_experts_on_load")
    with _Hook.lock:
        if _Hook.depth == 0:
            _patch()
        _Hook.depth += 1
        previous = (_Hook.blocksize, _Hook.fuse, _Hook.quant_type, _Hook.double_quant)
        _Hook.blocksize, _Hook.fuse, _Hook.quant_type, _Hook.double_quant = blocksize, fuse, quant_type, double_quant
    try:
        yield
        for model, stats in list(_Hook.stats.items()):
            _finish(model, stats)
    finally:
        with _Hook.lock:
            _Hook.stats = weakref.WeakKeyDictionary()
            _Hook.blocksize, _Hook.fuse, _Hook.quant_type, _Hook.double_quant = previous
            _Hook.depth -= 1
            if _Hook.depth == 0:
                _unpatch()


def load_stats(model: nn.Module) -> Optional[LoadStats]:
    """What :func:`quantize_experts_on_load` recorded while loading ``model`` (None if it did not)."""
    return getattr(model, "_moequant_load_stats", None)
