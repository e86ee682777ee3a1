"""PEFT LoRA on quantized experts: ``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", ...])``.

PEFT's ``ParamWrapper`` adapts one ``nn.Parameter`` by registering, around each forward, a
parametrization that makes the parameter read as ``W + scaling * B @ A`` (a dense ``[E, N, K]``
tensor). On a moequant-quantized experts module that would dequantize the whole stack and build
the delta on every forward. :func:`patch_peft` changes four things, only for wrappers whose base
parameter is quantized by moequant (every other wrapper behaves exactly as before):

* injection: PEFT finds target parameters through ``named_parameters(recurse=False)``, which does
  not list parametrized parameters, and nests its wrappers in that order. Quantized experts are
  matched (exact name or ``.suffix``, as PEFT does) in the order the dense module registered its
  parameters, so an adapter trained here has exactly the keys of one trained on the bf16 model;
* ``get_param``: a zero-stride stand-in with the logical shape, dtype and device (PEFT only reads
  those), instead of a dequantized stack;
* ``_activate_lora``: stores the low-rank factors ``A [E, r, in]``, ``B [E, out, r]`` and the scaling
  on the experts module, where the "moequant" experts implementation passes them to
  ``torch.ops.moequant.experts_forward``;
* ``merge``: dequantizes that parameter to a dense one, then merges as PEFT does (the result is the
  bf16 model with the adapter folded in; ``unmerge`` then works on the dense weight).

``PeftModel.get_nb_trainable_parameters`` (``print_trainable_parameters``) also counts each NF4
stack as its logical weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch
from torch import nn

from .parametrize import dequantize_parameter, is_quantized, nf4_stack_of, stored_numel

logger = logging.getLogger(__name__)

_ORIGINALS: dict = {}


def _quantized_base(wrapper) -> Optional[nn.Module]:
    """The experts module under ``wrapper`` if the parameter it adapts is quantized by moequant."""
    base = wrapper.get_base_layer()
    return base if is_quantized(base, wrapper.parameter_name) else None


def lora_factors(wrapper, adapters: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [E, r, in], B [E, out, r], scaling)`` of the active adapters of one ``ParamWrapper``.

    PEFT stores one expert's factors interleaved in ``nn.Linear`` weights: ``lora_A.weight`` is
    ``[E*r, in]`` (expert-major) and ``lora_B.weight`` is ``[out, r*E]`` (expert-minor). Its
    ``in_features``/``out_features`` are the projection's real input/output sizes whether or not the
    parameter is stored transposed, which is also the op's convention. Several active adapters are
    concatenated along the rank with their scalings folded into ``B``.

    With autograd the factors are converted here, as part of the graph. Without it (inference) one
    adapter's factors go to the op in their own dtype (float32 by default), which rounds to
    ``dtype`` as it reads them, instead of every step copying every expert's factors (tens of MB per
    layer):

    * on CUDA as views of PEFT's weights: the decode kernels read the few routed experts' elements;
    * on CPU from a copy with ``B`` expert-major, made once per adapter version (see
      :func:`_cpu_inference_factors`): the CPU op converts whole any factor whose experts are not
      dense slices, which ``B``'s expert-minor view is not.
    """
    weights = [(wrapper.lora_A[name].weight, wrapper.lora_B[name].weight) for name in adapters]
    scalings = [float(wrapper.scaling[name]) for name in adapters]
    needs_grad = torch.is_grad_enabled() and any(w.requires_grad for pair in weights for w in pair)
    if not needs_grad and weights[0][0].device.type == "cpu" and _cpu_cache_enabled():
        return _cpu_inference_factors(wrapper, adapters, dtype, weights, scalings)
    if not torch.compiler.is_compiling():
        # training (a copy would be stale after the next optimizer step), another device or the
        # cache turned off: a CPU copy would only hold memory
        _drop_cpu_cache(wrapper)
    a_list, b_list = _expert_views(wrapper.num_experts, weights)
    return _combined_factors(a_list, b_list, scalings, dtype, views=not needs_grad)


