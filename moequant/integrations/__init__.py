"""Integrations of moequant with transformers (quantize-on-load, the "moequant" experts
implementation) and PEFT (LoRA on quantized experts through the fused op)."""

from .experts import ExpertsLayout, experts_layout, moequant_experts_forward, register_experts_implementation
from .parametrize import (
    NF4Parametrization,
    QuantParametrization,
    dequantize_parameter,
    is_quantized,
    nf4_stack_of,
    quant_stack_of,
    quantize_parameter,
)
from .peft import lora_factors, patch_peft
from .serialization import load_quantized, save_quantized
from .transformers import (
    LoadStats,
    MemorySummary,
    dense_state_dict,
    find_experts_modules,
    load_stats,
    memory_summary,
    quantize_experts_on_load,
    quantize_model_experts,
)

__all__ = [
    "ExpertsLayout",
    "LoadStats",
    "MemorySummary",
    "NF4Parametrization",
    "QuantParametrization",
    "dense_state_dict",
    "dequantize_parameter",
    "experts_layout",
    "find_experts_modules",
    "is_quantized",
    "load_quantized",
    "load_stats",
    "lora_factors",
    "memory_summary",
    "moequant_experts_forward",
    "nf4_stack_of",
    "patch_peft",
    "quant_stack_of",
    "quantize_experts_on_load",
    "quantize_model_experts",
    "quantize_parameter",
    "register_experts_implementation",
    "save_quantized",
]
