"""The experts cache behind ``moequant_cache_dir`` (moequant.integrations.cache), on a real from_pretrained."""

import glob
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import moequant.integrations.transformers as hook
from _integration_models import save_tiny_checkpoint
from moequant.integrations import find_experts_modules
import moequant.integrations.cache as cache_module
from moequant.integrations.cache import MANIFEST_NAME, EntryPrefetch, ExpertsCache, cache_key
from moequant.integrations.parametrize import quant_stack_of
from moequant.integrations.transformers import quantize_experts_on_load


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_checkpoint("qwen3_moe", str(tmp_path / "ckpt"))


def load(checkpoint, cache_dir, monkeypatch, quant_type="nf4", double_quant=True, blocksize=64, wait=True):
    """One load through the cache; returns (model, hit, number of stacks quantized, cache). ``wait``: join the
    entry's background write before returning."""
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
        nbytes = cache.store(model)
        assert nbytes == sum(t.numel() * t.element_size() for stack in stacks(model).values()
                             for t in (stack.packed, stack.absmax, stack.absmax_scale, stack.absmax_offset)
                             if t is not None)
        if wait:
            cache.wait()
            assert cache.writer.error is None
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


def entry_files(cache):
    return sorted(glob.glob(os.path.join(cache.directory, "*")))


