"""The Axolotl plugin's hooks around a real from_pretrained (Axolotl itself is not needed)."""

import pytest
import torch

from _integration_models import save_tiny_checkpoint

pytest.importorskip("pydantic")
from transformers import AutoModelForCausalLM  # noqa: E402

from moequant.integrations import find_experts_modules, is_quantized  # noqa: E402
from moequant.integrations.axolotl import MoequantArgs, MoequantPlugin  # noqa: E402


def test_plugin_quantizes_between_pre_model_load_and_post_model_build(tmp_path):
    import transformers.core_model_loading as loading

    path = save_tiny_checkpoint("qwen3_moe", str(tmp_path))
    cfg = {"quantize_moe_experts": True, "adapter": "qlora", "lora_dropout": 0.0,
           "lora_target_parameters": ["mlp.experts.gate_up_proj"], "moequant_blocksize": 64}
    plugin = MoequantPlugin()
    assert MoequantArgs(**{k: v for k, v in cfg.items() if k.startswith("moequant_")}).moequant_blocksize == 64
    original_setter = loading.set_param_for_module
    plugin.pre_model_load(cfg)
    assert cfg["quantize_moe_experts"] is False  # Axolotl's own path stays off
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    plugin.post_model_build(cfg, model)
    plugin.post_model_load(cfg, model)
    assert loading.set_param_for_module is original_setter
    assert cfg["moequant_quantized"] is True
    assert all(is_quantized(m, "gate_up_proj") for _, m in find_experts_modules(model))


def test_plugin_rejects_what_it_cannot_train():
    plugin = MoequantPlugin()
    with pytest.raises(ValueError, match="adapter must be one of"):
        plugin.pre_model_load({"quantize_moe_experts": True, "adapter": None})
    with pytest.raises(ValueError, match="lora_dropout: 0"):
        plugin.pre_model_load({"quantize_moe_experts": True, "adapter": "qlora", "lora_dropout": 0.05,
                               "lora_target_parameters": ["mlp.experts.down_proj"]})
    plugin.pre_model_load({"quantize_moe_experts": False})  # not asked: nothing happens
    assert plugin._loading is None
