"""PEFT LoRA on quantized experts: target_parameters matching, training through the fused op,
adapter keys identical to the bf16 model's, save/load, merge, and the errors."""

from __future__ import annotations

import pytest
import torch

from _integration_models import ARCHITECTURES, NoDequantize, save_tiny_checkpoint

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from moequant.integrations import find_experts_modules, nf4_stack_of, quantize_experts_on_load  # noqa: E402
from moequant.integrations.experts import experts_layout  # noqa: E402

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
STEPS = 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: save_tiny_checkpoint(arch, str(tmp_path_factory.mktemp(arch))) for arch in ARCHITECTURES}


def lora_config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=EXPERT_TARGETS, lora_dropout=0.0)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def quantized(path, dtype=torch.bfloat16):
    with quantize_experts_on_load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def dequantized_twin(path, model, dtype=torch.bfloat16):
    """The plain (unquantized) model class with the dequantized expert weights: what serving would load."""
    twin = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="grouped_mm")
    # the quantized experts by their unwrapped names (PeftModel prefixes them, ParamWrappers nest them)
    sources = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): m
        for n, m in model.named_modules()
        if getattr(m, "_moequant_layout", None) is not None
    }
    with torch.no_grad():
        for name, module in find_experts_modules(twin):
            source = sources[name]
            for pname in experts_layout(module).weight_names:
                getattr(module, pname).copy_(nf4_stack_of(source, pname).dequantize())
    return twin.eval()


def batch(seed=3, length=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (2, length), generator=g)


def lora_keys(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if "lora_" in k}


def train(model, ids, steps=STEPS, lr=2e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_on_quantized_experts(arch, checkpoints, tmp_path):
    # float32 weights so that rounding cannot flip a router's top-k between the compared models
    # (bf16 is covered by test_bf16_train_merge_and_reload); the experts are NF4 either way.
    dtype = torch.float32
    path = checkpoints[arch]
    model = get_peft_model(quantized(path, dtype), lora_config())
    # same adapter layout as on the plain model (PEFT's nesting order included)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), lora_config())
    assert lora_keys(model) == lora_keys(plain)
    assert any("experts.base_layer.lora_A" in k for k in lora_keys(model))
    assert model.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()

    ids = batch()
    with NoDequantize():
        losses = train(model, ids)
    # about 0.75-0.8x after 20 steps on every architecture and torch version seen; 0.9 leaves room
    # for run-to-run drift (torch 2.11 reached 0.807 on flex_olmo) while still catching no learning
    assert losses[-1] < 0.9 * losses[0], losses
    experts_lora = [p for n, p in model.named_parameters() if "experts" in n and "lora_B" in n]
    assert experts_lora and all(p.abs().sum() > 0 for p in experts_lora)  # gradients reached the factors

    with torch.no_grad():
        adapted = model(ids).logits

    # save / reload onto a fresh quantized model: identical outputs
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quantized(path, dtype), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=0, rtol=0)

    # the adapter loads onto the unquantized model holding the dequantized weights, and merges there
    twin = PeftModel.from_pretrained(dequantized_twin(path, model, dtype), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, adapted, atol=2e-4, rtol=2e-4)
    merged_twin = twin.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged_twin(ids).logits, adapted, atol=2e-4, rtol=2e-4)

    # merge_and_unload on the quantized model: dense experts with the adapter folded in
    merged = reloaded.merge_and_unload()
    experts = find_experts_modules(merged)[0][1]
    assert experts.gate_up_proj.dtype == dtype and not hasattr(experts, "parametrizations")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=2e-4, rtol=2e-4)


