"""moequant: quantized (NF4, FP4, int8) fused MoE experts for LoRA/QLoRA fine-tuning.

The operators live in ``torch.ops.moequant`` (registered by ``moequant._C``); this package adds
typed wrappers and the integrations with transformers, PEFT and Axolotl.
"""

from ._ops import ops
from .experts import experts_forward
from .formats import QUANT_TYPES, QuantStack, compress_statistics, dequant_expert, quantize
from .nf4 import NF4Stack, quantize_nf4
from .integrations import load_quantized, quantize_experts_on_load, quantize_model_experts, save_quantized

__all__ = [
    "ops",
    "QUANT_TYPES",
    "QuantStack",
    "NF4Stack",
    "quantize",
    "quantize_nf4",
    "compress_statistics",
    "dequant_expert",
    "experts_forward",
    "quantize_experts_on_load",
    "quantize_model_experts",
    "save_quantized",
    "load_quantized",
]
__version__ = "0.1.0"
