"""Quantized expert stacks in every storage format (see the README's Formats section and DESIGN.md §2).

============  ==============================  ====================================================
quant_type    packed                          statistics
============  ==============================  ====================================================
``"nf4"``     ``uint8 [..., N, K/2]``         fp32 absmax ``[..., N*K/B]``, or double-quantized
``"fp4"``     ``uint8 [..., N, K/2]``         the same (bitsandbytes' fp4 codebook)
``"int8"``    ``int8 [..., N, K]``            fp32 absmax ``[..., N]``, one per output row
============  ==============================  ====================================================

Double-quantized statistics (4-bit only, bitsandbytes ``compress_statistics=True`` per matrix):
``absmax`` becomes ``uint8 [..., nb]`` dynamic-map codes, with ``absmax_scale fp32 [...,
ceil(nb/256)]`` and ``absmax_offset fp32 [...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._ops import ops

QUANT_TYPES = ("nf4", "fp4", "int8")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOUBLE_QUANT_GROUP = 256  # blocks per fp32 scale of double-quantized statistics


def check_format(quant_type: str, double_quant: Optional[bool], where: str = "quantize") -> bool:
    """Validate a (quant_type, double_quant) request; returns double_quant with None resolved
    (True for 4-bit formats, False for int8)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{where}: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if double_quant is None:
        return quant_type != "int8"
    if double_quant and quant_type == "int8":
        raise ValueError(
            f"{where}: double_quant=True needs a 4-bit quant_type ('nf4' or 'fp4'); quant_type='int8' keeps one fp32 "
            "absmax per row and has no double-quantized statistics"
        )
    return bool(double_quant)


def format_name(quant_type: str, double_quant: bool) -> str:
    """``"nf4"``, ``"nf4+dq"``, ``"fp4+dq"``, ``"int8"``, …"""
    return f"{quant_type}+dq" if double_quant else quant_type


