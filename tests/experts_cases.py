"""Random experts problems shared by the CPU and CUDA experts tests."""

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

import moequant


@dataclass
class ExpertsCase:
    hidden: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor
    gate_up: moequant.NF4Stack
    down: moequant.NF4Stack
    kwargs: dict = field(default_factory=dict)

    def args(self):
        return (self.hidden, self.index, self.weights, self.gate_up.packed, self.gate_up.absmax,
                self.down.packed, self.down.absmax)

    def differentiable(self):
        """Inputs the op is differentiable in, in a fixed order."""
        out = [self.hidden, self.weights]
        for name in ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"):
            if self.kwargs.get(name) is not None:
                out.append(self.kwargs[name])
        return out


def make_case(T=12, H=64, I=32, E=6, k=3, dtype=torch.float32, device="cpu", activation="silu",
              transposed=False, interleaved=False, bias=False, lora=(False, False), rank=4,
              routing="uniform", sentinels=False, index_dtype=torch.int64, blocksize=64,
              requires_grad=True, weight_scale: Optional[float] = None) -> ExpertsCase:
    g = torch.Generator().manual_seed(1234 + T * 7 + E)
    scale = weight_scale if weight_scale is not None else 1.0 / H ** 0.5
    gu = torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), generator=g) * scale
    dn = torch.randn((E, I, H) if transposed else (E, H, I), generator=g) * (1.0 / I ** 0.5)
    gate_up = moequant.quantize_nf4(gu.to(device), blocksize)
    down = moequant.quantize_nf4(dn.to(device), blocksize)
    hidden = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    logits = torch.randn(T, E, generator=g)
    if routing == "skewed":  # most tokens go to experts 0..k-1; the last experts get none
        logits[:, :k] += 6.0
        logits[:, E - 2:] -= 100.0
    elif routing != "uniform":
        raise ValueError(routing)
    index = logits.topk(k, dim=-1).indices
    if sentinels and T:
        index[::3, -1] = E  # expert-parallel sentinel slots
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1).to(device=device, dtype=dtype)
    kwargs = dict(blocksize=blocksize, activation=activation, transposed=transposed, interleaved=interleaved)
    if bias:
        kwargs["gate_up_bias"] = (torch.randn(E, 2 * I, generator=g) * 0.1).to(device=device, dtype=dtype)
        kwargs["down_bias"] = (torch.randn(E, H, generator=g) * 0.1).to(device=device, dtype=dtype)
    if lora[0]:
        kwargs["gate_up_lora_A"] = (torch.randn(E, rank, H, generator=g) * 0.1).to(device=device, dtype=dtype)
        kwargs["gate_up_lora_B"] = (torch.randn(E, 2 * I, rank, generator=g) * 0.1).to(device=device, dtype=dtype)
        kwargs["gate_up_lora_scaling"] = 2.0
    if lora[1]:
        kwargs["down_lora_A"] = (torch.randn(E, rank + 1, I, generator=g) * 0.1).to(device=device, dtype=dtype)
        kwargs["down_lora_B"] = (torch.randn(E, H, rank + 1, generator=g) * 0.1).to(device=device, dtype=dtype)
        kwargs["down_lora_scaling"] = 0.5
    case = ExpertsCase(hidden, index.to(device=device, dtype=index_dtype), weights, gate_up, down, kwargs)
    if requires_grad:
        for t in case.differentiable():
            t.requires_grad_(True)
    return case


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def in_format(case: ExpertsCase, quant_type: str, double_quant: bool) -> ExpertsCase:
    """The case with its stacks re-quantized (from their NF4 values) in another format."""
    def convert(stack):
        return moequant.quantize(stack.dequantize(torch.float32), quant_type, stack.blocksize, double_quant)

    return dataclasses.replace(case, gate_up=convert(case.gate_up), down=convert(case.down))


def format_kwargs(case: ExpertsCase) -> dict:
    """The case's keyword arguments plus its stacks' format arguments (quant_type, statistics)."""
    kw = dict(case.kwargs, quant_type=case.gate_up.quant_type)
    kw.update(case.gate_up.op_kwargs("gate_up_"))
    kw.update(case.down.op_kwargs("down_"))
    return kw
