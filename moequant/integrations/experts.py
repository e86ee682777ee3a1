"""The "moequant" experts implementation for transformers' ``ExpertsInterface``.

transformers' ``@use_experts_implementation`` experts modules dispatch their forward through
``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]``. :func:`moequant_experts_forward` is
registered there as "moequant": it hands the packed NF4 stacks (and, while PEFT LoRA is active,
the low-rank factors) to ``torch.ops.moequant.experts_forward``, so neither a dense stack nor an
``[E, N, K]`` LoRA delta is ever built.

Only experts whose math moequant reproduces are accepted: :func:`experts_layout` reads every flag
of ``@use_experts_implementation`` and every attribute transformers' reference forwards
(``grouped_mm``/``batched_mm``) read, and refuses, naming the module and the flag, anything outside
an explicit allow-list, so that a flag added by a newer transformers is an error, never ignored.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..experts import experts_op_args
from .parametrize import quant_stack_or_none

logger = logging.getLogger(__name__)

IMPLEMENTATION_NAME = "moequant"
# Used for experts modules of the same model that moequant did not quantize (the config, and so
# the chosen implementation, is shared by every experts module of a model).
FALLBACK_IMPLEMENTATION = "grouped_mm"

# Experts classes whose custom `_apply_gate` is the gpt-oss clamped SwiGLU, ``(up + 1) * gate * sigmoid(alpha * gate)``.
_SWIGLU_OAI_CLASSES = ("GptOssExperts", "OpenAIPrivacyFilterExperts")

# Parameters of transformers' ``use_experts_implementation`` whose meaning moequant implements:
# the layout (is_concatenated, is_transposed), biases, the gate (has_gate=True only) and the
# post-expert norm. A parameter outside this list is accepted only while the module holds its
# default (the math transformers had before the flag existed).
_KNOWN_DECORATOR_FLAGS = frozenset({
    "experts_class", "experts_interface", "is_concatenated", "is_transposed", "has_bias", "has_gate",
    "has_post_expert_norm",
})
# Attributes of the experts module read by transformers' reference forwards (``grouped_mm``,
# ``batched_mm``, the default gate). Any other attribute read there is math moequant does not know.
_KNOWN_REFERENCE_ATTRIBUTES = frozenset({
    "num_experts", "_is_expert_parallel", "config", "has_gate", "has_bias", "is_transposed", "is_concatenated",
    "has_post_expert_norm", "gate_up_proj", "gate_up_proj_bias", "up_proj", "up_proj_bias", "down_proj",
    "down_proj_bias", "_apply_gate", "act_fn", "post_expert_norm",
})
_REFERENCE_FUNCTIONS = ("grouped_mm_experts_forward", "batched_mm_experts_forward", "_default_apply_gate")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores and applies its weights (the op's layout arguments)."""

    gate_up_name: str
    down_name: str
    activation: str
    transposed: bool
    interleaved: bool
    has_bias: bool
    act_alpha: float = 1.702
    act_limit: float = 7.0
    # ``module.post_expert_norm`` applied to each routed pair's output, before its routing weight.
    post_expert_norm: bool = False

    @property
    def weight_names(self) -> tuple[str, str]:
        return (self.gate_up_name, self.down_name)


