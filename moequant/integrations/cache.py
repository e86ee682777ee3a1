"""A cache of quantized experts, so that consecutive runs on one checkpoint do not quantize again.

    cache = ExpertsCache(cache_dir, checkpoint, quant_type="nf4", double_quant=True, blocksize=64, dtype=torch.bfloat16)
    hit = cache.lookup()
    with moequant.quantize_experts_on_load(...), cache.hooks():   # the cache wraps the loader hook
        model = AutoModelForCausalLM.from_pretrained(checkpoint, ...)
    if not hit:
        cache.store(model)

An entry is a directory ``<cache_dir>/<key>`` holding ``experts.safetensors`` (every stack's packed
codes and statistics under ``<parameter name>.<field>``) and ``manifest.json`` (each stack's shape,
blocksize, dtype and format, plus the size and SHA-256 of the tensor file). The key hashes the
checkpoint's files (name, size and modification time of every ``*.safetensors`` / ``*.json``; a hub
snapshot's directory name is its commit) with the format, blocksize and dtype, so a changed
checkpoint, format or blocksize is a different entry. An entry is written to a temporary
directory and renamed into place (atomic on one filesystem); one whose manifest is missing, whose
file size or checksum differs, or whose tensors do not match the manifest is deleted and rebuilt,
never loaded.

On a hit the loader never reads the checkpoint's expert tensors when they are stored per expert
(the fusion converter hands over the cached stack instead), and never quantizes them in any case.
``save_quantized`` / ``load_quantized`` are not used here: they save and rebuild a whole model,
and refuse one whose ``nn.Linear`` layers bitsandbytes has quantized, which is the Axolotl QLoRA
setup; this cache keeps only the expert stacks and lets the usual loader build the rest.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Optional

import torch
from torch import nn

from ..formats import QuantStack
from .parametrize import quant_stack_of
from .transformers import quantized_stacks

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
TENSORS_NAME = "experts.safetensors"
MANIFEST_NAME = "manifest.json"
_FIELDS = ("packed", "absmax", "absmax_scale", "absmax_offset")


def checkpoint_files(checkpoint: str) -> tuple[str, list[str]]:
    """``(directory, files)`` of a local checkpoint directory, or of a hub id's local snapshot."""
    directory = checkpoint
    if not os.path.isdir(directory):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(checkpoint, allow_patterns=["*.json", "*.safetensors"])
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")) + glob.glob(os.path.join(directory, "*.json")))
    if not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"moequant cache: {checkpoint} ({directory}) has no *.safetensors files to key the cache on")
    return directory, files


def cache_key(checkpoint: str, quant_type: str, double_quant: bool, blocksize: int, dtype: torch.dtype) -> str:
    """Hex key of one (checkpoint files, format, blocksize, dtype) combination."""
    directory, files = checkpoint_files(checkpoint)
    stats = []
    for path in files:
        st = os.stat(path)  # follows hub symlinks to their blobs
        stats.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
    description = {
        "version": CACHE_VERSION,
        "checkpoint": os.path.realpath(directory),  # a hub snapshot's directory name is its commit
        "files": stats,
        "quant_type": quant_type,
        "double_quant": bool(double_quant),
        "blocksize": int(blocksize),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stack_meta(stack: QuantStack) -> dict:
    return {"shape": list(stack.shape), "blocksize": stack.blocksize, "dtype": str(stack.dtype).removeprefix("torch."),
            "quant_type": stack.quant_type, "double_quant": stack.double_quant}


def save_entry(model: nn.Module, directory: str) -> int:
    """Write every quantized stack of ``model`` as one cache entry at ``directory`` (atomically); returns bytes."""
    from safetensors.torch import save_file

    tensors, stacks = {}, {}
    for name, module, pname in quantized_stacks(model):
        stack = quant_stack_of(module, pname)
        stacks[name] = _stack_meta(stack)
        for field in _FIELDS:
            t = getattr(stack, field)
            if t is not None:
                tensors[f"{name}.{field}"] = t.detach().contiguous().cpu()
    if not stacks:
        raise ValueError(f"moequant cache: {type(model).__name__} has no quantized expert stacks to save")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        path = os.path.join(tmp, TENSORS_NAME)
        save_file(tensors, path)
        manifest = {"version": CACHE_VERSION, "stacks": stacks, "size": os.path.getsize(path), "sha256": _sha256(path)}
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=1)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest["size"]