def test_bf16_train_merge_and_reload(checkpoints, tmp_path):
    path = checkpoints["qwen3_moe"]
    model = get_peft_model(quantized(path), lora_config())
    ids = batch()
    losses = train(model, ids)
    # about 0.75-0.8x after 20 steps on every architecture and torch version seen; 0.9 leaves room
    # for run-to-run drift (torch 2.11 reached 0.807 on flex_olmo) while still catching no learning
    assert losses[-1] < 0.9 * losses[0], losses
    with torch.no_grad():
        adapted = model(ids).logits.float()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quantized(path), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload()
    assert find_experts_modules(merged)[0][1].down_proj.dtype == torch.bfloat16
    with torch.no_grad():
        diff = (merged(ids).logits.float() - adapted).abs()
        without_adapter = (quantized(path)(ids).logits.float() - adapted).abs()
    # bf16 rounding of W + delta (and the odd top-k flip it causes) stays small on average (about
    # 5% of |logits| here), and far below what the adapter itself changes
    assert diff.mean() < 0.1 * adapted.abs().mean(), (diff.mean(), adapted.abs().mean())
    assert diff.mean() < 0.25 * without_adapter.mean(), (diff.mean(), without_adapter.mean())


def test_lora_factors_match_peft_dense_delta(checkpoints):
    """Float32, so the comparison is tight: moequant's factored LoRA equals PEFT's dense W + scaling*B@A,
    in the logits and in every LoRA gradient (the op's backward maps onto PEFT's factor layout)."""
    for arch in ("qwen3_moe", "gpt_oss"):
        path = checkpoints[arch]
        model = get_peft_model(quantized(path, torch.float32), lora_config(init_lora_weights=False))
        twin = get_peft_model(dequantized_twin(path, model.base_model.model, torch.float32), lora_config())
        twin.load_state_dict(model.state_dict(), strict=False)
        ids = batch()
        logits = model(input_ids=ids).logits
        expected = twin(input_ids=ids).logits
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)
        (logits.square().mean()).backward()
        (expected.square().mean()).backward()
        twin_params = dict(twin.named_parameters())
        checked = 0
        for name, param in model.named_parameters():
            if "lora_" in name and "experts" in name:
                torch.testing.assert_close(param.grad, twin_params[name].grad, atol=1e-5, rtol=1e-3)
                checked += 1
        assert checked == 4 * model.base_model.model.config.num_hidden_layers


def test_inference_hands_peft_factors_over_uncopied(checkpoints):
    """Without autograd the experts' LoRA factors reach the op in PEFT's dtype (float32), which the
    op rounds to the compute dtype itself, with no per-step copy of every expert's factors: on CPU
    A as a view of PEFT's weight and B from a copy made once (expert-major, the layout the CPU op
    reads by expert; see test_cpu_inference_keeps_one_copy_of_b). The logits equal, bit for bit,
    those of a forward with autograd on, where the factors are converted to bf16 before the op
    (PEFT's fresh float32 factors hold bf16 values)."""
    from moequant.integrations import lora_factors

    model = get_peft_model(quantized(checkpoints["qwen3_moe"]), lora_config(init_lora_weights=False)).eval()
    wrappers = [m for m in model.modules() if hasattr(m, "parameter_name") and hasattr(m, "lora_A")]
    assert len(wrappers) == 2 * model.base_model.model.config.num_hidden_layers
    for wrapper in wrappers:
        weight_a, weight_b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        assert weight_a.dtype == torch.float32  # PEFT's default adapter dtype beside a bf16 model
        with torch.no_grad():
            a, b, _ = lora_factors(wrapper, ["default"], torch.bfloat16)
        assert a.dtype == b.dtype == torch.float32
        assert a.data_ptr() == weight_a.data_ptr()  # a view, no copy
        assert b.is_contiguous() and torch.equal(b, weight_b.view(b.shape[1], -1, b.shape[0]).permute(2, 0, 1))
        a, b, _ = lora_factors(wrapper, ["default"], torch.bfloat16)  # autograd on: converted in the graph
        assert a.dtype == b.dtype == torch.bfloat16 and a.requires_grad
    ids = batch()
    with torch.no_grad():
        inference = model(input_ids=ids).logits
    with_autograd = model(input_ids=ids).logits
    assert with_autograd.requires_grad
    assert torch.equal(inference, with_autograd.detach())


