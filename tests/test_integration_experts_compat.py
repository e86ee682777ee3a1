"""Every fused-experts class of the installed transformers, checked against moequant: either
supported and equal to transformers' grouped_mm on the dequantized weights (outputs and gradients),
or refused with an error naming the class and what is unsupported. Flags of
@use_experts_implementation and reference-forward attributes moequant does not know are refused,
and hub kernels cannot silently replace the experts forward moequant relies on."""

from __future__ import annotations

import copy
import importlib
import inspect
import pathlib
import re
import types

import pytest
import torch
from torch import nn

from _integration_models import ARCHITECTURES, NoDequantize, save_tiny_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, PreTrainedConfig  # noqa: E402
from transformers.integrations import moe  # noqa: E402

import moequant.integrations.experts as experts_integration  # noqa: E402
from moequant.integrations import find_experts_modules, nf4_stack_of, quantize_experts_on_load  # noqa: E402
from moequant.integrations.experts import experts_layout  # noqa: E402
from moequant.integrations.parametrize import is_quantized  # noqa: E402
from moequant.integrations.transformers import quantize_experts_module  # noqa: E402

# Sizes for a tiny instance of any experts class: every config attribute of these names is shrunk.
_TINY_SIZES = {
    "hidden_size": 64, "moe_hidden_size": 64, "intermediate_size": 32, "moe_intermediate_size": 32,
    "expert_intermediate_size": 32, "moe_ffn_hidden_size": 32, "ffn_hidden_size": 32, "num_experts": 4,
    "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_routed_experts": 4,
}
# Classes whose refusal is expected in the transformers versions tested (a class absent from the
# installed transformers is not checked): the reason each one is refused for.
_EXPECTED_REFUSALS = {
    "NemotronHExperts": "has_gate=False",  # up_proj-only MLP
    "DeepseekV4Experts": "_apply_gate",  # clamped SwiGLU of its own
}
# The architectures of the tiny end-to-end tests must stay supported.
_MUST_SUPPORT = {"Qwen3MoeExperts", "Qwen2MoeExperts", "OlmoeExperts", "MixtralExperts", "DeepseekV3Experts",
                 "Glm4MoeExperts", "GptOssExperts", "PhimoeExperts", "Ernie4_5_MoeExperts", "FlexOlmoExperts",
                 "MuseSparkExperts"}