def _activation_name(act_fn: nn.Module) -> Optional[str]:
    if act_fn is torch.nn.functional.silu:  # a few experts classes hold the function, not a module
        return "silu"
    if act_fn is torch.nn.functional.gelu:
        return "gelu"
    cls = type(act_fn).__name__
    if cls in ("SiLUActivation", "SiLU"):
        return "silu"
    if cls == "GELU":
        return "gelu_tanh" if getattr(act_fn, "approximate", "none") == "tanh" else "gelu"
    if cls == "GELUActivation":
        return "gelu"
    if cls in ("GELUTanh", "NewGELUActivation", "PytorchGELUTanh", "GELUPytorchTanh"):
        return "gelu_tanh"
    return None


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused-experts module (``@use_experts_implementation``)."""
    # Look the weight up without reading it: once quantized, reading down_proj dequantizes the stack.
    has_down = "down_proj" in module._parameters or parametrize.is_parametrized(module, "down_proj")
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and has_down


@functools.lru_cache(maxsize=None)
def _unknown_reference_attributes() -> tuple[tuple[str, str], ...]:
    """``(function, attribute)`` for every ``self.<attribute>`` that transformers' reference experts
    forwards read and moequant does not implement (empty on the transformers versions it supports)."""
    from transformers.integrations import moe

    unknown = []
    for fn_name in _REFERENCE_FUNCTIONS:
        fn = getattr(moe, fn_name, None)
        if fn is None:
            continue
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            unknown.append((fn_name, "<source unavailable>"))
            continue
        for attribute in sorted(set(re.findall(r"\bself\.(\w+)", source)) - _KNOWN_REFERENCE_ATTRIBUTES):
            unknown.append((fn_name, attribute))
    return tuple(unknown)


def _check_known_math(module: nn.Module) -> None:
    """Refuse ``module`` if it uses experts math moequant does not implement (see the allow-lists)."""
    from transformers.integrations import moe

    name = type(module).__name__
    unknown = _unknown_reference_attributes()
    if unknown:
        fn_name, attribute = unknown[0]
        raise ValueError(
            f"{name}: transformers' {fn_name} reads self.{attribute}, which moequant does not implement (this "
            "transformers changed the experts math; moequant refuses rather than computing something else)"
        )
    missing = object()
    for flag, parameter in inspect.signature(moe.use_experts_implementation).parameters.items():
        if flag in _KNOWN_DECORATOR_FLAGS:
            continue
        value = getattr(module, flag, missing)
        if value is missing or value != parameter.default:
            shown = "unset" if value is missing else repr(value)
            raise ValueError(
                f"{name} uses @use_experts_implementation flag {flag}={shown} (default {parameter.default!r}), "
                "which moequant does not implement"
            )
    try:  # the decorator's forward closes over the interface it dispatches through
        interface = inspect.getclosurevars(type(module).forward).nonlocals.get("experts_interface")
    except TypeError:  # not a Python function: not the decorator's
        interface = None
    if interface is not moe.ALL_EXPERTS_FUNCTIONS:
        raise ValueError(
            f"{name}.forward does not dispatch through transformers' ALL_EXPERTS_FUNCTIONS (a subclass overrides "
            "forward, or the class was decorated with another experts_interface); moequant cannot run it"
        )
    _check_forward_not_replaced(module)


def _check_forward_not_replaced(module: nn.Module) -> None:
    """Refuse a module whose instance ``forward`` was replaced (e.g. by a hub kernel's ``kernelize``)."""
    instance_forward = module.__dict__.get("forward")
    if instance_forward is None or getattr(instance_forward, "__func__", None) is type(module).forward:
        return  # kernels' kernelize re-binds the class forward on layers it leaves alone
    replacement = getattr(instance_forward, "__qualname__", repr(instance_forward))
    raise ValueError(
        f"{type(module).__name__}.forward was replaced on the instance by {replacement} (e.g. by a hub kernel's "
        "kernelize); moequant's experts implementation would never run. Load without hub kernels for this module "
        "(USE_HUB_KERNELS=0 or use_kernels=False)"
    )


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """Read the layout of a transformers experts module; raise ``ValueError`` naming what is unsupported."""
    name = type(module).__name__
    if not is_experts_module(module):
        raise ValueError(
            f"{name} is not a transformers fused-experts module (expected the attributes has_gate, is_transposed "
            "and down_proj set by @use_experts_implementation)"
        )
    _check_known_math(module)
    if not module.has_gate:
        raise ValueError(
            f"{name} has no gate (has_gate=False, an up_proj-only MLP); moequant supports gated experts only"
        )
    transposed = bool(module.is_transposed)
    interleaved = not bool(getattr(module, "is_concatenated", True))
    has_bias = bool(module.has_bias)
    from transformers.integrations.moe import _default_apply_gate

    custom_gate = getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate
    if custom_gate:
        if name not in _SWIGLU_OAI_CLASSES:
            raise ValueError(
                f"{name} defines its own _apply_gate; moequant supports the default gate (act_fn(gate) * up) and the "
                f"gpt-oss clamped SwiGLU of {_SWIGLU_OAI_CLASSES}"
            )
        activation = "swiglu_oai"
        alpha, limit = float(module.alpha), float(module.limit)
    else:
        if interleaved:  # the default gate splits [gate; up] halves whatever the flag says: ambiguous
            raise ValueError(
                f"{name} sets is_concatenated=False (interleaved gate/up) but uses the default _apply_gate, which "
                "splits gate_up into halves; moequant refuses the ambiguous layout"
            )
        activation = _activation_name(getattr(module, "act_fn", None))
        if activation is None:
            raise ValueError(
                f"{name}.act_fn is {type(getattr(module, 'act_fn', None)).__name__}; moequant supports SiLU, GELU "
                "and tanh-GELU gates"
            )
        alpha, limit = 1.702, 7.0
    post_expert_norm = bool(getattr(module, "has_post_expert_norm", False))
    if post_expert_norm and not isinstance(getattr(module, "post_expert_norm", None), nn.Module):
        raise ValueError(f"{name} has has_post_expert_norm=True but no post_expert_norm module")
    return ExpertsLayout(
        "gate_up_proj", "down_proj", activation, transposed, interleaved, has_bias, alpha, limit, post_expert_norm
    )


def _lora_kwargs(module: nn.Module, name: str, prefix: str) -> dict:
    """The op's LoRA arguments for projection ``name`` while a PEFT adapter is active (see peft.py)."""
    factors = getattr(module, "_moequant_lora", {}).get(name)
    if factors is None:
        return {}
    lora_a, lora_b, scaling = factors
    return {f"{prefix}_lora_A": lora_a, f"{prefix}_lora_B": lora_b, f"{prefix}_lora_scaling": float(scaling)}


def moequant_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` entry: ``[T, H]`` tokens routed to ``top_k_index [T, k]`` -> ``[T, H]``."""
    layout: Optional[ExpertsLayout] = getattr(self, "_moequant_layout", None)
    gate_up = None if layout is None else quant_stack_or_none(self, layout.gate_up_name)
    down = None if layout is None else quant_stack_or_none(self, layout.down_name)
    if gate_up is None or down is None:  # not quantized, or dequantized since (merge)
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        fallback = ALL_EXPERTS_FUNCTIONS.get(FALLBACK_IMPLEMENTATION)
        return fallback(self, hidden_states, top_k_index, top_k_weights)
    if gate_up.blocksize != down.blocksize:
        raise ValueError(
            f"{type(self).__name__}: gate_up and down stacks use blocksizes {gate_up.blocksize} and {down.blocksize}; "
            "moequant needs one blocksize per experts module"
        )
    kwargs = {}
    if layout.has_bias:
        kwargs["gate_up_bias"] = getattr(self, f"{layout.gate_up_name}_bias")
        kwargs["down_bias"] = getattr(self, f"{layout.down_name}_bias")
    kwargs.update(_lora_kwargs(self, layout.gate_up_name, "gate_up"))
    kwargs.update(_lora_kwargs(self, layout.down_name, "down"))
    if layout.post_expert_norm:
        # transformers normalizes each routed pair's expert output before weighting it, so the op
        # runs once per (token, slot) pair with weight 1, and the norm and routing weights follow.
        num_tokens, top_k = top_k_index.shape
        routing_weights, out_dtype = top_k_weights, hidden_states.dtype
        hidden_states = hidden_states.repeat_interleave(top_k, dim=0)
        top_k_index = top_k_index.reshape(num_tokens * top_k, 1)
        top_k_weights = torch.ones_like(top_k_index, dtype=top_k_weights.dtype)
    # Positional (experts_op_args): torch.ops' keyword matching costs microseconds per call.
    out = torch.ops.moequant.experts_forward(*experts_op_args(
        hidden_states,
        top_k_index,
        top_k_weights,
        gate_up.packed,
        gate_up.absmax,
        down.packed,
        down.absmax,
        blocksize=gate_up.blocksize,
        activation=layout.activation,
        transposed=layout.transposed,
        interleaved=layout.interleaved,
        act_alpha=layout.act_alpha,
        act_limit=layout.act_limit,
        quant_type=gate_up.quant_type,  # one format per module (quantize_experts_module)
        **gate_up.op_kwargs("gate_up_"),
        **down.op_kwargs("down_"),
        **kwargs,
    ))
    if layout.post_expert_norm:
        pair_out = self.post_expert_norm(out).view(num_tokens, top_k, -1)
        return (pair_out * routing_weights.unsqueeze(-1)).sum(dim=1).to(out_dtype)
    return out


def register_experts_implementation() -> None:
    """Register "moequant" in transformers' ``ALL_EXPERTS_FUNCTIONS`` (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, moequant_experts_forward)


def select_experts_implementation(module: nn.Module) -> None:
    """Make ``module`` (and every experts module sharing its config) dispatch to "moequant"."""
    _check_forward_not_replaced(module)  # again here: from_pretrained kernelizes after the layout check
    register_experts_implementation()
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"{type(module).__name__} has no .config; cannot select the moequant experts implementation")
    if config._experts_implementation != IMPLEMENTATION_NAME:
        logger.debug("experts implementation %r -> %r", config._experts_implementation, IMPLEMENTATION_NAME)
        config._experts_implementation = IMPLEMENTATION_NAME