def trained_like(model, seed=0):
    """Perturb every LoRA weight by float32 noise, so that (unlike PEFT's fresh factors) they do not
    hold bf16 values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=g) * 1e-3)
    return model


def test_cpu_inference_keeps_one_copy_of_b(checkpoints, monkeypatch):
    """On CPU the inference factors come from a copy made once per adapter version: the same object
    on every step, remade after an in-place update of the weights (an optimizer step,
    ``load_state_dict``) or a new tensor under the parameter, dropped by a forward with autograd,
    and giving bit for bit the logits of the uncached path (MOEQUANT_PEFT_CPU_CACHE=0)."""
    from moequant.integrations import lora_factors

    model = get_peft_model(quantized(checkpoints["qwen3_moe"]), lora_config(init_lora_weights=False))
    trained_like(model).eval()
    wrapper = next(m for m in model.modules() if hasattr(m, "parameter_name") and hasattr(m, "lora_A"))
    weight_b = wrapper.lora_B["default"].weight
    ids = batch()
    with torch.no_grad():
        cached = model(input_ids=ids).logits
        monkeypatch.setenv("MOEQUANT_PEFT_CPU_CACHE", "0")
        uncached = model(input_ids=ids).logits
        a_view, b_view, _ = lora_factors(wrapper, ["default"], torch.bfloat16)
        assert not b_view.is_contiguous()  # PEFT's expert-minor layout, as the op got it before
        b_before = b_view.clone()
        monkeypatch.delenv("MOEQUANT_PEFT_CPU_CACHE")
        assert torch.equal(cached, uncached)

        first = lora_factors(wrapper, ["default"], torch.bfloat16)
        assert lora_factors(wrapper, ["default"], torch.bfloat16)[1] is first[1]  # no copy per step
        assert torch.equal(first[1], b_before) and first[1].is_contiguous()
        weight_b.mul_(2)  # in place: the version counter moves
        second = lora_factors(wrapper, ["default"], torch.bfloat16)
        assert second[1] is not first[1] and torch.equal(second[1], 2 * b_before)
        weight_b.data = weight_b.data * 3  # a new tensor under the same parameter
        third = lora_factors(wrapper, ["default"], torch.bfloat16)
        assert torch.equal(third[1], weight_b.view(b_view.shape[1], -1, b_view.shape[0]).permute(2, 0, 1))
        assert torch.equal(third[1], 6 * b_before)
    model(input_ids=ids).logits.sum().backward()  # training drops the copies
    assert all(getattr(m, "_moequant_cpu_lora_cache", None) is None for m in model.modules())


def test_cpu_inference_cache_with_two_adapters(checkpoints, monkeypatch):
    """Two active adapters at inference: their concatenation is made once, not on every step, and
    gives the uncached path's logits; switching adapters remakes it."""
    config = lora_config(init_lora_weights=False)
    model = get_peft_model(quantized(checkpoints["qwen3_moe"]), config, adapter_name="first")
    model.add_adapter("second", lora_config(init_lora_weights=False))
    trained_like(model).eval()
    ids = batch()
    with torch.no_grad():
        model.base_model.set_adapter(["first", "second"])
        both = model(input_ids=ids).logits
        wrapper = next(m for m in model.modules() if hasattr(m, "parameter_name") and hasattr(m, "lora_A"))
        entry = wrapper._moequant_cpu_lora_cache
        model(input_ids=ids)
        assert wrapper._moequant_cpu_lora_cache is entry
        model.base_model.set_adapter("second")
        only_second = model(input_ids=ids).logits
        assert wrapper._moequant_cpu_lora_cache is not entry
        monkeypatch.setenv("MOEQUANT_PEFT_CPU_CACHE", "0")
        assert torch.equal(model(input_ids=ids).logits, only_second)
        model.base_model.set_adapter(["first", "second"])
        assert torch.equal(model(input_ids=ids).logits, both)
        assert not torch.equal(both, only_second)