def _decorated_experts_classes() -> list[type]:
    """Every class of transformers.models.*.modeling_* decorated with @use_experts_implementation
    (found in the sources, confirmed by the decorator's dispatching forward)."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    found = []
    for path in sorted(root.glob("*/modeling_*.py")):
        source = path.read_text()
        names = re.findall(r"^@use_experts_implementation\b.*?^class (\w+)", source, re.S | re.M)
        if not names:
            continue
        module = importlib.import_module(f"transformers.models.{path.parent.name}.{path.stem}")
        for name in names:
            cls = getattr(module, name)
            assert "experts_interface" in inspect.getclosurevars(cls.forward).nonlocals, name
            found.append(cls)
    return found


EXPERTS_CLASSES = _decorated_experts_classes()


def _tiny(config_cls: type) -> PreTrainedConfig:
    config = config_cls()
    for key, value in _TINY_SIZES.items():
        current = getattr(config, key, "absent")
        if isinstance(current, list) and all(isinstance(v, int) for v in current):
            setattr(config, key, [value] * len(current))
        elif current is None or (isinstance(current, int) and not isinstance(current, bool)):
            setattr(config, key, value)
    return config


def _build(cls: type) -> nn.Module:
    """A tiny float32 instance: the config class its __init__ names, else a config class of its module."""
    module = inspect.getmodule(cls)
    annotation = inspect.signature(cls.__init__).parameters["config"].annotation
    candidates = [] if annotation is inspect.Parameter.empty else [
        getattr(module, annotation) if isinstance(annotation, str) else annotation]
    configs = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, PreTrainedConfig)]
    candidates += sorted(configs, key=lambda c: ("Text" not in c.__name__, c.__name__))
    # arguments some classes take besides the config (Ernie-4.5-VL: a width per modality; a layer index)
    parameters = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in (("intermediate_size", 32), ("layer_idx", 0)) if k in parameters}
    errors = []
    for config_cls in candidates:
        try:
            experts = cls(_tiny(config_cls), **kwargs)
        except Exception as err:  # noqa: BLE001  (another candidate config may fit)
            errors.append(f"{config_cls.__name__}: {err}")
            continue
        assert sum(p.numel() for p in experts.parameters()) < 200_000, f"{cls.__name__} not shrunk"
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in experts.named_parameters():
                p.copy_(torch.randn_like(p) * (0.2 if p.dim() == 3 else 0.1))
        return experts.float()
    raise AssertionError(f"no tiny config builds {cls.__name__}: {errors}")


def _routing(num_experts: int, tokens: int = 10, top_k: int = 2):
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)
    return index, weights


def _run(experts: nn.Module, hidden, index, weights):
    hidden = hidden.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    out = experts(hidden, index, weights)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    grads = {n: p.grad.clone() for n, p in experts.named_parameters() if p.grad is not None}
    return out.detach(), hidden.grad, weights.grad, grads


def test_enumeration_finds_the_known_classes():
    names = {cls.__name__ for cls in EXPERTS_CLASSES}
    assert len(names) >= 40 and _MUST_SUPPORT <= names
    assert "muse_spark" in ARCHITECTURES  # the post-expert-norm architecture runs the end-to-end tests too


@pytest.mark.parametrize("cls", EXPERTS_CLASSES, ids=lambda c: c.__name__)
def test_experts_class_supported_and_exact_or_refused(cls):
    # kernelize only replaces forwards of classes carrying kernel_layer_name (use_kernel_forward_from_hub)
    assert not hasattr(cls, "kernel_layer_name"), f"{cls.__name__} can be replaced by a hub kernel"
    experts = _build(cls)
    try:
        layout = experts_layout(experts)
    except ValueError as err:
        message = str(err)
        assert cls.__name__ in message
        assert cls.__name__ not in _MUST_SUPPORT, message
        expected = _EXPECTED_REFUSALS.get(cls.__name__)
        assert expected is None or expected in message, message
        # the model-level entry point refuses it too, before quantizing anything
        with pytest.raises(ValueError, match=re.escape(cls.__name__)):
            quantize_experts_module(copy.deepcopy(experts))
        assert not any(is_quantized(experts, n) for n in ("gate_up_proj", "down_proj", "up_proj"))
        return
    assert cls.__name__ not in _EXPECTED_REFUSALS, f"{cls.__name__} was expected to be refused"
    assert layout.post_expert_norm == bool(getattr(experts, "has_post_expert_norm", False))

    quantized = copy.deepcopy(experts)
    quantize_experts_module(quantized)
    assert quantized.config._experts_implementation == "moequant"
    reference = copy.deepcopy(experts)
    reference.config._experts_implementation = "grouped_mm"
    with torch.no_grad():
        for name in layout.weight_names:
            getattr(reference, name).copy_(nf4_stack_of(quantized, name).dequantize())

    num_experts = experts.gate_up_proj.shape[0]
    hidden_dim = experts.down_proj.shape[2 if layout.transposed else 1]
    hidden = torch.randn(10, hidden_dim, generator=torch.Generator().manual_seed(2))
    index, weights = _routing(num_experts)
    with NoDequantize():
        out, grad_hidden, grad_weights, grads = _run(quantized, hidden, index, weights)
    ref_out, ref_grad_hidden, ref_grad_weights, ref_grads = _run(reference, hidden, index, weights)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_weights, ref_grad_weights, atol=1e-4, rtol=1e-4)
    # parameters trained besides the frozen stacks and biases: the post-expert norm's weight, same gradient
    trained = {n for n in ref_grads if n not in layout.weight_names and not n.endswith("_bias")}
    assert trained == ({"post_expert_norm.weight"} if layout.post_expert_norm else set()), trained
    for name in trained:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4)
    # the comparison is meaningful: the quantization error is far larger than the tolerance
    with torch.no_grad():
        dense_out = experts(hidden, index, weights)
    assert (dense_out - ref_out).abs().max() > 100 * (out - ref_out).abs().max()


def test_post_expert_norm_is_per_routed_pair_before_the_routing_weight():
    """The norm of MuseSpark-style experts is applied to each (token, slot) output, before its
    routing weight: a norm of the weighted sum would differ by far more than the tolerance."""
    experts = _build(next(c for c in EXPERTS_CLASSES if c.__name__ == "MuseSparkExperts"))
    quantize_experts_module(experts)
    index, weights = _routing(experts.num_experts)
    hidden = torch.randn(10, experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(3))
    stacks = {n: nf4_stack_of(experts, n) for n in ("gate_up_proj", "down_proj")}
    from moequant import experts_forward

    with torch.no_grad():
        out = experts(hidden, index, weights)
        pairs = torch.stack([
            experts.post_expert_norm(experts_forward(hidden, index[:, j:j + 1], torch.ones_like(weights[:, j:j + 1]),
                                                     stacks["gate_up_proj"], stacks["down_proj"]))
            for j in range(index.shape[1])
        ], dim=1)
        per_pair = (pairs * weights.unsqueeze(-1)).sum(1)
        unnormed = experts_forward(hidden, index, weights, stacks["gate_up_proj"], stacks["down_proj"])
    torch.testing.assert_close(out, per_pair, atol=1e-5, rtol=1e-5)
    assert (out - experts.post_expert_norm(unnormed)).abs().max() > 0.1
    assert (out - unnormed).abs().max() > 0.1


def _tiny_qwen3_experts() -> nn.Module:
    return _build(next(c for c in EXPERTS_CLASSES if c.__name__ == "Qwen3MoeExperts"))


def test_unknown_decorator_flag_is_refused(monkeypatch):
    """A @use_experts_implementation parameter moequant does not know is refused unless the module
    holds its default; here a future flag is simulated by extending the decorator's signature."""
    real = moe.use_experts_implementation

    def future_decorator(experts_class=None, *, has_router_scale: bool = False, **kwargs):
        return real(experts_class, **kwargs)

    future_decorator.__signature__ = inspect.Signature(
        list(inspect.signature(real).parameters.values())
        + [inspect.Parameter("has_router_scale", inspect.Parameter.KEYWORD_ONLY, default=False)]
    )
    monkeypatch.setattr(moe, "use_experts_implementation", future_decorator)
    experts = _tiny_qwen3_experts()
    unset = r"Qwen3MoeExperts uses @use_experts_implementation flag has_router_scale=unset"
    with pytest.raises(ValueError, match=unset):
        experts_layout(experts)
    experts.has_router_scale = True
    with pytest.raises(ValueError, match=r"flag has_router_scale=True \(default False\)"):
        experts_layout(experts)
    experts.has_router_scale = False  # the default: the math transformers had before the flag
    assert experts_layout(experts).activation == "silu"


