"""Plain-PyTorch reference of the experts ops: the definition the kernels are tested against.

Slow (dequantizes whole stacks, loops over experts) and differentiable by ordinary autograd;
never used on a hot path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._ops import ops

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")


def gated_activation(
    h: torch.Tensor, activation: str, interleaved: bool, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """``[S, 2I] -> [S, I]``: split gate/up (halves, or even/odd columns) and gate."""
    if interleaved:
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "swiglu_oai":  # gpt-oss: clamped SwiGLU with (up + 1)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _project(x, w, transposed, bias, lora_a, lora_b, scaling):
    """``x [n, in]`` through one expert's weight (``[out, in]``, or ``[in, out]`` if transposed)."""
    y = x @ w if transposed else x @ w.t()
    if bias is not None:
        y = y + bias
    if lora_a is not None:
        y = y + scaling * ((x @ lora_a.t()) @ lora_b.t())
    return y


def experts_forward_reference(
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
) -> torch.Tensor:
    """What ``torch.ops.moequant.experts_forward`` computes, in ``compute_dtype`` arithmetic.

    For every token t and slot j with ``e = top_k_index[t, j]``:
    ``h = x W_gu[e]^T + b_gu[e] + s_gu (x A_gu[e]^T) B_gu[e]^T``, ``a = act(h)``,
    ``y = a W_d[e]^T + b_d[e] + s_d (a A_d[e]^T) B_d[e]^T``, ``out[t] += top_k_weights[t, j] * y``.
    Slots with ``e >= E`` (expert-parallel sentinels) contribute zero. ``W`` are the dequantized
    stacks in their format (``quant_type``, plain or double-quantized statistics; ``[E, out, in]``,
    or ``[E, in, out]`` when ``transposed``). Arithmetic is fp32
    (fp64 for fp64 inputs); the result has ``hidden_states.dtype``.
    """
    compute = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    num_experts = gate_up_packed.shape[0]
    w_gu = ops.dequant_expert(gate_up_packed, gate_up_absmax, blocksize, torch.float32, None, quant_type,
                              gate_up_absmax_scale, gate_up_absmax_offset).to(compute)
    w_d = ops.dequant_expert(down_packed, down_absmax, blocksize, torch.float32, None, quant_type,
                             down_absmax_scale, down_absmax_offset).to(compute)
    x_all = hidden_states.to(compute)
    out = torch.zeros_like(x_all)

    def opt(t, e):
        return None if t is None else t[e].to(compute)

    for e in range(num_experts):
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        x = x_all[tok]
        h = _project(x, w_gu[e], transposed, opt(gate_up_bias, e), opt(gate_up_lora_A, e),
                     opt(gate_up_lora_B, e), gate_up_lora_scaling)
        a = gated_activation(h, activation, interleaved, act_alpha, act_limit)
        y = _project(a, w_d[e], transposed, opt(down_bias, e), opt(down_lora_A, e),
                     opt(down_lora_B, e), down_lora_scaling)
        out = out.index_add(0, tok, y * top_k_weights[tok, slot].to(compute).unsqueeze(-1))
    return out.to(hidden_states.dtype)
