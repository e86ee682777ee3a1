"""transformers integration: quantize-on-load, the "moequant" experts implementation, accounting,
saving and the pre-quantized cache. Tiny random checkpoints, built and saved by the tests."""

from __future__ import annotations

import importlib.util
import logging
import os
import time

import pytest
import torch

from _integration_models import (
    ARCHITECTURES, FUSED_CHECKPOINT_ARCHITECTURES, NoDequantize, build_tiny_model, save_fused_checkpoint,
    save_tiny_checkpoint,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

import moequant  # noqa: E402
import moequant.integrations.parametrize  # noqa: E402
from moequant.integrations import (  # noqa: E402
    find_experts_modules,
    is_quantized,
    load_quantized,
    load_stats,
    memory_summary,
    nf4_stack_of,
    quantize_experts_on_load,
    quantize_model_experts,
    save_quantized,
)
from moequant.integrations.experts import experts_layout  # noqa: E402
from moequant.integrations.parametrize import NF4Parametrization  # noqa: E402
from moequant.integrations.transformers import _is_expert_fusion, quantized_stacks  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny checkpoint per architecture (transformers saves experts per expert)."""
    return {arch: save_tiny_checkpoint(arch, str(tmp_path_factory.mktemp(arch))) for arch in ARCHITECTURES}


def load_quantized_on_load(path, dtype=torch.bfloat16, quant_type="nf4", double_quant=None, **kwargs):
    with quantize_experts_on_load(quant_type=quant_type, double_quant=double_quant):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def dequantized_reference(path, quantized, dtype=torch.bfloat16):
    """The model whose expert weights are exactly the dequantized NF4 stacks (grouped_mm experts)."""
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="grouped_mm")
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in find_experts_modules(reference):
            for pname in experts_layout(module).weight_names:
                getattr(module, pname).copy_(nf4_stack_of(modules[name], pname).dequantize())
    return reference.eval()


def sample_ids(batch=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, length), generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantized_logits_match_dequantized_bf16(arch, checkpoints):
    # float32 so that bf16 rounding cannot flip a router's top-k between the two models
    path = checkpoints[arch]
    model = load_quantized_on_load(path, dtype=torch.float32)
    experts = find_experts_modules(model)
    assert experts and all(is_quantized(m, p) for _, m in experts for p in ("gate_up_proj", "down_proj"))
    assert {m.config._experts_implementation for _, m in experts} == {"moequant"}  # a sub-config for MuseSpark
    name, module = experts[0]
    # The class is kept (parametrize derives a subclass) and the parameter reads as the dense tensor.
    assert isinstance(module, type(dict(build_tiny_model(arch).named_modules())[name]))
    stack = nf4_stack_of(module, "gate_up_proj")
    assert torch.equal(module.gate_up_proj, moequant.dequant_expert(stack))
    assert module.parametrizations.gate_up_proj.original.dtype == torch.uint8

    reference = dequantized_reference(path, model, torch.float32)
    ids = sample_ids()
    with torch.no_grad(), NoDequantize():
        logits = model(ids).logits
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # the quantization error itself is much larger than that: the comparison is meaningful
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        unquantized = plain(ids).logits.float()
    assert (logits - expected).abs().max() < 0.01 * (unquantized - expected).abs().max()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_memory_accounting(arch, checkpoints):
    path = checkpoints[arch]
    model = load_quantized_on_load(path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert model.num_parameters() == plain.num_parameters()
    summary = memory_summary(model)
    dense = sum(p.numel() * 2 for n, p in plain.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert summary.experts_dense_bytes == dense
    packed = 0
    for _, module in find_experts_modules(model):
        for pname in ("gate_up_proj", "down_proj"):
            stack = nf4_stack_of(module, pname)
            assert stack.packed.numel() * 2 == stack.shape.numel()
            # the loader's default: NF4 with double-quantized statistics (uint8 codes, a scale per
            # 256 blocks, an offset per expert)
            assert stack.format == "nf4+dq" and stack.absmax.dtype == torch.uint8
            packed += (stack.shape.numel() // 2 + stack.absmax.numel() + stack.absmax_scale.numel() * 4
                       + stack.absmax_offset.numel() * 4)
    assert summary.experts_packed_bytes == packed
    assert summary.formats == ("nf4+dq",) and f"{summary.bytes_per_weight:.4f} B/weight" in summary.format()
    assert 0.5 < summary.bytes_per_weight < 0.5625
    assert model.get_memory_footprint() == plain.get_memory_footprint() - dense + packed
    stats = load_stats(model)
    assert stats.num_stacks == summary.num_stacks and stats.packed_bytes == packed


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_fused_checkpoint_loads(arch, tmp_path):
    source = build_tiny_model(arch)
    path = save_fused_checkpoint(source, str(tmp_path))
    model = load_quantized_on_load(path, dtype=torch.float32)
    ids = sample_ids()
    reference = dequantized_reference(path, model, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    assert memory_summary(model).num_stacks == 2 * source.config.num_hidden_layers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_per_expert_quantization_equals_fused_quantization(arch, checkpoints, monkeypatch):
    """fuse="quantized" (experts quantized one by one into the stack) stores the same codes and
    absmax as quantizing transformers' fused tensor (fuse="cpu"), for every architecture; it is
    used wherever the checkpoint stores one tensor per expert."""
    import moequant.integrations.transformers as integration

    streamed = []
    real = integration._quantize_experts_streaming

    def counting(*args):
        stack = real(*args)
        streamed.append(stack is not None)
        return stack

    monkeypatch.setattr(integration, "_quantize_experts_streaming", counting)
    models = {}
    for fuse in ("quantized", "cpu"):
        with quantize_experts_on_load(fuse=fuse):
            models[fuse] = AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.bfloat16)
    per_expert_checkpoint = arch not in FUSED_CHECKPOINT_ARCHITECTURES
    assert (len(streamed) > 0 and all(streamed)) == per_expert_checkpoint, streamed
    pairs = zip(quantized_stacks(models["quantized"]), quantized_stacks(models["cpu"]))
    count = 0
    for (name_a, module_a, p_a), (name_b, module_b, p_b) in pairs:
        assert (name_a, p_a) == (name_b, p_b)
        a, b = nf4_stack_of(module_a, p_a), nf4_stack_of(module_b, p_b)
        assert a.format == b.format == "nf4+dq"
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y), (name_a, p_a)
        assert (a.shape, a.dtype, a.blocksize) == (b.shape, b.dtype, b.blocksize)
        count += 1
    assert count == memory_summary(models["cpu"]).num_stacks > 0
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(models["quantized"](ids).logits, models["cpu"](ids).logits, rtol=0, atol=0)


def test_streaming_quantization_matches_fused_and_declines_straddling_blocks():
    """Expert-by-expert quantization equals quantizing the fused [E, sum N_s, K] tensor; when a
    block would straddle two concatenated projections it declines, leaving what it loaded usable."""
    from moequant.integrations.transformers import _quantize_experts_streaming

    gate = [torch.randn(32, 64) for _ in range(3)]
    up = [torch.randn(32, 64) for _ in range(3)]
    stack = _quantize_experts_streaming([[lambda t=t: t for t in gate], [lambda t=t: t for t in up]], 64)
    fused = moequant.quantize_nf4(torch.cat([torch.stack(gate), torch.stack(up)], dim=1), 64)
    assert stack.shape == fused.shape == (3, 64, 64)
    assert torch.equal(stack.packed, fused.packed) and torch.equal(stack.absmax, fused.absmax)

    odd = [torch.randn(3, 32) for _ in range(2)]  # 96 elements per expert: a 64-block straddles rows
    sources = [[lambda t=t: t for t in odd]]
    assert _quantize_experts_streaming(sources, 64) is None
    assert all(f() is t for f, t in zip(sources[0], odd))


def test_unrecognised_fusion_chain_falls_back_to_cpu_fusion(checkpoints, monkeypatch):
    import transformers.core_model_loading as loading

    import moequant.integrations.transformers as integration

    monkeypatch.setattr(integration, "_is_stack_fusion", lambda converter: False)
    forced = []
    real_convert = loading.convert_and_load_state_dict_in_model

    def spy(*args, **kwargs):
        forced.extend(c.force_cpu for c in kwargs["load_config"].weight_mapping if _is_expert_fusion(c))
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(loading, "convert_and_load_state_dict_in_model", spy)
    monkeypatch.setattr(transformers.modeling_utils, "convert_and_load_state_dict_in_model", spy, raising=False)
    model = load_quantized_on_load(checkpoints["mixtral"])
    assert forced and all(forced)
    monkeypatch.undo()
    reference = load_quantized_on_load(checkpoints["mixtral"])
    for (_, m_a, p), (_, m_b, _) in zip(quantized_stacks(model), quantized_stacks(reference)):
        assert torch.equal(nf4_stack_of(m_a, p).packed, nf4_stack_of(m_b, p).packed)


@pytest.mark.parametrize("fuse", ["quantized", "cpu"])
def test_load_peak_and_loader_traps_neutralised(tmp_path, monkeypatch, fuse):
    """Deep enough that the experts dominate: the load never holds more than the final model plus
    one dense expert tensor, warmup is skipped and the async prefetch is off, only while active.
    fuse="quantized" hands the loader packed stacks (no dense fused tensor at all); fuse="cpu"
    fuses on the CPU and releases each dense tensor as soon as it is quantized."""
    import transformers.core_model_loading as loading
    import transformers.modeling_utils as modeling_utils

    from moequant.integrations.transformers import _QuantizedExperts

    path = save_tiny_checkpoint("qwen3_moe", str(tmp_path), num_hidden_layers=24)
    seen = {}
    real_convert = loading.convert_and_load_state_dict_in_model

    def spy(*args, **kwargs):
        seen["async_off"] = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        seen["warmup"] = modeling_utils.caching_allocator_warmup.__name__
        fusions = [c for c in kwargs["load_config"].weight_mapping if _is_expert_fusion(c)]
        seen["fused_on_cpu"] = bool(fusions) and all(c.force_cpu for c in fusions)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(loading, "convert_and_load_state_dict_in_model", spy)
    monkeypatch.setattr(modeling_utils, "convert_and_load_state_dict_in_model", spy, raising=False)
    warmup, setter = modeling_utils.caching_allocator_warmup, loading.set_param_for_module
    converter_convert = loading.WeightConverter.convert
    values = []
    dense_reads = []
    real_forward = NF4Parametrization.forward
    monkeypatch.setattr(NF4Parametrization, "forward", lambda self, packed: dense_reads.append(1) or real_forward(self, packed))
    with quantize_experts_on_load(fuse=fuse):
        hooked = loading.set_param_for_module

        def watch(model, target_name, value, *args, **kwargs):
            hooked(model, target_name, value, *args, **kwargs)
            if target_name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                # packed, or dense with its storage released (the loader's reference holds nothing)
                values.append("packed" if isinstance(value, _QuantizedExperts) else value.numel() == 0)

        loading.set_param_for_module = watch
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        finally:
            loading.set_param_for_module = hooked
    assert values == ["packed" if fuse == "quantized" else True] * 48
    assert not dense_reads  # nothing (transformers' _init_weights included) dequantized a whole stack
    assert seen == {"async_off": "1", "warmup": "_skip_caching_allocator_warmup", "fused_on_cpu": fuse == "cpu"}
    assert modeling_utils.caching_allocator_warmup is warmup and loading.set_param_for_module is setter
    assert loading.WeightConverter.convert is converter_convert
    assert "HF_DEACTIVATE_ASYNC_LOAD" not in os.environ or os.environ["HF_DEACTIVATE_ASYNC_LOAD"] != "1"

    stats = load_stats(model)
    final = memory_summary(model).total_bytes
    assert stats.num_stacks == 48
    assert stats.peak_resident_bytes <= 1.10 * final, (stats.peak_resident_bytes, final)


def test_load_logs_progress_and_summary(checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="moequant"):
        load_quantized_on_load(checkpoints["qwen3_moe"])
    text = caplog.text
    assert "quantizing fused experts of Qwen3MoeForCausalLM" in text
    assert "MB dense ->" in text and "peak resident while loading" in text


def test_bad_load_options_raise_clear_errors():
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        with quantize_experts_on_load(blocksize=48):
            pass
    with pytest.raises(ValueError, match=r"fuse must be one of \('quantized', 'cpu', 'device'\), got 'gpu'"):
        with quantize_experts_on_load(fuse="gpu"):
            pass


def test_unsupported_models_raise_clear_errors(tmp_path):
    from torch import nn
    from transformers import LlamaConfig
    from transformers.integrations.moe import use_experts_implementation

    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    )
    llama.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no fused experts module"):
        load_quantized_on_load(str(tmp_path))

    @use_experts_implementation(has_gate=False)
    class UngatedExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.up_proj = nn.Parameter(torch.zeros(4, 32, 64))
            self.down_proj = nn.Parameter(torch.zeros(4, 64, 32))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = UngatedExperts(llama.config)

    with pytest.raises(ValueError, match=r"Wrapper.experts: UngatedExperts has no gate \(has_gate=False"):
        quantize_model_experts(Wrapper())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_state_dict_round_trip_and_cached_load(arch, checkpoints, tmp_path, monkeypatch, caplog):
    path = checkpoints[arch]
    start = time.perf_counter()
    model = load_quantized_on_load(path)
    quantize_load_s = time.perf_counter() - start

    # plain state dict round trip into a second quantized model
    other = load_quantized_on_load(path)
    with torch.no_grad():
        for _, module in find_experts_modules(other):
            module.parametrizations.gate_up_proj.original.zero_()
    other.load_state_dict(model.state_dict())
    ids = sample_ids()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(other(ids).logits, expected, atol=0, rtol=0)

    # the pre-quantized cache loads without calling the quantizer
    save_quantized(model, str(tmp_path / "cache"))
    calls = []
    real_quantize = moequant.integrations.parametrize.quantize

    def counting(weight, *args, **kwargs):
        if weight.device.type != "meta":
            calls.append(tuple(weight.shape))
        return real_quantize(weight, *args, **kwargs)

    monkeypatch.setattr(moequant.integrations.parametrize, "quantize", counting)
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="moequant"):
        cached = load_quantized(str(tmp_path / "cache"))
    cached_load_s = time.perf_counter() - start
    assert calls == []
    assert {m.config._experts_implementation for _, m in find_experts_modules(cached)} == {"moequant"}
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, expected, atol=0, rtol=0)
    assert cached.num_parameters() == model.num_parameters()
    assert memory_summary(cached) == memory_summary(model)
    assert find_experts_modules(cached)[0][1].down_proj.dtype == torch.bfloat16
    logging.getLogger(__name__).info(
        "%s tiny: quantize-on-load %.3f s, pre-quantized cache %.3f s", arch, quantize_load_s, cached_load_s
    )


def test_dtype_and_device_map(checkpoints):
    path = checkpoints["qwen3_moe"]
    model = load_quantized_on_load(path, device_map="auto")
    ids = sample_ids().to(model.device)  # "auto" places the model on the GPU when there is one
    with torch.no_grad():
        bf16 = model(ids).logits
    stack = nf4_stack_of(find_experts_modules(model)[0][1], "gate_up_proj")
    model.float()  # the statistics keep their dtypes (uint8 codes, float32 scale/offset), the stacks read as float32
    stack32 = nf4_stack_of(find_experts_modules(model)[0][1], "gate_up_proj")
    assert stack32.absmax.dtype == torch.uint8 and torch.equal(stack32.absmax, stack.absmax)
    assert stack32.absmax_scale.dtype == stack32.absmax_offset.dtype == torch.float32
    assert torch.equal(stack32.absmax_scale, stack.absmax_scale) and torch.equal(stack32.absmax_offset, stack.absmax_offset)
    assert find_experts_modules(model)[0][1].gate_up_proj.dtype == torch.float32
    # bf16 vs fp32 compute may flip a random router's top-k, so the reference is the same
    # checkpoint loaded in fp32 (same codes and absmax, as the checkpoint is bf16)
    reference = load_quantized_on_load(path, dtype=torch.float32, device_map="auto")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_keeps_no_dense_stack(checkpoints):
    """Reentrant and non-reentrant checkpointing: nothing saved for backward is a dense stack."""
    path = checkpoints["qwen3_moe"]
    for reentrant in (True, False):
        model = load_quantized_on_load(path)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        dense_shapes = {tuple(nf4_stack_of(m, p).shape) for _, m in find_experts_modules(model) for p in ("gate_up_proj", "down_proj")}
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t

        ids = sample_ids()
        with NoDequantize(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        assert not [s for s in saved if s[0] in dense_shapes and s[1].is_floating_point], reentrant
        assert getattr(find_experts_modules(model)[0][1], "_moequant_lora", {}) == {}


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")
def test_composes_with_bitsandbytes_4bit_linear(checkpoints):
    from transformers import BitsAndBytesConfig

    path = checkpoints["qwen3_moe"]
    try:
        model = load_quantized_on_load(
            path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
        )
    except (ImportError, RuntimeError, ValueError) as err:  # bitsandbytes without a backend for this device
        if "moequant" in str(err):
            raise
        pytest.skip(f"bitsandbytes 4-bit unavailable here: {err}")
    import bitsandbytes as bnb

    attn = model.model.layers[0].self_attn.q_proj
    assert isinstance(attn, bnb.nn.Linear4bit)
    assert memory_summary(model).num_stacks == 4
    with torch.no_grad():
        logits = model(sample_ids().to(model.device)).logits  # bitsandbytes moves the model to the GPU if any
    assert torch.isfinite(logits).all()


@requires_cuda
@pytest.mark.parametrize("fuse", ["quantized", "cpu", "device"])
def test_cuda_load_peak(tmp_path, fuse):
    """On the GPU the allocator's peak during the load stays within 10% of the final model
    (experts large enough here for the bound to mean something: one dense gate_up is ~7%); per
    expert quantization peaks at the final model plus one expert's tensor."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=96, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                            num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=16, num_experts_per_tok=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with quantize_experts_on_load(fuse=fuse):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    final = torch.cuda.memory_allocated() - base
    assert nf4_stack_of(find_experts_modules(model)[0][1], "down_proj").device.type == "cuda"
    logging.getLogger(__name__).info("cuda load fuse=%s: peak %d, final %d", fuse, peak, final)
    dense_gate_up = 16 * 2 * 256 * 256 * 2
    if fuse == "cpu":
        assert peak <= 1.10 * final, (peak, final)
    if fuse == "quantized":
        assert peak - final < dense_gate_up / 4, (peak, final)  # never a dense fused stack
    with torch.no_grad():
        assert torch.isfinite(model(sample_ids().cuda()).logits).all()


def test_auto_device_map_sizes_experts_at_nf4(tmp_path):
    """With a memory budget that fits the NF4 model but not the bf16 one, device_map="auto" keeps
    every layer on the device instead of offloading experts sized at bf16."""
    import transformers.integrations.accelerate as accelerate_integration
    from accelerate import init_empty_weights

    path = save_tiny_checkpoint("qwen3_moe", str(tmp_path), num_hidden_layers=4)
    config = transformers.AutoConfig.from_pretrained(path)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    dense, _ = accelerate_integration.compute_module_sizes(meta)
    with quantize_experts_on_load():
        packed, leaves = accelerate_integration.compute_module_sizes(meta)
    experts = meta.model.layers[0].mlp.experts
    numel = experts.gate_up_proj.numel() + experts.down_proj.numel()
    assert dense["model.layers.0.mlp.experts"] == numel * 2
    # the default format, NF4 with double-quantized statistics: per expert matrix one uint8 code
    # per block, one fp32 scale per 256 blocks, one fp32 offset
    stacked = sum(moequant.formats.stack_nbytes(p.shape, 64, "nf4", True) for p in (experts.gate_up_proj, experts.down_proj))
    num_experts = experts.gate_up_proj.shape[0]
    groups = sum(-(-p[0].numel() // 64 // 256) for p in (experts.gate_up_proj, experts.down_proj))
    assert stacked == numel // 2 + numel // 64 + num_experts * (4 * groups + 4 * 2)
    assert packed["model.layers.0.mlp.experts"] == leaves["model.layers.0.mlp.experts"] == stacked
    assert dense[""] - packed[""] == 4 * (numel * 2 - stacked)
    with quantize_experts_on_load(quant_type="int8"):
        int8, _ = accelerate_integration.compute_module_sizes(meta)
    rows = experts.gate_up_proj.shape[0] * (experts.gate_up_proj.shape[1] + experts.down_proj.shape[1])
    assert int8["model.layers.0.mlp.experts"] == numel + 4 * rows

    budget = int(packed[""] * 1.3)
    assert budget < dense[""]
    with pytest.raises(ValueError, match="offloaded to the disk"):  # what bf16 sizing does with that budget
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": budget})
    model = load_quantized_on_load(path, device_map="auto", max_memory={"cpu": budget})
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert memory_summary(model).num_stacks == 8


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_save_pretrained_writes_dequantized_experts(arch, checkpoints, tmp_path):
    """A plain load of the saved model is the dequantized twin; quantizing it again is lossless
    (plain NF4: each block's absmax is one of its dequantized values; double-quantized statistics
    are themselves rounded, so there only the codes come back)."""
    path = checkpoints[arch]
    model = load_quantized_on_load(path, dtype=torch.float32, double_quant=False)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    reference = dequantized_reference(path, model, torch.float32)
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reference(ids).logits, atol=0, rtol=0)
    again = load_quantized_on_load(str(tmp_path), dtype=torch.float32, double_quant=False)
    again_dq = load_quantized_on_load(str(tmp_path), dtype=torch.float32)
    for (_, m1), (_, m2), (_, m3) in zip(find_experts_modules(model), find_experts_modules(again),
                                         find_experts_modules(again_dq)):
        for pname in ("gate_up_proj", "down_proj"):
            s1, s2, s3 = nf4_stack_of(m1, pname), nf4_stack_of(m2, pname), nf4_stack_of(m3, pname)
            assert torch.equal(s1.packed, s2.packed) and torch.equal(s1.absmax, s2.absmax)
            assert s3.double_quant and torch.equal(s1.packed, s3.packed)


def test_experts_missing_from_checkpoint_are_quantized_after_init(tmp_path):
    """transformers initializes parameters the checkpoint lacks after loading; those get quantized too."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_checkpoint("gpt_oss", str(tmp_path))  # gpt-oss stores its experts fused
    weights = os.path.join(path, "model.safetensors")
    state = {k: v for k, v in load_file(weights).items() if "layers.1.mlp.experts.down_proj" not in k or "bias" in k}
    save_file(state, weights, metadata={"format": "pt"})
    model = load_quantized_on_load(path)
    experts = find_experts_modules(model)
    assert all(is_quantized(m, p) for _, m in experts for p in ("gate_up_proj", "down_proj"))
    assert load_stats(model).num_stacks == 3  # quantized while loading; the fourth after initialization


@pytest.mark.parametrize("quant_type,double_quant", [("fp4", True), ("int8", None), ("nf4", False)])
def test_formats_load_run_and_round_trip(quant_type, double_quant, checkpoints, tmp_path):
    """Quantize-on-load in each format (per-expert checkpoint: streamed), the forward equals the
    dequantized model, save_quantized/load_quantized keep the format, and a cache whose metadata
    names another format fails clearly."""
    import json

    path = checkpoints["qwen3_moe"]
    model = load_quantized_on_load(path, dtype=torch.float32, quant_type=quant_type, double_quant=double_quant)
    fmt = quant_type + ("+dq" if double_quant else "")
    stacks = [nf4_stack_of(m, p) for _, m, p in quantized_stacks(model)]
    assert stacks and {s.format for s in stacks} == {fmt}
    # per-expert quantization equals quantizing the fused tensor in this format
    fused = load_quantized_on_load(path, dtype=torch.float32, quant_type=quant_type, double_quant=double_quant)
    summary = memory_summary(model)
    assert summary.formats == (fmt,) and f"MB {fmt} ({summary.bytes_per_weight:.4f} B/weight" in summary.format()
    expected_bpw = {"fp4+dq": (0.5, 0.52), "int8": (1.0, 1.1), "nf4": (0.5625, 0.5625)}[fmt]
    assert expected_bpw[0] <= summary.bytes_per_weight <= expected_bpw[1]
    ids = sample_ids()
    reference = dequantized_reference(path, model, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, atol=0, rtol=0)
    save_quantized(model, str(tmp_path / "cache"))
    meta = json.load(open(tmp_path / "cache" / "moequant_config.json"))
    assert (meta["quant_type"], meta["double_quant"]) == (quant_type, bool(double_quant))
    cached = load_quantized(str(tmp_path / "cache"), dtype=torch.float32)
    assert {nf4_stack_of(m, p).format for _, m, p in quantized_stacks(cached)} == {fmt}
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, model(ids).logits, atol=0, rtol=0)
    # the same cache read as another format
    other = {"fp4": ("fp4", False), "int8": ("nf4", True), "nf4": ("int8", False)}[quant_type]
    meta["quant_type"], meta["double_quant"] = other
    json.dump(meta, open(tmp_path / "cache" / "moequant_config.json", "w"))
    with pytest.raises(ValueError, match="load_quantized"):
        load_quantized(str(tmp_path / "cache"))


def test_streaming_quantization_formats_match_fused():
    from moequant.integrations.transformers import _quantize_experts_streaming

    gate = [torch.randn(32, 64) for _ in range(3)]
    up = [torch.randn(32, 64) for _ in range(3)]
    dense = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
    for quant_type, double_quant in (("int8", False), ("fp4", True), ("nf4", True)):
        stack = _quantize_experts_streaming([[lambda t=t: t for t in gate], [lambda t=t: t for t in up]], 64,
                                            quant_type, double_quant)
        fused = moequant.quantize(dense, quant_type, 64, double_quant)
        assert stack.format == fused.format
        for a, b in zip(stack.tensors(), fused.tensors()):
            assert torch.equal(a, b)
    odd = [torch.randn(3, 30) for _ in range(2)]  # int8 takes any shape; 4-bit declines straddling blocks
    assert _quantize_experts_streaming([[lambda t=t: t for t in odd]], 64, "int8", False).shape == (2, 3, 30)


def test_loader_format_errors():
    with pytest.raises(ValueError, match="double_quant=True needs a 4-bit quant_type"):
        with quantize_experts_on_load(quant_type="int8", double_quant=True):
            pass
    with pytest.raises(ValueError, match="quant_type must be one of"):
        with quantize_experts_on_load(quant_type="nf8"):
            pass
