"""moequant: NF4-quantized fused MoE experts for LoRA/QLoRA fine-tuning.

The operators live in ``torch.ops.moequant`` (registered by ``moequant._C``); this package adds
typed wrappers and the integrations with transformers, PEFT and Axolotl.
"""

from ._ops import ops
from .experts import experts_forward
from .nf4 import NF4Stack, dequant_expert, quantize_nf4
from .integrations import load_quantized, quantize_experts_on_load, quantize_model_experts, save_quantized

__all__ = [
    "ops",
    "NF4Stack",
    "quantize_nf4",
    "dequant_expert",
    "experts_forward",
    "quantize_experts_on_load",
    "quantize_model_experts",
    "save_quantized",
    "load_quantized",
]
__version__ = "0.1.0"