def _expert_views(num_experts: int, weights) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each adapter's factors as views in PEFT's storage: ``A [E, r, in]`` and ``B [E, out, r]``."""
    a_list = [a.reshape(num_experts, -1, a.shape[-1]) for a, _ in weights]
    b_list = [b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1) for _, b in weights]
    return a_list, b_list


def _combined_factors(a_list, b_list, scalings, dtype, views: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One adapter's factors (as the views given when ``views``, else converted to ``dtype``), or
    several adapters' concatenated along the rank in ``dtype``, their scalings folded into ``B``."""
    if len(a_list) == 1 and views:
        return a_list[0], b_list[0], scalings[0]
    a_list = [a.to(dtype) for a in a_list]
    b_list = [b.to(dtype) for b in b_list]
    if len(a_list) == 1:
        return a_list[0].contiguous(), b_list[0].contiguous(), scalings[0]
    lora_a = torch.cat(a_list, dim=1).contiguous()
    lora_b = torch.cat([b * s for b, s in zip(b_list, scalings)], dim=2).contiguous()
    return lora_a, lora_b, 1.0


_CPU_CACHE_ATTR = "_moequant_cpu_lora_cache"


def _cpu_cache_enabled() -> bool:
    """``MOEQUANT_PEFT_CPU_CACHE=0`` turns the CPU inference copy off (read on every call)."""
    return not torch.compiler.is_compiling() and os.environ.get("MOEQUANT_PEFT_CPU_CACHE", "1") != "0"


def _drop_cpu_cache(wrapper) -> None:
    if getattr(wrapper, _CPU_CACHE_ATTR, None) is not None:
        setattr(wrapper, _CPU_CACHE_ATTR, None)