def test_unknown_reference_attribute_is_refused(monkeypatch):
    """If transformers' grouped_mm forward starts reading an attribute moequant does not know, every
    experts module is refused, naming the function and the attribute."""
    real = moe.grouped_mm_experts_forward

    def grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
        if self.has_expert_scale:
            hidden_states = hidden_states * 2
        return real(self, hidden_states, top_k_index, top_k_weights)

    monkeypatch.setattr(moe, "grouped_mm_experts_forward", grouped_mm_experts_forward)
    experts_integration._unknown_reference_attributes.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"Qwen3MoeExperts: transformers' grouped_mm_experts_forward reads "
                                             r"self\.has_expert_scale"):
            experts_layout(_tiny_qwen3_experts())
    finally:
        monkeypatch.undo()
        experts_integration._unknown_reference_attributes.cache_clear()
    assert experts_layout(_tiny_qwen3_experts()).activation == "silu"


def test_interleaved_flag_with_default_gate_is_refused():
    @moe.use_experts_implementation(is_concatenated=False)
    class InterleavedExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 4
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 64, 64))
            self.down_proj = nn.Parameter(torch.zeros(4, 64, 32))
            self.act_fn = nn.SiLU()

    with pytest.raises(ValueError, match=r"InterleavedExperts sets is_concatenated=False .* default _apply_gate"):
        experts_layout(InterleavedExperts(transformers.PretrainedConfig()))


def test_overridden_forward_is_refused():
    base = next(c for c in EXPERTS_CLASSES if c.__name__ == "Qwen3MoeExperts")

    class OwnForward(base):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    experts = _build(base)
    experts.__class__ = OwnForward
    with pytest.raises(ValueError, match="OwnForward.forward does not dispatch through transformers' ALL_EXPERTS"):
        experts_layout(experts)


