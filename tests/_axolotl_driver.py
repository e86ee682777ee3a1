"""Runs real Axolotl 0.21.0 in a child process for tests/test_integration_axolotl*.py; prints a JSON report.

    python tests/_axolotl_driver.py train CONFIG WORKDIR [key=value ...]   # config load + validation + train
    python tests/_axolotl_driver.py errors WORKDIR                         # the clear-error cases

A separate process because Axolotl patches transformers, PEFT and its own singletons for the
lifetime of the process, which the other test files must not inherit. Nothing of Axolotl is
stubbed: the config goes through ``axolotl.cli.config.load_cfg`` (plugin registration, pydantic
validation), the model through ``ModelLoader``, training through ``axolotl.train.train``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples", "axolotl"))


def _overrides(workdir: str, pairs: list[str]) -> dict:
    tiny = os.path.join(workdir, "tiny")
    values = dict(
        base_model=os.path.join(tiny, "model"),
        datasets=[{"path": os.path.join(tiny, "data.jsonl"), "ds_type": "json", "type": "completion"}],
        dataset_prepared_path=os.path.join(workdir, "prepared"),
        output_dir=os.path.join(workdir, "out"),
        moequant_cache_dir=os.path.join(workdir, "experts-cache"),
        dataset_num_proc=1,
    )
    for pair in pairs:
        key, _, value = pair.partition("=")
        values[key] = json.loads(value)
    return values


class _Counters:
    """Counts moequant's quantizations and Axolotl's own expert quantization during one run."""

    def __init__(self):
        import moequant.integrations.transformers as hook

        self.quantized = 0
        original_param, original_stream = hook.quantize_parameter, hook._quantize_experts_streaming

        def quantize_parameter(*args, **kwargs):
            if kwargs.get("stack") is None:
                self.quantized += 1
            return original_param(*args, **kwargs)

        def streaming(*args, **kwargs):
            stack = original_stream(*args, **kwargs)
            self.quantized += stack is not None
            return stack

        hook.quantize_parameter = quantize_parameter
        hook._quantize_experts_streaming = streaming


def _expert_wrappers(model) -> dict:
    """For every quantized experts module: the parameter names of the ParamWrappers stacked on it."""
    from moequant.integrations import find_experts_modules

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    result = {}
    for name, module in inner.named_modules():
        if type(module).__name__ != "ParamWrapper":
            continue
        base = module.get_base_layer()
        key = [n for n, m in find_experts_modules(inner) if m is base]
        if key:
            result.setdefault(key[0].replace(".base_layer", ""), []).append(module.parameter_name)
    return result


def _dense_reference(model_dir: str, adapter_dir: str, dtype) -> dict:
    """Adapter keys/shapes and parameter counts of the same adapter on the unquantized model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    config = LoraConfig.from_pretrained(adapter_dir)
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    state = get_peft_model_state_dict(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    del torch
    return {"keys": {k: list(v.shape) for k, v in state.items()}, "trainable": trainable, "total": total}


def train(config: str, workdir: str, pairs: list[str]) -> dict:
    import torch
    import transformers.core_model_loading as loading
    from peft.tuners.tuners_utils import BaseTuner
    from safetensors.torch import load_file

    original_setter = loading.set_param_for_module
    counters = _Counters()
    if "bf16=true" in pairs and not torch.cuda.is_available():
        # The one device check patched: TrainingArguments refuses bf16 without a GPU (there is no
        # use_cpu in Axolotl's config); CPU autocast runs bf16 fine.
        import transformers.training_args as training_args

        training_args.is_torch_bf16_gpu_available = lambda: True

    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.monkeypatch import moe_quant
    from axolotl.train import train as axolotl_train

    cfg = load_cfg(config, **_overrides(workdir, pairs))
    report = {"cfg_quantize_moe_experts": bool(cfg.quantize_moe_experts),
              "cfg_moequant_quantize_experts": bool(cfg.moequant_quantize_experts),
              "device_map": cfg.device_map}
    dataset_meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    model, _, trainer = axolotl_train(cfg=cfg, dataset_meta=dataset_meta)

    from moequant.integrations import find_experts_modules, is_quantized

    inner = model.get_base_model()
    report.update(
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        quantizations=counters.quantized,
        axolotl_quantized=moe_quant.get_moe_quantized_count(),
        moe_experts_quantized_flag=bool(getattr(inner, "_moe_experts_quantized", False)),
        stacks=sum(is_quantized(m, p) for _, m in find_experts_modules(inner) for p in ("gate_up_proj", "down_proj")),
        wrappers=_expert_wrappers(model),
        setter_restored=loading.set_param_for_module is original_setter,
        injection_removed=getattr(BaseTuner._inject_parameters, "_moequant_previous", None) is None,
        experts_implementation=sorted({m.config._experts_implementation for _, m in find_experts_modules(inner)
                                       if hasattr(m, "config")}),
    )
    adapter = load_file(os.path.join(cfg.output_dir, "adapter_model.safetensors"))
    report["adapter_keys"] = {k: list(v.shape) for k, v in adapter.items()}
    report["dense"] = _dense_reference(cfg.base_model, cfg.output_dir, inner.dtype)
    report["peft_counts"] = list(model.get_nb_trainable_parameters())
    return report


def _error_of(fn) -> str:
    try:
        fn()
    except Exception as err:  # the report says which error each case gave
        return f"{type(err).__name__}: {err}"
    return "no error"


def errors(workdir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    config = os.path.join(REPO, "examples", "axolotl", "tiny-qwen3-moe-qlora.yml")

    def pre_model_load(**extra):
        cfg = load_cfg(config, **{**_overrides(workdir, []), **extra})
        PluginManager.get_instance().pre_model_load(cfg)
        for plugin in PluginManager.get_instance().plugins.values():
            if hasattr(plugin, "_close"):
                plugin._close()

    dense = os.path.join(workdir, "dense-llama")
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=1, num_attention_heads=4,
                                                 num_key_value_heads=2)).save_pretrained(dense)
    mixed = os.path.join(workdir, "qwen3-moe-dense-first")
    AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        mlp_only_layers=[0])).save_pretrained(mixed)

    def linear_twice():
        from axolotl.loaders.model import ModelLoader
        from axolotl.loaders.tokenizer import load_tokenizer

        cfg = load_cfg(config, **{**_overrides(workdir, []), "base_model": mixed, "lora_target_linear": True,
                                  "tokenizer_config": os.path.join(workdir, "tiny", "model")})
        ModelLoader(cfg, load_tokenizer(cfg)).load()

    def failing_load():
        """A load that fails after pre_model_load: transformers and PEFT must be left unpatched."""
        import transformers.core_model_loading as loading
        from axolotl.loaders.model import ModelLoader
        from axolotl.loaders.tokenizer import load_tokenizer
        from peft.tuners.tuners_utils import BaseTuner

        setter = loading.set_param_for_module
        cfg = load_cfg(config, **_overrides(workdir, []))

        def broken(self):
            assert loading.set_param_for_module is not setter  # moequant's hook is on here
            raise RuntimeError("load failed on purpose")

        ModelLoader._build_model = broken
        try:
            ModelLoader(cfg, load_tokenizer(cfg)).load()
        except RuntimeError:
            pass
        unpatched = loading.set_param_for_module is setter and getattr(
            BaseTuner._inject_parameters, "_moequant_previous", None) is None
        return "unpatched" if unpatched else "still patched"

    real_cuda = torch.cuda.is_available
    report = {
        "unsupported_architecture": _error_of(lambda: pre_model_load(base_model=dense,
                                                                     tokenizer_config=os.path.join(workdir, "tiny",
                                                                                                   "model"))),
        "lora_dropout": _error_of(lambda: load_cfg(config, **{**_overrides(workdir, []), "lora_dropout": 0.1})),
        "blocksize": _error_of(lambda: load_cfg(config, **{**_overrides(workdir, []), "moequant_blocksize": 48})),
        "fuse": _error_of(lambda: load_cfg(config, **{**_overrides(workdir, []), "moequant_fuse": "gpu"})),
        "quant_type": _error_of(lambda: load_cfg(config, **{**_overrides(workdir, []),
                                                            "bnb_config_kwargs": {"bnb_4bit_quant_type": "int4"}})),
        "lora_without_8bit": _error_of(lambda: load_cfg(config, **{**_overrides(workdir, []), "adapter": "lora",
                                                                   "load_in_4bit": False})),
        "lora_target_linear_twice": _error_of(linear_twice),
    }
    torch.cuda.is_available = lambda: False  # the machine as a CPU-only one, whatever it is
    try:
        report["cpu_only_gpu_config"] = _error_of(lambda: pre_model_load(device_map={"": 0}))
    finally:
        torch.cuda.is_available = real_cuda
    report["failing_load"] = failing_load()
    return report


def main(argv: list[str]) -> None:
    from make_tiny import make_tiny

    mode = argv[0]
    workdir = argv[2] if mode == "train" else argv[1]
    if not os.path.isdir(os.path.join(workdir, "tiny")):
        make_tiny(os.path.join(workdir, "tiny"))
    try:
        report = train(argv[1], workdir, argv[3:]) if mode == "train" else errors(workdir)
    except Exception:
        report = {"driver_error": traceback.format_exc()}
    print("MOEQUANT_REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
