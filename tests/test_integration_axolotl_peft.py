"""moequant's PEFT injection next to another library's (Axolotl replaces ``BaseTuner._inject_parameters``)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import get_peft_model_state_dict

from _integration_models import build_tiny_model
from moequant.integrations import quantize_model_experts
from moequant.integrations.peft import install_injection, quantized_experts_injection, remove_injection

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture
def foreign_injection():
    """An injection that, like Axolotl's, runs PEFT's pass and suffix-matches parametrized experts
    itself, and never calls the implementation it replaced; restored afterwards."""
    saved = BaseTuner._inject_parameters
    while getattr(saved, "_moequant_previous", None) is not None:
        saved = saved._moequant_previous
    calls = []

    def foreign(self, peft_config, model, adapter_name, low_cpu_mem_usage):
        targeted = list(saved(self, peft_config, model, adapter_name, low_cpu_mem_usage))  # PEFT's own pass
        matched = []
        for module_name, module in list(model.named_modules()):
            if not hasattr(module, "parametrizations"):
                continue
            for param_name in list(module.parametrizations.keys()):
                key = f"{module_name}.{param_name}"
                if any(key.endswith(f".{t}") for t in peft_config.target_parameters):
                    from peft.utils import _get_submodules

                    parent, target, target_name = _get_submodules(model, module_name)
                    self._create_and_replace(peft_config, adapter_name, target, target_name, parent,
                                             current_key=key, parameter_name=param_name)
                    matched.append(key)
        calls.append(matched)
        return targeted + matched

    previous = BaseTuner._inject_parameters
    BaseTuner._inject_parameters = foreign
    yield foreign, calls
    BaseTuner._inject_parameters = previous


def test_install_is_idempotent_and_removal_restores(foreign_injection):
    foreign, _ = foreign_injection
    assert install_injection() is True
    wrapper = BaseTuner._inject_parameters
    assert wrapper._moequant_previous is foreign
    assert install_injection() is False and BaseTuner._inject_parameters is wrapper  # no second layer
    assert remove_injection() is True and BaseTuner._inject_parameters is foreign
    assert remove_injection() is False and BaseTuner._inject_parameters is foreign


def test_context_restores_on_error(foreign_injection):
    foreign, _ = foreign_injection
    with pytest.raises(RuntimeError):
        with quantized_experts_injection():
            assert BaseTuner._inject_parameters._moequant_previous is foreign
            raise RuntimeError("failed inside get_peft_model")
    assert BaseTuner._inject_parameters is foreign


def test_quantized_stacks_wrapped_once_before_the_foreign_injection(foreign_injection):
    _, calls = foreign_injection
    dense = get_peft_model(build_tiny_model("qwen3_moe"), LoraConfig(r=4, target_modules=[], target_parameters=TARGETS))
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(dense).items()}
    calls.clear()

    model = quantize_model_experts(build_tiny_model("qwen3_moe"))
    with quantized_experts_injection():
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=[], target_parameters=TARGETS))
    assert calls == [[]]  # the foreign injection ran after moequant's and found nothing left to wrap
    assert {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()} == expected
    wrappers = [m for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"]
    assert sorted(w.parameter_name for w in wrappers) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    out = peft_model(torch.randint(0, 96, (1, 6))).logits
    assert torch.isfinite(out).all()


def test_without_moequant_the_foreign_injection_wraps_a_stack_twice(foreign_injection):
    """What the issue saw: PEFT's own pass plus a suffix-matching one target the same stack."""
    model = quantize_model_experts(build_tiny_model("qwen3_moe"))
    install_injection()
    wrapper = BaseTuner._inject_parameters
    # moequant's injection below the foreign one (the order before the fix): both wrap the stacks
    BaseTuner._inject_parameters = wrapper._moequant_previous

    def late(self, peft_config, model, adapter_name, low_cpu_mem_usage):
        targeted = wrapper._moequant_previous(self, peft_config, model, adapter_name, low_cpu_mem_usage)
        from moequant.integrations.peft import _quantized_experts, _wrap_quantized_experts

        return targeted + _wrap_quantized_experts(self, peft_config, model, adapter_name, low_cpu_mem_usage,
                                                  _quantized_experts(model))

    BaseTuner._inject_parameters = late
    with pytest.raises(ValueError, match="same nn.Parameter twice|twice"):
        get_peft_model(model, LoraConfig(r=4, target_modules=[], target_parameters=TARGETS))