def test_entry_is_complete_once_the_writer_is_joined(checkpoint, tmp_path, monkeypatch):
    model, _, _, cache = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert not cache.writer.is_alive()
    with open(os.path.join(cache.directory, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert manifest["version"] == cache_module.CACHE_VERSION and set(manifest["stacks"]) == set(stacks(model))
    files = [os.path.join(cache.directory, meta["file"]) for meta in manifest["stacks"].values()]
    assert sorted(files + [os.path.join(cache.directory, MANIFEST_NAME)]) == entry_files(cache)  # one file a stack
    assert not glob.glob(str(tmp_path / "cache" / ".partial-*"))  # the temporary directory was renamed
    assert_same_stacks(stacks(model), cache_module.load_entry(cache.directory, "nf4", True, 64))
    from safetensors.torch import load_file  # the files are plain safetensors files

    for name, meta in manifest["stacks"].items():
        tensors = load_file(os.path.join(cache.directory, meta["file"]))
        stack = stacks(model)[name]
        assert tensors.keys() == {f for f in cache_module._FIELDS if getattr(stack, f) is not None}
        assert all(torch.equal(t, getattr(stack, f)) for f, t in tensors.items())


def test_same_cache_dir_twice_in_one_process(checkpoint, tmp_path, monkeypatch):
    """No explicit wait: the next lookup, and the next store, of the directory join the write in flight."""
    first, hit, _, cache = load(checkpoint, tmp_path / "cache", monkeypatch, wait=False)
    assert not hit
    second, hit, quantized, _ = load(checkpoint, tmp_path / "cache", monkeypatch, wait=False)
    assert hit and quantized == 0 and not cache.writer.is_alive()
    assert_same_stacks(stacks(first), stacks(second))
    again = ExpertsCache(str(tmp_path / "cache"), checkpoint, "nf4", True, 64, torch.bfloat16)
    again.store(first)  # rewrite the entry, then at once a second write of the same entry
    third = ExpertsCache(str(tmp_path / "cache"), checkpoint, "nf4", True, 64, torch.bfloat16)
    third.store(second)
    assert not again.writer.is_alive()  # the second store joined the first
    check = ExpertsCache(str(tmp_path / "cache"), checkpoint, "nf4", True, 64, torch.bfloat16)
    assert check.lookup() and not third.writer.is_alive() and third.writer.error is None
    assert_same_stacks(stacks(first), check.stacks)


def test_store_returns_before_the_entry_is_written(checkpoint, tmp_path, monkeypatch):
    import threading

    release = threading.Event()
    original = cache_module._write_file

    def slow_write(path, tensors):
        assert release.wait(30)
        return original(path, tensors)

    model, _, _, _ = load(checkpoint, tmp_path / "model", monkeypatch)
    monkeypatch.setattr(cache_module, "_write_file", slow_write)
    cache = ExpertsCache(str(tmp_path / "cache"), checkpoint, "nf4", True, 64, torch.bfloat16)
    cache.store(model)
    assert cache.writer.is_alive() and not os.path.exists(cache.directory)  # store did not wait for the write
    release.set()
    cache.wait()
    assert cache.writer.error is None and os.path.isfile(os.path.join(cache.directory, MANIFEST_NAME))


def test_deferred_write_starts_only_when_asked(checkpoint, tmp_path, monkeypatch):
    """store(start=False) takes the stacks now (Axolotl: right after the build) and writes nothing until
    start_write (the end of the load); cancel_write drops a write that never started (a failed load)."""
    model, _, _, _ = load(checkpoint, tmp_path / "model", monkeypatch)
    cache = ExpertsCache(str(tmp_path / "cache"), checkpoint, "nf4", True, 64, torch.bfloat16)
    cache.store(model, start=False)
    assert cache.writer is not None and cache.writer.ident is None
    cache.wait()  # nothing started, nothing to join
    assert not os.path.exists(cache.directory)
    cache.start_write()
    cache.start_write()  # idempotent
    cache.wait()
    assert cache.writer.error is None and os.path.isfile(os.path.join(cache.directory, MANIFEST_NAME))
    dropped = ExpertsCache(str(tmp_path / "dropped"), checkpoint, "nf4", True, 64, torch.bfloat16)
    dropped.store(model, start=False)
    dropped.cancel_write()
    dropped.start_write()  # after a cancel: nothing to start
    dropped.wait()
    assert dropped.writer is None and not os.path.exists(dropped.directory)


def test_prefetch_serves_only_the_entry_the_load_asks_for(checkpoint, tmp_path, monkeypatch):
    first, _, _, cache = load(checkpoint, tmp_path / "cache", monkeypatch)
    args = (str(tmp_path / "cache"), checkpoint, "nf4", True, 64, torch.bfloat16)
    prefetched = EntryPrefetch(*args).take(cache.key)
    assert prefetched is not None and prefetched.hit and prefetched.directory == cache.directory
    assert_same_stacks(stacks(first), prefetched.stacks)
    # the load computed another key (e.g. the validated config's dtype differs from the raw config's guess)
    other = cache_key(checkpoint, "nf4", True, 64, torch.float16)
    assert other != cache.key and EntryPrefetch(*args).take(other) is None
    # a miss is handed over as a looked-up miss; an error in the thread is kept, never raised
    missing = EntryPrefetch(str(tmp_path / "empty"), *args[1:])
    miss = missing.take(cache.key)
    assert miss is not None and not miss.hit
    broken = EntryPrefetch(args[0], str(tmp_path / "no-such-checkpoint"), *args[2:])
    assert broken.take(cache.key) is None and isinstance(broken.error, Exception)


def test_writer_holds_one_stack_on_the_host_at_a_time(checkpoint, tmp_path, monkeypatch):
    """The host copies (clones here, as a GPU stack's would be) die before the next stack is copied."""
    live, most = [0], [0]
    original = cache_module._host_tensors

    def counted(tensors, ready, streams):
        host = {field: t.clone() for field, t in original(tensors, ready, streams).items()}
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(host["packed"], lambda: live.__setitem__(0, live[0] - 1))
        return host

    monkeypatch.setattr(cache_module, "_host_tensors", counted)
    model, _, _, cache = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert len(stacks(model)) == 4 and most[0] == 1 and live[0] == 0
    assert ExpertsCache(str(tmp_path / "cache"), checkpoint, "nf4", True, 64, torch.bfloat16).lookup()


@pytest.mark.parametrize("how", ["raise", "killed"])
def test_interrupted_write_leaves_no_loadable_entry(checkpoint, tmp_path, monkeypatch, how):
    """``raise``: the writer fails before the rename (cleaned up); ``killed``: nothing after the failure runs,
    as when the process is killed (the temporary directory stays behind, complete but for the rename)."""
    def no_rename(src, dst):
        raise RuntimeError("interrupted before the rename")

    monkeypatch.setattr(cache_module.os, "replace", no_rename)
    if how == "killed":
        real_rmtree = cache_module.shutil.rmtree
        monkeypatch.setattr(cache_module.shutil, "rmtree",
                            lambda path, **kw: None if ".partial-" in str(path) else real_rmtree(path, **kw))
    reference, hit, _, cache = load(checkpoint, tmp_path / "cache", monkeypatch, wait=False)
    cache.wait()
    assert not hit and isinstance(cache.writer.error, RuntimeError)
    assert not os.path.exists(cache.directory)
    partial = glob.glob(str(tmp_path / "cache" / ".partial-*"))
    assert len(partial) == (1 if how == "killed" else 0)
    if partial:
        assert os.path.isfile(os.path.join(partial[0], MANIFEST_NAME))
        # The writer was "killed": give its directory the pid of a process that has exited.
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        orphan = partial[0].replace(f".partial-{os.getpid()}@", f".partial-{child.pid}@")
        os.rename(partial[0], orphan)
        shutil.copytree(orphan, partial[0])  # and one of this (live) process
    monkeypatch.undo()
    model, hit, quantized, _ = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert not hit and quantized == 4  # not loaded: quantized again ...
    assert_same_stacks(stacks(reference), stacks(model))
    _, hit, quantized, _ = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert hit and quantized == 0  # ... and written whole
    if partial:  # the dead process's temporary directory was deleted by the next write, the live one's kept
        assert glob.glob(str(tmp_path / "cache" / ".partial-*")) == [partial[0]]


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 7)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _edit_manifest(path, edit):
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _first_stack(manifest):
    return next(iter(manifest["stacks"].values()))


def _swap_first_two_files(manifest):
    """Sound files with the wrong stacks' names: checksums match, the tensors do not fit the manifest."""
    first, second = list(manifest["stacks"].values())[:2]
    keys = ("file", "size", "sha256")
    swapped = {k: second[k] for k in keys}
    second.update({k: first[k] for k in keys})
    first.update(swapped)


DAMAGES = {
    "flip_byte": _flip_byte,
    "truncate": _truncate,
    "remove": os.remove,
    "garbage": lambda path: open(path, "w").write("{not json"),
}
MANIFEST_EDITS = {
    "old_version": lambda m: m.update(version=1),
    "shape": lambda m: _first_stack(m).update(shape=[s * 2 for s in _first_stack(m)["shape"]]),
    "path_outside": lambda m: _first_stack(m).update(file="../" + _first_stack(m)["file"]),
    "no_stacks": lambda m: m.update(stacks={}),
    "swapped_files": lambda m: _swap_first_two_files(m),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES) + [f"manifest:{edit}" for edit in sorted(MANIFEST_EDITS)])
def test_damaged_entry_is_rebuilt_not_loaded(checkpoint, tmp_path, monkeypatch, damage):
    reference, _, _, cache = load(checkpoint, tmp_path / "cache", monkeypatch)
    files = entry_files(cache)
    assert len(files) == 5  # four stacks and the manifest
    targets = [os.path.join(cache.directory, MANIFEST_NAME)] if damage.startswith("manifest:") else files
    for target in targets:  # the damage is caught whichever file it hits
        if damage.startswith("manifest:"):
            _edit_manifest(target, MANIFEST_EDITS[damage.split(":")[1]])
        else:
            DAMAGES[damage](target)
        probe = ExpertsCache(str(tmp_path / "cache"), checkpoint, "nf4", True, 64, torch.bfloat16)
        assert not probe.lookup() and probe.stacks is None
        assert not os.path.exists(cache.directory)  # deleted
        _, _, _, cache = load(checkpoint, tmp_path / "cache", monkeypatch)  # and rewritten
    model, hit, quantized, cache = load(checkpoint, tmp_path / "cache", monkeypatch)
    assert hit and quantized == 0
    assert_same_stacks(stacks(reference), stacks(model))


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