def test_hub_kernel_replacing_the_experts_forward_is_refused():
    """kernels' kernelize binds a forward on the instance: a foreign one is refused (at layout time
    and when the implementation is selected after loading), the class's own rebinding is accepted."""
    experts = _tiny_qwen3_experts()
    experts.forward = types.MethodType(lambda self, h, i, w: h, experts)
    with pytest.raises(ValueError, match=r"Qwen3MoeExperts.forward was replaced on the instance .*USE_HUB_KERNELS=0"):
        experts_layout(experts)
    layout_checked = _tiny_qwen3_experts()
    layout_checked._moequant_layout = experts_layout(layout_checked)
    layout_checked.forward = types.MethodType(lambda self, h, i, w: h, layout_checked)
    with pytest.raises(ValueError, match="replaced on the instance"):
        quantize_experts_module(layout_checked)

    rebound = _tiny_qwen3_experts()
    rebound.forward = types.MethodType(type(rebound).forward, rebound)  # kernelize's fallback
    quantize_experts_module(rebound)
    index, weights = _routing(rebound.num_experts)
    with torch.no_grad(), NoDequantize():
        assert torch.isfinite(rebound(torch.randn(10, 64), index, weights)).all()


# A local `kernels` build of an RMSNorm layer for the CPU, pure PyTorch with Qwen3MoeRMSNorm's own
# arithmetic, so that kernelize has a layer to bind with the hub offline (tests never download) and
# the logits stay bit-identical. The layout is what `kernels` resolves for a local repository:
# build/<variant>/metadata.json beside the Python package.
LOCAL_RMSNORM_KERNEL = {
    "metadata.json": '{"id": "_moequant_test_rmsnorm", "name": "moequant-test-rmsnorm", "version": 1, '
                     '"python-depends": [], "license": "Apache-2.0", "backend": {"type": "cpu"}}',
    "moequant_test_rmsnorm/__init__.py": "from . import layers  # noqa: F401\n",
    "moequant_test_rmsnorm/layers.py": (
        "import torch\n\n\n"
        "class RMSNorm(torch.nn.Module):\n"
        "    def forward(self, hidden_states):\n"
        "        dtype = hidden_states.dtype\n"
        "        h = hidden_states.to(torch.float32)\n"
        "        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)\n"
        "        return self.weight * h.to(dtype)\n"
    ),
}


def local_kernel_mapping(root: pathlib.Path):
    """`kernels.use_kernel_mapping` of transformers' "RMSNorm" layer to LOCAL_RMSNORM_KERNEL on the CPU."""
    from kernels import LocalLayerRepository, use_kernel_mapping

    for name, text in LOCAL_RMSNORM_KERNEL.items():
        target = root / "build" / "torch-cpu" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return use_kernel_mapping({"RMSNorm": {"cpu": LocalLayerRepository(repo_path=root, layer_name="RMSNorm")}})


def test_hub_kernels_compose_or_are_refused(tmp_path, monkeypatch):
    """from_pretrained(use_kernels=True) under quantize_experts_on_load: with a compatible `kernels`
    installed, kernelize binds a kernel to the layers it maps (here a local RMSNorm build), leaves
    the experts forward alone, and the logits equal a load without hub kernels; without one,
    transformers refuses the load (nothing is replaced silently)."""
    from transformers.utils.import_utils import is_kernels_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    path = save_tiny_checkpoint("qwen3_moe", str(tmp_path / "model"))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    with quantize_experts_on_load():
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=False)
    if not is_kernels_available():
        with pytest.raises((ValueError, ImportError), match="(?i)kernels"):
            with quantize_experts_on_load():
                AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=True)
        return
    with local_kernel_mapping(tmp_path / "rmsnorm_kernel"), quantize_experts_on_load():
        kernelized = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=True)
    assert kernelized.use_kernels
    assert any("forward" in m.__dict__ for m in kernelized.modules()), "kernelize bound no layer forward"
    experts = find_experts_modules(kernelized)
    assert experts and all("forward" not in m.__dict__ for _, m in experts)
    assert {m.config._experts_implementation for _, m in experts} == {"moequant"}
    with torch.no_grad(), NoDequantize():
        torch.testing.assert_close(kernelized(ids).logits, plain(ids).logits, atol=0, rtol=0)


def test_installed_transformers_is_in_the_stated_range():
    """The range in setup.py covers every transformers these tests run on (pinned and newest)."""
    from packaging.specifiers import SpecifierSet

    setup_py = (pathlib.Path(__file__).parent.parent / "setup.py").read_text()
    stated = re.search(r'SUPPORTED_TRANSFORMERS = "transformers([^"]+)"', setup_py).group(1)
    assert transformers.__version__ in SpecifierSet(stated), (transformers.__version__, stated)
