"""Make a fused expert parameter live as a quantized stack while it still reads as a dense tensor.

After :func:`quantize_parameter`, ``module.<name>`` is computed by
``torch.nn.utils.parametrize`` from the packed codes (``module.parametrizations.<name>.original``,
a frozen ``uint8``/``int8`` parameter) and the statistics of the :class:`QuantParametrization`
(``absmax``, and ``absmax_scale``/``absmax_offset`` when double-quantized). Any code that reads the
attribute keeps working; the moequant experts implementation reads the packed data directly
(:func:`quant_stack_of`) and never materializes the dense stack.

The statistics are frozen parameters, not buffers, although they never train: like the packed
codes they are per-expert data (leading dim ``E``), and parameter-sharding wrappers (FSDP2's
``fully_shard``, ZeRO-3) shard parameters only; as buffers every rank would hold them whole. The
state-dict keys are the same either way (``….parametrizations.<name>.0.absmax``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._ops import ops
from ..formats import QuantStack, check_format, quantize

# Names of the statistics a quantized stack may carry (parameters of its parametrization).
STATISTICS = ("absmax", "absmax_scale", "absmax_offset")


class QuantParametrization(nn.Module):
    """Dequantizes the packed codes it is applied to: ``[E, N, K/2]`` (int8: ``[E, N, K]``) ``-> dtype [E, N, K]``."""

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size,
        blocksize: int,
        dtype: torch.dtype,
        quant_type: str = "nf4",
        absmax_scale: Optional[torch.Tensor] = None,
        absmax_offset: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.absmax = nn.Parameter(absmax, requires_grad=False)
        if absmax_scale is not None:  # double-quantized statistics
            self.absmax_scale = nn.Parameter(absmax_scale, requires_grad=False)
            self.absmax_offset = nn.Parameter(absmax_offset, requires_grad=False)
        self.shape = torch.Size(shape)
        self.blocksize = int(blocksize)
        self.dtype = dtype
        self.quant_type = quant_type

    @property
    def double_quant(self) -> bool:
        return "absmax_scale" in self._parameters

    def statistics(self) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.absmax, self._parameters.get("absmax_scale"), self._parameters.get("absmax_offset")

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        absmax, scale, offset = self.statistics()
        return ops.dequant_expert(packed, absmax, self.blocksize, self.dtype, None, self.quant_type, scale, offset)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() would cast the float32 statistics like any float parameter;
        # the formats define them as float32 (or uint8 codes), so only their device follows. The
        # dtype the stack reads as follows the conversion, as a dense parameter's would.
        before = {name: self._parameters[name].data for name in STATISTICS if name in self._parameters}
        super()._apply(fn, recurse)
        for name, old in before.items():
            param = self._parameters[name]
            if param.dtype != old.dtype:
                param.data = old.to(param.device)
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        fmt = f"{self.quant_type}{'+dq' if self.double_quant else ''}"
        return f"format={fmt}, shape={tuple(self.shape)}, blocksize={self.blocksize}, dtype={self.dtype}"


# The NF4-only name of earlier versions.
NF4Parametrization = QuantParametrization


def _quant_parametrization_or_none(module: nn.Module, name: str) -> Optional[QuantParametrization]:
    """moequant's parametrization of ``module.<name>``, or None: the one walk every lookup below
    makes (the experts forward makes it for both projections on every call)."""
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, QuantParametrization)), None)


def is_quantized(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a quantized stack parametrized by moequant."""
    return _quant_parametrization_or_none(module, name) is not None


def stored_numel(module: nn.Module, name: str) -> int:
    """Elements stored for the quantized ``module.<name>``: packed codes plus statistics, which is
    what ``parameters()`` counts for it (the dense parameter counted its logical ``E*N*K``)."""
    statistics = sum(p.numel() for p in _quant_parametrization(module, name).parameters())
    return module.parametrizations[name].original.numel() + statistics


def _quant_parametrization(module: nn.Module, name: str) -> QuantParametrization:
    p = _quant_parametrization_or_none(module, name)
    if p is None:
        raise ValueError(f"{type(module).__name__}.{name} is not quantized by moequant")
    return p


def _stack(module: nn.Module, name: str, p: QuantParametrization) -> QuantStack:
    absmax, scale, offset = p.statistics()
    return QuantStack(module.parametrizations[name].original, absmax, p.shape, p.blocksize, p.dtype, p.quant_type,
                      scale, offset)


def quant_stack_or_none(module: nn.Module, name: str) -> Optional[QuantStack]:
    """The packed stack behind ``module.<name>``, without dequantizing anything, or None when moequant
    does not quantize it."""
    p = _quant_parametrization_or_none(module, name)
    return None if p is None else _stack(module, name, p)


def quant_stack_of(module: nn.Module, name: str) -> QuantStack:
    """The packed stack behind a quantized parameter, without dequantizing anything."""
    return _stack(module, name, _quant_parametrization(module, name))


nf4_stack_of = quant_stack_of  # the name of earlier versions


def quantize_parameter(
    module: nn.Module,
    name: str,
    blocksize: int = 64,
    stack: Optional[QuantStack] = None,
    quant_type: str = "nf4",
    double_quant: Optional[bool] = None,
) -> QuantStack:
    """Replace ``module.<name>`` (a float tensor ``[E, N, K]``) by its quantized stack, parametrized to read dense.

    ``quant_type`` / ``double_quant`` as in :func:`moequant.quantize` (default: NF4 with
    double-quantized statistics). The dense tensor is dropped from the module before returning,
    so it is freed as soon as the caller lets go of it. Pass ``stack`` to install an
    already-quantized stack instead.
    """
    weight = getattr(module, name)
    if stack is None:
        double_quant = check_format(quant_type, double_quant, where=f"{type(module).__name__}.{name}")
        if weight.dim() != 3 or not weight.is_floating_point():
            raise ValueError(
                f"moequant quantizes 3-D float expert tensors [E, N, K]; {type(module).__name__}.{name} is "
                f"{weight.dtype} with shape {tuple(weight.shape)}"
            )
        num_experts, n, k = weight.shape
        if quant_type != "int8" and ((n * k) % blocksize != 0 or k % 2 != 0):
            raise ValueError(
                f"{type(module).__name__}.{name} has shape {tuple(weight.shape)}: {quant_type} needs an even last "
                f"dimension and N*K ({n * k}) divisible by blocksize ({blocksize})"
            )
        stack = quantize(weight.detach(), quant_type, blocksize, double_quant)
    del weight
    # The packed codes replace the dense parameter under the same name, so that parametrize keeps
    # them as `parametrizations.<name>.original` (frozen: the base weights never train).
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(stack.packed, requires_grad=False))
    parametrize.register_parametrization(
        module,
        name,
        QuantParametrization(stack.absmax, stack.shape, stack.blocksize, stack.dtype, stack.quant_type,
                             stack.absmax_scale, stack.absmax_offset),
        unsafe=True,
    )
    return stack


def dequantize_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """Undo :func:`quantize_parameter`: ``module.<name>`` becomes a plain dense parameter again."""
    dense = quant_stack_of(module, name).dequantize()
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(dense, requires_grad=False))
    return dense
