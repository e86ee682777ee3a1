"""Axolotl plugin: ``quantize_moe_experts: true`` quantizes the fused experts with moequant.

    plugins:
      - moequant.integrations.axolotl.MoequantPlugin
    load_in_4bit: true          # bitsandbytes NF4 for the nn.Linear layers (or load_in_8bit + adapter: lora)
    adapter: qlora
    quantize_moe_experts: true  # the experts: moequant NF4, trained through torch.ops.moequant.experts_forward
    lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]
    lora_dropout: 0.0           # required when experts are targeted
    moequant_blocksize: 64      # optional
    moequant_fuse: quantized  # optional: quantized | cpu | device, see moequant.quantize_experts_on_load

The plugin takes the option over from Axolotl's own expert quantization: it clears
``cfg.quantize_moe_experts`` before the model is loaded (so Axolotl's loader patch stays off),
loads inside :func:`moequant.quantize_experts_on_load`, and sets ``cfg.moequant_quantized`` once
the model is built. PEFT then targets the quantized parameters through moequant's PEFT routing.
"""

from __future__ import annotations

import contextlib
import logging

from pydantic import BaseModel

from .transformers import memory_summary, quantize_experts_on_load

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # importable (and testable) without Axolotl
    BasePlugin = object

logger = logging.getLogger(__name__)

_ADAPTERS = {"qlora", "lora"}


class MoequantArgs(BaseModel):
    """The Axolotl config keys this plugin reads (``quantize_moe_experts`` is Axolotl's own)."""

    moequant_blocksize: int = 64
    moequant_fuse: str = "quantized"


class MoequantPlugin(BasePlugin):
    """Routes ``quantize_moe_experts: true`` through moequant's quantize-on-load."""

    def __init__(self):
        super().__init__()
        self._loading: contextlib.ExitStack | None = None

    def get_input_args(self) -> str:
        return "moequant.integrations.axolotl.MoequantArgs"

    def pre_model_load(self, cfg) -> None:
        if not cfg.get("quantize_moe_experts"):
            return
        adapter = cfg.get("adapter")
        if adapter not in _ADAPTERS:
            raise ValueError(
                f"quantize_moe_experts with moequant trains adapters on frozen NF4 experts: adapter must be one of "
                f"{sorted(_ADAPTERS)}, got {adapter!r}"
            )
        if cfg.get("lora_target_parameters") and cfg.get("lora_dropout"):
            raise ValueError(
                "lora_target_parameters on moequant-quantized experts needs lora_dropout: 0, "
                f"got {cfg.get('lora_dropout')}"
            )
        cfg["quantize_moe_experts"] = False  # Axolotl's own expert quantization stays off
        self._loading = contextlib.ExitStack()
        self._loading.enter_context(
            quantize_experts_on_load(
                blocksize=int(cfg.get("moequant_blocksize") or 64),
                fuse=str(cfg.get("moequant_fuse", "quantized")),
            )
        )
        logger.info("moequant: quantize_moe_experts handled by moequant (NF4 experts, fused LoRA op)")

    def post_model_build(self, cfg, model) -> None:
        if self._loading is None:
            return
        loading, self._loading = self._loading, None
        loading.close()  # finishes the load: leftover experts quantized, summary logged
        cfg["moequant_quantized"] = True
        logger.info("moequant: %s", memory_summary(model).format())

    def post_model_load(self, cfg, model) -> None:
        # If Axolotl failed between the two hooks, do not leave the loader patched.
        if self._loading is not None:
            self._loading.close()
            self._loading = None
