"""Make a fused expert parameter live as an NF4 stack while it still reads as a dense tensor.

After :func:`quantize_parameter`, ``module.<name>`` is computed by
``torch.nn.utils.parametrize`` from the packed codes (``module.parametrizations.<name>.original``,
a frozen ``uint8`` parameter) and the absmax buffer of the :class:`NF4Parametrization`. Any code
that reads the attribute keeps working; the moequant experts implementation reads the packed data
directly (:func:`nf4_stack_of`) and never materializes the dense stack.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nf4 import NF4Stack, quantize_nf4
from .._ops import ops


class NF4Parametrization(nn.Module):
    """Dequantizes the packed codes it is applied to: ``uint8 [E, N, K/2] -> dtype [E, N, K]``."""

    def __init__(self, absmax: torch.Tensor, shape: torch.Size, blocksize: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("absmax", absmax)
        self.shape = torch.Size(shape)
        self.blocksize = int(blocksize)
        self.dtype = dtype

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return ops.dequant_expert(packed, self.absmax, self.blocksize, self.dtype, None)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() would cast the float32 absmax like any float buffer; the NF4
        # format defines it as float32, so only its device follows. The dtype the stack reads as
        # follows the conversion, as a dense parameter's would.
        absmax = self.absmax
        super()._apply(fn, recurse)
        if self.absmax.dtype != torch.float32:
            self.absmax = absmax.to(self.absmax.device)
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, blocksize={self.blocksize}, dtype={self.dtype}"


def is_quantized(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is an NF4 stack parametrized by moequant."""
    if not parametrize.is_parametrized(module, name):
        return False
    return any(isinstance(p, NF4Parametrization) for p in module.parametrizations[name])


def _nf4_parametrization(module: nn.Module, name: str) -> NF4Parametrization:
    for p in module.parametrizations[name]:
        if isinstance(p, NF4Parametrization):
            return p
    raise ValueError(f"{type(module).__name__}.{name} is not quantized by moequant")


def nf4_stack_of(module: nn.Module, name: str) -> NF4Stack:
    """The packed stack behind a quantized parameter, without dequantizing anything."""
    p = _nf4_parametrization(module, name)
    return NF4Stack(module.parametrizations[name].original, p.absmax, p.shape, p.blocksize, p.dtype)


def quantize_parameter(module: nn.Module, name: str, blocksize: int = 64, stack: Optional[NF4Stack] = None) -> NF4Stack:
    """Replace ``module.<name>`` (a float tensor ``[E, N, K]``) by its NF4 stack, parametrized to read dense.

    The dense tensor is dropped from the module before returning, so it is freed as soon as the
    caller lets go of it. Pass ``stack`` to install an already-quantized stack instead.
    """
    weight = getattr(module, name)
    if stack is None:
        if weight.dim() != 3 or not weight.is_floating_point():
            raise ValueError(
                f"moequant quantizes 3-D float expert tensors [E, N, K]; {type(module).__name__}.{name} is "
                f"{weight.dtype} with shape {tuple(weight.shape)}"
            )
        num_experts, n, k = weight.shape
        if (n * k) % blocksize != 0 or k % 2 != 0:
            raise ValueError(
                f"{type(module).__name__}.{name} has shape {tuple(weight.shape)}: NF4 needs an even last dimension "
                f"and N*K ({n * k}) divisible by blocksize ({blocksize})"
            )
        stack = quantize_nf4(weight.detach(), blocksize)
    del weight
    # The packed codes replace the dense parameter under the same name, so that parametrize keeps
    # them as `parametrizations.<name>.original` (frozen: the base weights never train).
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(stack.packed, requires_grad=False))
    parametrize.register_parametrization(
        module, name, NF4Parametrization(stack.absmax, stack.shape, stack.blocksize, stack.dtype), unsafe=True
    )
    return stack


def dequantize_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """Undo :func:`quantize_parameter`: ``module.<name>`` becomes a plain dense parameter again."""
    dense = nf4_stack_of(module, name).dequantize()
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(dense, requires_grad=False))
    return dense