def load_entry(directory: str, quant_type: str, double_quant: bool, blocksize: int) -> dict[str, QuantStack]:
    """The stacks of a cache entry, on the CPU; ``ValueError`` saying what is wrong with an entry that
    is partial, corrupt, or of another format."""
    from safetensors.torch import load_file

    manifest_path = os.path.join(directory, MANIFEST_NAME)
    path = os.path.join(directory, TENSORS_NAME)
    if not os.path.isfile(manifest_path) or not os.path.isfile(path):
        raise ValueError(f"{directory} is partial (no {MANIFEST_NAME} or {TENSORS_NAME})")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        stacks_meta, size, checksum = manifest["stacks"], int(manifest["size"]), manifest["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest_path} is unreadable ({err})") from None
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(f"{manifest_path} has cache version {manifest.get('version')}, expected {CACHE_VERSION}")
    if os.path.getsize(path) != size:
        raise ValueError(f"{path} has {os.path.getsize(path)} bytes, the manifest says {size}")
    if _sha256(path) != checksum:
        raise ValueError(f"{path} does not match its SHA-256 in the manifest")
    tensors = load_file(path)
    stacks = {}
    for name, meta in stacks_meta.items():
        if (meta["quant_type"], bool(meta["double_quant"]), int(meta["blocksize"])) != (
                quant_type, bool(double_quant), int(blocksize)):
            raise ValueError(f"{name} in {directory} is {meta['quant_type']} (double_quant={meta['double_quant']}, "
                             f"blocksize {meta['blocksize']}), expected {quant_type} ({double_quant}, {blocksize})")
        state = {field: tensors[f"{name}.{field}"] for field in _FIELDS if f"{name}.{field}" in tensors}
        state.update(shape=torch.tensor(meta["shape"], dtype=torch.int64), dtype=meta["dtype"],
                     blocksize=torch.tensor(int(meta["blocksize"])), quant_type=meta["quant_type"])
        stacks[name] = QuantStack.from_state_dict(state, quant_type=quant_type, double_quant=double_quant)
    return stacks


def _device_for(device_map, name: str) -> torch.device:
    """The device transformers' ``device_map`` gives ``name`` (longest matching prefix; CPU without one)."""
    if not isinstance(device_map, dict):
        return torch.device("cpu")
    best, device = -1, "cpu"
    for prefix, value in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, device = len(prefix), value
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device if device != "disk" else "cpu")


class ExpertsCache:
    """One cache entry for one load; :meth:`hooks` serves its stacks to the loader on a hit."""

    def __init__(self, cache_dir: str, checkpoint: str, quant_type: str, double_quant: bool, blocksize: int,
                 dtype: torch.dtype):
        self.format = (quant_type, bool(double_quant), int(blocksize))
        self.key = cache_key(checkpoint, quant_type, double_quant, blocksize, dtype)
        self.directory = os.path.join(cache_dir, self.key)
        self.stacks: Optional[dict[str, QuantStack]] = None
        self.served: set[str] = set()

    def lookup(self) -> bool:
        """Load the entry if it is there and sound; a partial or corrupt one is deleted (and rebuilt later)."""
        if not os.path.exists(self.directory):
            return False
        try:
            self.stacks = load_entry(self.directory, *self.format)
        except Exception as err:  # any unreadable entry is rebuilt, never loaded
            logger.warning("moequant: experts cache entry %s is not usable (%s); quantizing again", self.directory,
                           err)
            shutil.rmtree(self.directory, ignore_errors=True)
            self.stacks = None
            return False
        return True

    def store(self, model: nn.Module) -> int:
        return save_entry(model, self.directory)

    def _cached(self, name: str) -> Optional[QuantStack]:
        return None if self.stacks is None else self.stacks.get(name)

    @contextlib.contextmanager
    def hooks(self):
        """While a ``quantize_experts_on_load`` context is active (entered before this one): expert
        weights found in the entry are installed from it instead of being read and quantized."""
        if self.stacks is None:
            yield
            return
        import transformers.core_model_loading as loading

        from . import transformers as hook

        inner_set, inner_convert = loading.set_param_for_module, loading.WeightConverter.convert
        cache = self

        def set_param(model, target_name, param_value, *args, **kwargs):
            stack = cache._cached(target_name)
            if stack is not None and not isinstance(param_value, hook._QuantizedExperts):
                device = param_value.device if isinstance(param_value, torch.Tensor) else torch.device("cpu")
                param_value = hook._QuantizedExperts(stack.to(device), 0.0)
            if isinstance(param_value, hook._QuantizedExperts) and target_name in (cache.stacks or {}):
                cache.served.add(target_name)
            return inner_set(model, target_name, param_value, *args, **kwargs)

        def convert(converter, layer_name, *args, **kwargs):
            # A per-expert fusion whose result is cached: hand over the stack without reading the experts.
            if hook._is_expert_fusion(converter) and len(converter.target_patterns) == 1:
                target = converter.target_patterns[0]
                name = layer_name if target in layer_name else target
                stack = cache._cached(name)
                if stack is not None:
                    pending = getattr(converter, "collected_tensors", None) or {}
                    for pattern in converter.source_patterns:
                        pending.pop(pattern, None)
                    device = _device_for(hook._Hook.device_map, name)
                    return {name: hook._QuantizedExperts(stack.to(device), 0.0)}
            return inner_convert(converter, layer_name, *args, **kwargs)

        loading.set_param_for_module = set_param
        loading.WeightConverter.convert = convert
        try:
            yield
        finally:
            loading.set_param_for_module = inner_set
            loading.WeightConverter.convert = inner_convert

