"""The experts cache behind ``moequant_cache_dir`` (moequant.integrations.cache), on a real from_pretrained."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import moequant.integrations.transformers as hook
from _integration_models import save_tiny_checkpoint
from moequant.integrations import find_experts_modules
from moequant.integrations.cache import MANIFEST_NAME, TENSORS_NAME, ExpertsCache, cache_key
from moequant.integrations.parametrize import quant_stack_of
from moequant.integrations.transformers import quantize_experts_on_load


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_checkpoint("qwen3_moe", str(tmp_path / "ckpt"))


def load(checkpoint, cache_dir, monkeypatch, quant_type="nf4", double_quant=True, blocksize=64):
    """One load through the cache; returns (model, hit, number of stacks quantized)."""
    quantized = []
    original = hook._quantize_experts_streaming

    def streaming(*args, **kwargs):
        stack = original(*args, **kwargs)
        quantized.append(stack is not None)
        return stack

    monkeypatch.setattr(hook, "_quantize_experts_streaming", streaming)
    cache = ExpertsCache(str(cache_dir), checkpoint, quant_type, double_quant, blocksize, torch.bfloat16)
    hit = cache.lookup()
    with quantize_experts_on_load(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant), cache.hooks():
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    if not hit:
        cache.store(model)
    return model, hit, sum(quantized), cache


def stacks(model):
    return {f"{n}.{p}": quant_stack_of(m, p) for n, m in find_experts_modules(model) for p in ("gate_up_proj", "down_proj")}


def assert_same_stacks(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for field in ("packed", "absmax", "absmax_scale", "absmax_offset"):
            x, y = getattr(a[name], field), getattr(b[name], field)
            assert (x is None) == (y is None), (name, field)
            if x is not None:
                assert torch.equal(x, y), (name, field)


def test_second_load_reads_the_cache_without_quantizing(checkpoint, tmp_path, monkeypatch):
    first, hit, quantized, _ = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert not hit and quantized == 4
    second, hit, quantized, cache = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert hit and quantized == 0
    assert len(cache.served) == 4  # every stack came from the entry
    assert_same_stacks(stacks(first), stacks(second))
    x = torch.randint(0, 96, (2, 8))
    assert torch.equal(first(x).logits, second(x).logits)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "bad_manifest"])
def test_damaged_entry_is_rebuilt_not_loaded(checkpoint, tmp_path, monkeypatch, damage):
    reference, _, _, cache = load(checkpoint, tmp_path / "cache", monkeypatch)
    tensors = os.path.join(cache.directory, TENSORS_NAME)
    manifest = os.path.join(cache.directory, MANIFEST_NAME)
    if damage == "flip_byte":
        with open(tensors, "r+b") as f:
            f.seek(os.path.getsize(tensors) - 7)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(tensors, "r+b") as f:
            f.truncate(os.path.getsize(tensors) // 2)
    elif damage == "no_manifest":
        os.remove(manifest)
    else:
        with open(manifest, "w") as f:
            f.write("{not json")
    model, hit, quantized, cache = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert not hit and quantized == 4  # detected, deleted, quantized again ...
    assert_same_stacks(stacks(reference), stacks(model))
    _, hit, quantized, _ = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert hit and quantized == 0  # ... and rewritten whole


def test_key_changes_with_checkpoint_format_and_blocksize(checkpoint):
    base = cache_key(checkpoint, "nf4", True, 64, torch.bfloat16)
    assert base == cache_key(checkpoint, "nf4", True, 64, torch.bfloat16)
    others = {
        cache_key(checkpoint, "fp4", True, 64, torch.bfloat16),
        cache_key(checkpoint, "nf4", False, 64, torch.bfloat16),
        cache_key(checkpoint, "nf4", True, 128, torch.bfloat16),
        cache_key(checkpoint, "int8", False, 64, torch.bfloat16),
        cache_key(checkpoint, "nf4", True, 64, torch.float32),
    }
    assert base not in others and len(others) == 5
    shard = os.path.join(checkpoint, "model.safetensors")
    stat = os.stat(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the checkpoint was rewritten
    assert cache_key(checkpoint, "nf4", True, 64, torch.bfloat16) != base


def test_entry_of_another_format_is_not_served(checkpoint, tmp_path, monkeypatch):
    load(checkpoint, tmp_path / "cache", monkeypatch, quant_type="nf4", double_quant=True)
    _, hit, quantized, _ = load(checkpoint, tmp_path / "cache", monkeypatch, quant_type="nf4", double_quant=False)
    assert not hit and quantized == 4


def test_checkpoint_without_safetensors_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        cache_key(str(tmp_path), "nf4", True, 64, torch.bfloat16)