def _cpu_inference_factors(wrapper, adapters, dtype, weights, scalings):
    """The CPU op's factors at inference, cached on the wrapper until an adapter's weights change.

    One adapter: ``A`` as PEFT's view (already expert-major) and ``B`` copied once to ``[E, out,
    r]`` contiguous in its own dtype, so the op converts only the routed experts' slices (qwen3-30b-a3b
    shapes, T=1: 16-21 ms a layer call with the expert-minor view, 4.1-5.5 ms with dense factors;
    ``benchmarks/results/bench_cpu_experts-lora_factor_storage-AMD_EPYC.json``); the values, and so
    the results, are those of the view. Several adapters: their concatenation, as
    :func:`_combined_factors` builds it on every call otherwise. Costs one copy of ``B`` (of all
    factors for several adapters) per wrapper while CPU inference runs; a call with autograd, or on
    another device, drops it.

    The key holds each weight's address and version counter (in-place updates such as an optimizer
    step or ``load_state_dict`` bump it) and the entry keeps the weights it was made from alive, so
    an address cannot be reused by other weights while it is cached.
    """
    flat = [w for pair in weights for w in pair]
    if any(w.is_inference() for w in flat):  # no version counter: nothing tells when they change
        return _combined_factors(*_expert_views(wrapper.num_experts, weights), scalings, dtype, views=True)
    key = (tuple(adapters), dtype, tuple(scalings), tuple((w.data_ptr(), w._version) for w in flat))
    cached = getattr(wrapper, _CPU_CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[2]
    a_list, b_list = _expert_views(wrapper.num_experts, weights)
    with torch.no_grad():
        if len(adapters) == 1:
            factors = (a_list[0], b_list[0].contiguous(), scalings[0])
        else:
            factors = _combined_factors(a_list, b_list, scalings, dtype, views=False)
    setattr(wrapper, _CPU_CACHE_ATTR, (key, [w.detach() for w in flat], factors))
    return factors


def _get_param(self):
    base = _quantized_base(self)
    if base is None:
        return _ORIGINALS["get_param"](self)
    stack = nf4_stack_of(base, self.parameter_name)
    return torch.empty((), dtype=stack.dtype, device=stack.device).expand(stack.shape)


@contextlib.contextmanager
def _activate_lora(self, active_adapters: list[str]):
    base = _quantized_base(self)
    if base is None:
        with _ORIGINALS["_activate_lora"](self, active_adapters):
            yield
        return
    adapters = [a for a in (active_adapters or []) if a in self.lora_A]
    if not adapters:
        yield
        return
    factors = lora_factors(self, adapters, nf4_stack_of(base, self.parameter_name).dtype)
    # getattr/setattr rather than __dict__.setdefault: dynamo (torch 2.11) cannot trace the latter.
    active = getattr(base, "_moequant_lora", None)
    if active is None:
        active = {}
        base._moequant_lora = active
    previous = active.get(self.parameter_name)
    active[self.parameter_name] = factors
    try:
        yield
    finally:
        if previous is None:
            active.pop(self.parameter_name, None)
        else:
            active[self.parameter_name] = previous


def _merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
    base = _quantized_base(self)
    if base is not None:
        logger.info("moequant: dequantizing %s.%s to merge LoRA into it", type(base).__name__, self.parameter_name)
        dequantize_parameter(base, self.parameter_name)
    return _ORIGINALS["merge"](self, safe_merge=safe_merge, adapter_names=adapter_names)


def _strip_base_layer(module_name: str) -> str:
    """``a.experts.base_layer.base_layer`` -> ``a.experts`` (PEFT's name for a wrapped module)."""
    return module_name.replace(".base_layer", "")


def _matches(key: str, targets: list[str]) -> bool:
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def _quantized_experts(model) -> list[tuple[str, str, nn.Module]]:
    """``(module name, unwrapped name, experts module)`` of every moequant-quantized experts module,
    collected before any replacement so that wrapping does not disturb the walk."""
    found = []
    for module_name, module in model.named_modules():
        if getattr(module, "_moequant_layout", None) is None or not hasattr(module, "parametrizations"):
            continue
        found.append((module_name, _strip_base_layer(module_name), module))
    return found


def _wrap_quantized_experts(tuner, peft_config, model, adapter_name, low_cpu_mem_usage, quantized) -> list[str]:
    """Wrap the matching quantized stacks of ``quantized`` in the order the dense module registered
    its parameters (so adapters get the keys of one trained on the bf16 model); returns their keys."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import _get_submodules

    targets = sorted(set(peft_config.target_parameters or ()))
    ctx = contextlib.nullcontext
    if low_cpu_mem_usage:
        from accelerate import init_empty_weights as ctx
    targeted = []
    for module_name, unwrapped, module in quantized:
        # is_quantized, not hasattr: reading a quantized attribute dequantizes the whole stack
        order = [p for p in getattr(module, "_moequant_param_order", ()) if is_quantized(module, p)]
        for param_name in order:
            key = f"{unwrapped}.{param_name}"
            if not _matches(key, targets):
                continue
            if peft_config.lora_dropout:
                raise ValueError(
                    f"LoRA on the moequant-quantized parameter {key} needs lora_dropout=0 (dropout on the input "
                    f"cannot be factored out of a fused experts op); got lora_dropout={peft_config.lora_dropout}"
                )
            # The name collected before wrapping: a second parameter's wrapper goes around the first
            # one, as PEFT nests them on a dense module.
            parent, target, target_name = _get_submodules(model, module_name)
            wrapper = model.get_submodule(unwrapped)
            while isinstance(wrapper, BaseTunerLayer) and type(wrapper).__name__ == "ParamWrapper":
                if wrapper.parameter_name == param_name:  # a previous adapter wraps it: add to that wrapper
                    target = wrapper
                    break
                wrapper = wrapper.base_layer
            tuner._check_target_module_compatiblity(peft_config, model, target_name)
            with ctx():
                tuner._create_and_replace(
                    peft_config, adapter_name, target, target_name, parent, current_key=key, parameter_name=param_name
                )
            targeted.append(key)
    return targeted


def _make_injection(previous):
    """``BaseTuner._inject_parameters`` that wraps moequant's quantized stacks first, then runs
    ``previous`` (PEFT's implementation, or one another library installed, e.g. Axolotl's) on the
    rest. Wrapped stacks are renamed ``….experts.base_layer…`` by then, so a suffix match in
    ``previous`` cannot target them a second time; exact full names of quantized stacks are
    also withheld from it."""

    def _inject_parameters(self, peft_config, model, adapter_name, low_cpu_mem_usage):
        quantized = _quantized_experts(model)
        quantized_keys = {
            f"{unwrapped}.{p}"
            for _, unwrapped, m in quantized
            for p in m._moequant_layout.weight_names
            if is_quantized(m, p)
        }
        targeted = _wrap_quantized_experts(self, peft_config, model, adapter_name, low_cpu_mem_usage, quantized)
        saved_targets = peft_config.target_parameters
        peft_config.target_parameters = [t for t in (saved_targets or ()) if t not in quantized_keys]
        try:
            targeted += list(previous(self, peft_config, model, adapter_name, low_cpu_mem_usage) or ())
        finally:
            peft_config.target_parameters = saved_targets
        return targeted

    _inject_parameters._moequant_previous = previous
    return _inject_parameters


def install_injection() -> bool:
    """Make moequant's parameter injection the outermost ``BaseTuner._inject_parameters``, wrapping
    whatever is installed now; idempotent. Returns whether it installed anything."""
    from peft.tuners.tuners_utils import BaseTuner

    current = BaseTuner._inject_parameters
    if getattr(current, "_moequant_previous", None) is not None:
        return False
    BaseTuner._inject_parameters = _make_injection(current)
    return True


def remove_injection() -> bool:
    """Undo :func:`install_injection` when moequant's injection is the outermost one (restores the
    implementation it wrapped). Returns whether it removed anything."""
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return False
    previous = getattr(BaseTuner._inject_parameters, "_moequant_previous", None)
    if previous is None:
        return False
    BaseTuner._inject_parameters = previous
    return True


@contextlib.contextmanager
def quantized_experts_injection():
    """Within: ``get_peft_model`` wraps quantized experts first (see :func:`install_injection`);
    on exit, even on error, ``BaseTuner._inject_parameters`` is what it was on entry."""
    installed = install_injection()
    try:
        yield
    finally:
        if installed:
            remove_injection()


def _get_nb_trainable_parameters(self) -> tuple[int, int]:
    """PEFT's count, with each NF4 stack counted as its logical weights rather than its packed bytes."""
    trainable, total = _ORIGINALS["get_nb_trainable_parameters"](self)
    for module in self.modules():
        layout = getattr(module, "_moequant_layout", None)
        for name in layout.weight_names if layout is not None else ():
            if is_quantized(module, name):
                total += nf4_stack_of(module, name).shape.numel() - stored_numel(module, name)
    return trainable, total


def patch_peft() -> bool:
    """Install the moequant behaviour of PEFT's ``ParamWrapper`` (idempotent); False without PEFT."""
    if _ORIGINALS:
        install_injection()  # again: a library may have replaced BaseTuner._inject_parameters since
        return True
    try:
        from peft import PeftModel
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    _ORIGINALS.update(
        get_param=ParamWrapper.get_param,
        _activate_lora=ParamWrapper._activate_lora,
        merge=ParamWrapper.merge,
        get_nb_trainable_parameters=PeftModel.get_nb_trainable_parameters,
    )
    ParamWrapper.get_param = _get_param
    ParamWrapper._activate_lora = _activate_lora
    ParamWrapper.merge = _merge
    install_injection()
    PeftModel.get_nb_trainable_parameters = _get_nb_trainable_parameters
    logger.debug("moequant: PEFT ParamWrapper patched for quantized experts")
    return True
