"""NF4 expert stacks: quantize a fused expert weight and read it back (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._ops import ops

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NF4Stack:
    """A weight ``[..., N, K]`` quantized to NF4 (bitsandbytes' layout, no double quantization).

    Attributes:
        packed: ``uint8 [..., N, K/2]``; element ``2j`` in the high nibble, ``2j+1`` in the low one.
        absmax: ``float32 [..., N*K/blocksize]``; ``max |w|`` of each block of the row-major
            flattening of one matrix (a block never straddles two experts).
        shape: the logical shape ``[..., N, K]``.
        blocksize: elements per absmax block (a power of two in [32, 4096]).
        dtype: the dtype the weight had, which :meth:`dequantize` returns by default.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int
    dtype: torch.dtype

    @property
    def num_experts(self) -> int:
        return self.shape[0] if len(self.shape) >= 3 else 1

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        """Bytes held: packed codes plus absmax."""
        return self.packed.numel() * self.packed.element_size() + self.absmax.numel() * 4

    def dequantize(self, dtype: Optional[torch.dtype] = None, expert: Optional[int] = None) -> torch.Tensor:
        """The dequantized stack ``[..., N, K]``, or one expert ``[N, K]`` when ``expert`` is given."""
        return dequant_expert(self, expert=expert, dtype=dtype or self.dtype)

    def to(self, device) -> "NF4Stack":
        return NF4Stack(self.packed.to(device), self.absmax.to(device), self.shape, self.blocksize, self.dtype)

    def state_dict(self) -> dict:
        """Plain tensors and ints, so the stack saves with ``torch.save`` and ``weights_only=True`` loads."""
        return {
            "packed": self.packed,
            "absmax": self.absmax,
            "shape": torch.tensor(list(self.shape), dtype=torch.int64),
            "blocksize": torch.tensor(self.blocksize, dtype=torch.int64),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "NF4Stack":
        dtype = getattr(torch, state["dtype"], None)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"NF4Stack.from_state_dict: unsupported dtype {state['dtype']!r}")
        stack = cls(
            state["packed"],
            state["absmax"],
            torch.Size(state["shape"].tolist()),
            int(state["blocksize"]),
            dtype,
        )
        _check_stack(stack)
        return stack


def _check_stack(stack: NF4Stack) -> None:
    *lead, n, k = stack.shape
    if tuple(stack.packed.shape) != (*lead, n, k // 2):
        raise ValueError(f"NF4Stack: packed has shape {tuple(stack.packed.shape)}, expected {(*lead, n, k // 2)}")
    if tuple(stack.absmax.shape) != (*lead, n * k // stack.blocksize):
        raise ValueError(
            f"NF4Stack: absmax has shape {tuple(stack.absmax.shape)}, expected {(*lead, n * k // stack.blocksize)}"
        )


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> NF4Stack:
    """Quantize ``weight [..., N, K]`` (float32/float16/bfloat16, CPU or CUDA) to NF4.

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(weight.flatten(), blocksize,
    quant_type="nf4", compress_statistics=False)`` on its CPU/default backend. Non-contiguous
    inputs are accepted (copied to contiguous first). NaN/Inf are not rejected: a block holding
    NaN gets absmax NaN and code 15 everywhere, a block holding ±Inf gets absmax Inf (the Inf
    itself encodes as 15, every finite value as 7) — exactly what bitsandbytes stores.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_nf4: weight must be a torch.Tensor, got {type(weight).__name__}")
    packed, absmax = ops.quantize_nf4(weight, blocksize)
    return NF4Stack(packed, absmax, weight.shape, blocksize, weight.dtype)


def dequant_expert(
    stack: NF4Stack, expert: Optional[int] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Dequantize one expert (``[N, K]``) or, with ``expert=None``, the whole stack.

    Each value is ``fp32(NF4[code] * absmax)`` rounded to nearest-even into ``dtype``
    (default: the dtype the stack was quantized from).
    """
    if not isinstance(stack, NF4Stack):
        raise TypeError(f"dequant_expert: stack must be an NF4Stack, got {type(stack).__name__}")
    return ops.dequant_expert(stack.packed, stack.absmax, stack.blocksize, dtype or stack.dtype, expert)
