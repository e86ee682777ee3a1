"""Typed entry point of the fused experts op (DESIGN.md §3)."""

from __future__ import annotations

from typing import Optional

import torch

from ._ops import ops
from .formats import QuantStack


def experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: QuantStack,
    down: QuantStack,
    *,
    activation: str = "silu",
    transposed: bool = False,
    interleaved: bool = False,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    gate_up_lora: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
    down_lora: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
    act_alpha: float = 1.702,
    act_limit: float = 7.0,
) -> torch.Tensor:
    """The routed, gated experts MLP computed from quantized stacks: ``[T, H] -> [T, H]``.

    Args:
        hidden_states: ``[T, H]`` activations (float32/float16/bfloat16; float64 on CPU).
        top_k_index: ``[T, k]`` expert ids (int64 or int32); ids ``>= E`` contribute zero.
        top_k_weights: ``[T, k]`` routing weights.
        gate_up, down: the quantized stacks, logical ``[E, 2I, H]`` and ``[E, H, I]``
            (``[E, H, 2I]`` and ``[E, I, H]`` when ``transposed``), in one quant_type (each may or
            may not have double-quantized statistics).
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"swiglu_oai"`` (gpt-oss).
        interleaved: gate/up in even/odd output features instead of two halves.
        gate_up_bias, down_bias: optional ``[E, 2I]`` and ``[E, H]`` biases (frozen).
        gate_up_lora, down_lora: optional ``(A [E, r, in], B [E, out, r], scaling)``; the
            weight used is ``W + scaling * B @ A``, computed factored (no ``[E, out, in]`` delta).

    Differentiable w.r.t. ``hidden_states``, ``top_k_weights`` and the LoRA factors; the backward
    recomputes dequantized weights from the packed stacks.
    """
    for name, stack in (("gate_up", gate_up), ("down", down)):
        if not isinstance(stack, QuantStack):
            raise TypeError(f"experts_forward: {name} must be a QuantStack, got {type(stack).__name__}")
    if gate_up.quant_type != down.quant_type:
        raise ValueError(
            f"experts_forward: gate_up and down must share a quant_type, got {gate_up.quant_type!r} and "
            f"{down.quant_type!r}"
        )
    if gate_up.quant_type != "int8" and gate_up.blocksize != down.blocksize:
        raise ValueError(
            f"experts_forward: gate_up and down must share a blocksize, got {gate_up.blocksize} and {down.blocksize}"
        )
    gu_a, gu_b, gu_s = gate_up_lora if gate_up_lora is not None else (None, None, 1.0)
    d_a, d_b, d_s = down_lora if down_lora is not None else (None, None, 1.0)
    return ops.experts_forward(*experts_op_args(
        hidden_states, top_k_index, top_k_weights, gate_up.packed, gate_up.absmax, down.packed, down.absmax,
        blocksize=gate_up.blocksize, activation=activation, transposed=transposed, interleaved=interleaved,
        gate_up_bias=gate_up_bias, down_bias=down_bias, gate_up_lora_A=gu_a, gate_up_lora_B=gu_b,
        gate_up_lora_scaling=float(gu_s), down_lora_A=d_a, down_lora_B=d_b, down_lora_scaling=float(d_s),
        act_alpha=act_alpha, act_limit=act_limit, quant_type=gate_up.quant_type,
        **gate_up.op_kwargs("gate_up_"), **down.op_kwargs("down_"),
    ))


def experts_op_args(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_packed: torch.Tensor,
    gate_up_absmax: torch.Tensor,
    down_packed: torch.Tensor,
    down_absmax: torch.Tensor,
    blocksize: int = 64,
    activation: str = "silu",
    transposed: bool = False,
    interleaved: bool = False,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    gate_up_lora_A: Optional[torch.Tensor] = None,
    gate_up_lora_B: Optional[torch.Tensor] = None,
    gate_up_lora_scaling: float = 1.0,
    down_lora_A: Optional[torch.Tensor] = None,
    down_lora_B: Optional[torch.Tensor] = None,
    down_lora_scaling: float = 1.0,
    act_alpha: float = 1.702,
    act_limit: float = 7.0,
    quant_type: str = "nf4",
    gate_up_absmax_scale: Optional[torch.Tensor] = None,
    gate_up_absmax_offset: Optional[torch.Tensor] = None,
    down_absmax_scale: Optional[torch.Tensor] = None,
    down_absmax_offset: Optional[torch.Tensor] = None,
) -> tuple:
    """The arguments of ``torch.ops.moequant.experts_forward`` (and ``_experts_forward_train``) as
    one positional tuple in schema order, from the schema's own names and defaults.

    ``torch.ops`` matches keyword arguments by name against the whole schema on every call, which
    costs the host a few microseconds per call more than positional arguments (7-11% of a
    one-token call on an H200 host, ``benchmarks/bench_call_overhead.py``), and an eager decode
    step waits on exactly that. Callers on hot paths pass ``*experts_op_args(...)``;
    ``tests/test_experts.py`` checks that this signature matches the registered schema.
    """
    return (hidden_states, top_k_index, top_k_weights, gate_up_packed, gate_up_absmax, down_packed, down_absmax,
            blocksize, activation, transposed, interleaved, gate_up_bias, down_bias, gate_up_lora_A,
            gate_up_lora_B, gate_up_lora_scaling, down_lora_A, down_lora_B, down_lora_scaling, act_alpha,
            act_limit, quant_type, gate_up_absmax_scale, gate_up_absmax_offset, down_absmax_scale,
            down_absmax_offset)
