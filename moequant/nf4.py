"""NF4 expert stacks: the plain-NF4 entry points, kept for existing callers (DESIGN.md §2).

Every format (nf4, fp4, int8, double-quantized statistics) lives in :mod:`moequant.formats`;
``NF4Stack`` is :class:`~moequant.formats.QuantStack`.
"""

from __future__ import annotations

import torch

from .formats import QuantStack, dequant_expert, quantize

NF4Stack = QuantStack

__all__ = ["NF4Stack", "quantize_nf4", "dequant_expert"]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> QuantStack:
    """Quantize ``weight [..., N, K]`` (float32/float16/bfloat16, CPU or CUDA) to plain NF4.

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(weight.flatten(), blocksize,
    quant_type="nf4", compress_statistics=False)`` on its CPU/default backend. Non-contiguous
    inputs are accepted (copied to contiguous first). NaN/Inf are not rejected: a block holding
    NaN gets absmax NaN and code 15 everywhere, a block holding ±Inf gets absmax Inf (the Inf
    itself encodes as 15, every finite value as 7) — exactly what bitsandbytes stores.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_nf4: weight must be a torch.Tensor, got {type(weight).__name__}")
    return quantize(weight, "nf4", blocksize, double_quant=False)
