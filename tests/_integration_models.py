"""Tiny randomly initialised MoE checkpoints for the integration tests (no downloads).

Each entry builds a transformers config small enough that a whole model builds, saves, loads and
trains in about a second on one CPU core, while keeping every architectural feature that matters
to moequant (fused experts, shared experts, dense first layers, biases, transposed layouts...).
"""

from __future__ import annotations

import os

import torch

VOCAB = 96
HIDDEN = 64
EXPERT_INTER = 32

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _config(model_type: str):
    import transformers as tf

    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=EXPERT_INTER,
                                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=EXPERT_INTER,
                                 shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)
    if model_type == "olmoe":
        return tf.OlmoeConfig(**_COMMON, intermediate_size=EXPERT_INTER, num_experts=8, num_experts_per_tok=2)
    if model_type == "mixtral":
        return tf.MixtralConfig(**_COMMON, head_dim=16, intermediate_size=EXPERT_INTER, num_local_experts=4,
                                num_experts_per_tok=2)
    if model_type == "deepseek_v3":
        return tf.DeepseekV3Config(**_COMMON, intermediate_size=96, moe_intermediate_size=EXPERT_INTER,
                                   n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                   topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_mtp_layers=0)
    if model_type == "glm4_moe":
        return tf.Glm4MoeConfig(**_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=EXPERT_INTER,
                                n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                                topk_group=1, first_k_dense_replace=1, num_mtp_layers=0)
    if model_type == "gpt_oss":
        return tf.GptOssConfig(**_COMMON, head_dim=16, intermediate_size=EXPERT_INTER, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    if model_type == "phimoe":
        return tf.PhimoeConfig(**_COMMON, intermediate_size=EXPERT_INTER, num_local_experts=4, num_experts_per_tok=2)
    if model_type == "ernie4_5_moe":
        return tf.Ernie4_5_MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=EXPERT_INTER,
                                     moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0)
    if model_type == "flex_olmo":
        return tf.FlexOlmoConfig(**_COMMON, intermediate_size=EXPERT_INTER, num_experts=4, num_experts_per_tok=2,
                                 pad_token_id=0)
    if model_type == "muse_spark":  # post-expert norm (has_post_expert_norm); vision/audio towers kept minimal
        text = dict(_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=EXPERT_INTER,
                    moe_hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        vision = dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                      pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16)
        audio = dict(hidden_sizes=(8, 8, 8, 8), depths=(1, 1, 1, 1), num_hidden_layers=4, out_hidden_size=HIDDEN)
        # output_multiplier 1 (default 0.18 scales the logits down) so 20 LoRA steps move the loss as elsewhere
        text["output_multiplier"] = 1.0
        return tf.MuseSparkConfig(text_config=text, vision_config=vision, audio_config=audio, out_hidden_size=32,
                                  projector_hidden_size=32, image_token_id=VOCAB - 3, video_token_id=VOCAB - 2,
                                  audio_token_id=VOCAB - 1)
    raise ValueError(f"no tiny config for {model_type!r}")


def _register_causal_lm_aliases() -> None:
    """MuseSpark's language model exists only as MuseSparkForConditionalGeneration (image-text-to-text);
    the tests load every architecture through AutoModelForCausalLM, so it is registered there."""
    import transformers as tf

    if hasattr(tf, "MuseSparkConfig"):
        tf.AutoModelForCausalLM.register(tf.MuseSparkConfig, tf.MuseSparkForConditionalGeneration, exist_ok=True)


ARCHITECTURES = (
    "qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss", "phimoe", "ernie4_5_moe",
    "flex_olmo", "muse_spark",
)
# Architectures whose checkpoints store the experts already fused (no per-expert tensors to stream).
FUSED_CHECKPOINT_ARCHITECTURES = ("gpt_oss", "muse_spark")


try:
    _register_causal_lm_aliases()
except ImportError:  # no transformers: the integration tests skip
    pass


def tiny_config(model_type: str, num_hidden_layers: int = 2):
    config = _config(model_type)
    text_config = getattr(config, "text_config", None) or config
    text_config.num_hidden_layers = num_hidden_layers
    for per_layer in ("layer_types", "mlp_layer_types", "layer_rope_theta"):
        values = getattr(text_config, per_layer, None)
        if values is not None:
            setattr(text_config, per_layer, (list(values) * num_hidden_layers)[:num_hidden_layers])
    return config


def build_tiny_model(model_type: str, num_hidden_layers: int = 2, seed: int = 0):
    """A randomly initialised bf16 causal LM; expert weights get a std large enough to matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_hidden_layers), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3:  # fused experts: the default init (std 0.02) makes them almost inert
                p.normal_(0.0, 0.2)
            elif name.endswith("_bias") and "experts" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def save_tiny_checkpoint(model_type: str, directory: str, num_hidden_layers: int = 2, seed: int = 0) -> str:
    model = build_tiny_model(model_type, num_hidden_layers, seed)
    model.save_pretrained(directory)
    return directory


def save_fused_checkpoint(model, directory: str) -> str:
    """A checkpoint that stores the experts already fused (transformers' in-memory names), as some hubs do."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory


class NoDequantize:
    """Fails on any dequantization of a quantized stack through its parametrization (a dense read
    of an expert parameter, as the grouped_mm fallback or a dense LoRA delta would do)."""

    def __enter__(self):
        from moequant.integrations.parametrize import NF4Parametrization

        self.parametrization, self.saved = NF4Parametrization, NF4Parametrization.forward

        def forbidden(module, packed):
            raise AssertionError("a quantized expert stack was dequantized through its parametrization")

        NF4Parametrization.forward = forbidden

    def __exit__(self, *exc):
        self.parametrization.forward = self.saved