def stack_nbytes(shape, blocksize: int, quant_type: str = "nf4", double_quant: bool = False) -> int:
    """Bytes of a stack of logical ``shape [..., N, K]`` in a format (codes plus statistics)."""
    *lead, n, k = shape
    matrices = 1
    for d in lead:
        matrices *= d
    if quant_type == "int8":
        return matrices * (n * k + 4 * n)
    blocks = n * k // blocksize
    if double_quant:
        stats = blocks + 4 * (-(-blocks // DOUBLE_QUANT_GROUP)) + 4
    else:
        stats = 4 * blocks
    return matrices * (n * k // 2 + stats)


@dataclass(frozen=True)
class QuantStack:
    """A weight ``[..., N, K]`` quantized in one of :data:`QUANT_TYPES` (bitsandbytes' layouts).

    Attributes:
        packed: ``uint8 [..., N, K/2]`` 4-bit codes (element ``2j`` in the high nibble), or
            ``int8 [..., N, K]`` for ``"int8"``.
        absmax: the statistics: ``float32 [..., N*K/blocksize]`` per block (4-bit), ``uint8`` codes
            of the same shape when double-quantized, or ``float32 [..., N]`` per row (int8).
        shape: the logical shape ``[..., N, K]``.
        blocksize: elements per block of a 4-bit stack (ignored by int8).
        dtype: the dtype the weight had, which :meth:`dequantize` returns by default.
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        absmax_scale, absmax_offset: ``float32 [..., ceil(nb/256)]`` and ``float32 [...]`` of
            double-quantized statistics, else None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int
    dtype: torch.dtype
    quant_type: str = "nf4"
    absmax_scale: Optional[torch.Tensor] = None
    absmax_offset: Optional[torch.Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def format(self) -> str:
        return format_name(self.quant_type, self.double_quant)

    @property
    def num_experts(self) -> int:
        return self.shape[0] if len(self.shape) >= 3 else 1

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the stack holds."""
        return [t for t in (self.packed, self.absmax, self.absmax_scale, self.absmax_offset) if t is not None]

    def nbytes(self) -> int:
        """Bytes held: codes plus all statistics."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def bytes_per_weight(self) -> float:
        return self.nbytes() / max(self.shape.numel(), 1)

    def dequantize(self, dtype: Optional[torch.dtype] = None, expert: Optional[int] = None) -> torch.Tensor:
        """The dequantized stack ``[..., N, K]``, or one expert ``[N, K]`` when ``expert`` is given."""
        return dequant_expert(self, expert=expert, dtype=dtype or self.dtype)

    def to(self, device) -> "QuantStack":
        def move(t):
            return None if t is None else t.to(device)

        return QuantStack(move(self.packed), move(self.absmax), self.shape, self.blocksize, self.dtype,
                          self.quant_type, move(self.absmax_scale), move(self.absmax_offset))

    def op_kwargs(self, prefix: str = "") -> dict:
        """The statistics arguments of the ops for this stack (``prefix``: ``"gate_up_"``/``"down_"``)."""
        return {f"{prefix}absmax_scale": self.absmax_scale, f"{prefix}absmax_offset": self.absmax_offset}

    def state_dict(self) -> dict:
        """Plain tensors, ints and strings, so the stack saves with ``torch.save`` and ``weights_only=True`` loads."""
        state = {
            "packed": self.packed,
            "absmax": self.absmax,
            "shape": torch.tensor(list(self.shape), dtype=torch.int64),
            "blocksize": torch.tensor(self.blocksize, dtype=torch.int64),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quant_type": self.quant_type,
        }
        if self.double_quant:
            state["absmax_scale"] = self.absmax_scale
            state["absmax_offset"] = self.absmax_offset
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict, quant_type: Optional[str] = None, double_quant: Optional[bool] = None
    ) -> "QuantStack":
        """Rebuild a stack; ``quant_type`` / ``double_quant``, when given, are what the caller expects,
        and a stack saved in another format is a ``ValueError`` (states without ``quant_type`` are NF4)."""
        missing = [key for key in ("packed", "absmax", "shape", "blocksize", "dtype") if key not in state]
        if "absmax_scale" in state and "absmax_offset" not in state:
            missing.append("absmax_offset")  # double-quantized statistics travel as a pair
        if missing:
            raise ValueError(
                f"QuantStack.from_state_dict: the state lacks {', '.join(map(repr, missing))}; "
                f"it has {sorted(state)} (a QuantStack.state_dict() holds packed, absmax, shape, blocksize, dtype, "
                f"quant_type, and absmax_scale/absmax_offset when double-quantized)"
            )
        dtype = getattr(torch, state["dtype"], None)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"QuantStack.from_state_dict: unsupported dtype {state['dtype']!r}")
        saved_type = state.get("quant_type", "nf4")
        if saved_type not in QUANT_TYPES:
            raise ValueError(f"QuantStack.from_state_dict: unknown quant_type {saved_type!r} in the state")
        saved_dq = "absmax_scale" in state
        if quant_type is not None and quant_type != saved_type:
            raise ValueError(
                f"QuantStack.from_state_dict: the stack was saved as {format_name(saved_type, saved_dq)!r}, "
                f"not quant_type={quant_type!r}"
            )
        if double_quant is not None and bool(double_quant) != saved_dq:
            raise ValueError(
                f"QuantStack.from_state_dict: the stack was saved {'with' if saved_dq else 'without'} double-quantized "
                f"statistics ({format_name(saved_type, saved_dq)!r}), but double_quant={double_quant} was asked for"
            )
        stack = cls(
            state["packed"],
            state["absmax"],
            torch.Size(state["shape"].tolist()),
            int(state["blocksize"]),
            dtype,
            saved_type,
            state.get("absmax_scale"),
            state.get("absmax_offset"),
        )
        check_stack(stack)
        return stack


def check_stack(stack: QuantStack) -> None:
    """``ValueError`` naming the tensor whose dtype or shape does not fit the stack's format."""
    *lead, n, k = stack.shape
    lead = tuple(lead)
    four_bit = stack.quant_type != "int8"
    packed_shape = (*lead, n, k // 2) if four_bit else (*lead, n, k)
    packed_dtype = torch.uint8 if four_bit else torch.int8
    if stack.packed.dtype != packed_dtype or tuple(stack.packed.shape) != packed_shape:
        raise ValueError(f"QuantStack ({stack.quant_type}): packed is {stack.packed.dtype} {tuple(stack.packed.shape)}, "
                         f"expected {packed_dtype} {packed_shape}")
    blocks = n * k // stack.blocksize if four_bit else n
    absmax_dtype = torch.uint8 if stack.double_quant else torch.float32
    if stack.absmax.dtype != absmax_dtype or tuple(stack.absmax.shape) != (*lead, blocks):
        raise ValueError(f"QuantStack ({stack.format}): absmax is {stack.absmax.dtype} {tuple(stack.absmax.shape)}, "
                         f"expected {absmax_dtype} {(*lead, blocks)}")
    if (stack.absmax_scale is None) != (stack.absmax_offset is None):
        raise ValueError("QuantStack: absmax_scale and absmax_offset go together (double-quantized statistics)")
    if stack.double_quant:
        if not four_bit:
            raise ValueError("QuantStack: int8 stacks have no double-quantized statistics")
        groups = -(-blocks // DOUBLE_QUANT_GROUP)
        for name, t, shape in (("absmax_scale", stack.absmax_scale, (*lead, groups)),
                               ("absmax_offset", stack.absmax_offset, lead)):
            if t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ValueError(f"QuantStack: {name} is {t.dtype} {tuple(t.shape)}, expected float32 {shape}")


def compress_statistics(stack: QuantStack) -> QuantStack:
    """The same stack with double-quantized statistics (bitsandbytes ``compress_statistics=True``,
    per matrix). Bit-identical to quantizing with ``double_quant=True``."""
    if stack.quant_type == "int8":
        raise ValueError("compress_statistics: int8 stacks have no double-quantized statistics")
    if stack.double_quant:
        return stack
    codes, scale, offset = ops.compress_statistics(stack.absmax)
    return QuantStack(stack.packed, codes, stack.shape, stack.blocksize, stack.dtype, stack.quant_type, scale, offset)


def quantize(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: Optional[bool] = None
) -> QuantStack:
    """Quantize ``weight [..., N, K]`` (float32/float16/bfloat16, CPU or CUDA).

    Each matrix is bit-identical to bitsandbytes 0.50.2's CPU/default backend on that matrix:
    ``quantize_4bit(w.flatten(), blocksize, quant_type, compress_statistics=double_quant)`` for
    ``"nf4"``/``"fp4"``, ``int8_vectorwise_quant(w)`` for ``"int8"`` (``blocksize`` ignored).
    ``double_quant=None`` means True for the 4-bit formats and False for int8.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize: weight must be a torch.Tensor, got {type(weight).__name__}")
    double_quant = check_format(quant_type, double_quant)
    packed, absmax = ops.quantize_nf4(weight, blocksize, quant_type)
    stack = QuantStack(packed, absmax, weight.shape, blocksize, weight.dtype, quant_type)
    return compress_statistics(stack) if double_quant else stack


def dequant_expert(
    stack: QuantStack, expert: Optional[int] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Dequantize one expert (``[N, K]``) or, with ``expert=None``, the whole stack.

    4-bit: ``fp32(code[q] * absmax)`` with absmax decoded from double-quantized statistics when
    present; int8: ``fp32(fp32(q * row_absmax) * fp32(1/127))``; rounded to nearest-even into ``dtype``
    (default: the dtype the stack was quantized from).
    """
    if not isinstance(stack, QuantStack):
        raise TypeError(f"dequant_expert: stack must be a QuantStack, got {type(stack).__name__}")
    return ops.dequant_expert(stack.packed, stack.absmax, stack.blocksize, dtype or stack.dtype, expert,
                              stack.quant_type, stack.absmax_scale, stack.absmax_offset)