def test_multiple_adapters_and_disable(checkpoints):
    path = checkpoints["qwen3_moe"]
    model = get_peft_model(quantized(path, torch.float32), lora_config(init_lora_weights=False), adapter_name="first")
    model.add_adapter("second", lora_config(init_lora_weights=False))
    ids = batch()
    with torch.no_grad():
        model.set_adapter("first")
        out_a = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        model.base_model.set_adapter(["first", "second"])
        out_ab = model(ids).logits
    assert not torch.allclose(out_a, base) and not torch.allclose(out_ab, out_a)
    twin = get_peft_model(dequantized_twin(path, model.base_model.model, torch.float32), lora_config(), adapter_name="first")
    twin.add_adapter("second", lora_config())
    twin.load_state_dict(model.state_dict(), strict=False)
    twin.base_model.set_adapter(["first", "second"])
    with torch.no_grad():
        torch.testing.assert_close(out_ab, twin.eval()(ids).logits, atol=2e-4, rtol=2e-4)


def test_lora_dropout_is_rejected(checkpoints):
    with pytest.raises(ValueError, match="lora_dropout"):
        get_peft_model(quantized(checkpoints["qwen3_moe"]), lora_config(lora_dropout=0.1))


def test_full_name_targets_and_gradient_checkpointing(checkpoints):
    path = checkpoints["qwen3_moe"]
    full = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    model = get_peft_model(quantized(path), lora_config(target_parameters=full, target_modules=None))
    plain = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
        lora_config(target_parameters=EXPERT_TARGETS, target_modules=None),
    )
    assert lora_keys(model) == lora_keys(plain)
    for reentrant in (True, False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        with NoDequantize():
            losses = train(model, batch(), steps=3)
        assert losses[-1] < losses[0]
        for _, module in find_experts_modules(model):
            assert getattr(module, "_moequant_lora", {}) == {}


def test_qlora_with_bitsandbytes_linear(checkpoints):
    """BitsAndBytesConfig(load_in_4bit=True) for the nn.Linear layers, moequant for the experts."""
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    path = checkpoints["qwen3_moe"]
    try:
        with quantize_experts_on_load():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16,
                quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
            )
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"bitsandbytes 4-bit unavailable here: {err}")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(target_modules=["q_proj", "o_proj"]))
    with NoDequantize():
        losses = train(model, batch().to(model.device), steps=10)  # bitsandbytes places it on the GPU if any
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_lora_on_cuda_matches_cpu(arch, checkpoints):
    path = checkpoints[arch]
    with quantize_experts_on_load():
        gpu = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cuda")
    cpu = quantized(path, torch.float32)
    gpu = get_peft_model(gpu, lora_config(init_lora_weights=False))
    cpu = get_peft_model(cpu, lora_config(init_lora_weights=False))
    cpu.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items() if "lora_" in k}, strict=False)
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits, atol=1e-3, rtol=1e-3)
    with NoDequantize():
        losses = train(gpu, ids.cuda(), steps=10)
    assert losses[-1] < losses[0]


def test_lora_moe_block_compiles_fullgraph_without_recompiles(checkpoints):
    """The factored LoRA reaches the op as plain tensors: no parametrization re-registered per call,
    so a MoE block with adapters traces with fullgraph=True and stays one graph across calls."""
    import torch._dynamo.testing

    model = get_peft_model(quantized(checkpoints["qwen3_moe"], torch.float32), lora_config(init_lora_weights=False))
    block = model.base_model.model.model.layers[0].mlp
    hidden = torch.randn(2, 16, 64)
    with torch.no_grad():
        expected = block(hidden)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            out = compiled(hidden)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    torch.testing.assert_close(out, expected)
