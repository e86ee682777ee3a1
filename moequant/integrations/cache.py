"""A cache of quantized experts, so that consecutive runs on one checkpoint do not quantize again.

    cache = ExpertsCache(cache_dir, checkpoint, quant_type="nf4", double_quant=True, blocksize=64, dtype=torch.bfloat16)
    hit = cache.lookup()
    with moequant.quantize_experts_on_load(...), cache.hooks():   # the cache wraps the loader hook
        model = AutoModelForCausalLM.from_pretrained(checkpoint, ...)
    if not hit:
        cache.store(model)      # returns at once; the entry is written by a background thread
    cache.wait()                # only where the entry must be on disk now (lookup/store of the dir and exit join it)

An entry is a directory ``<cache_dir>/<key>`` holding one safetensors file per expert stack
(its packed codes and statistics) and ``manifest.json`` (each stack's shape, blocksize, dtype and
format, plus its file's name, size and SHA-256). The key hashes the checkpoint's files (name, size
and modification time of every ``*.safetensors`` / ``*.json``; a hub snapshot's directory name is
its commit) with the format, blocksize, dtype and entry version, so a changed checkpoint, format or
blocksize is a different entry. An entry is written to a temporary directory and renamed into place
(atomic on one filesystem), so a process killed mid-write leaves only a ``.partial-<pid>@<host>-*``
directory that is never looked up (and that the next write on that host deletes once the process is gone); one whose manifest is missing, whose files' sizes or checksums differ, or whose
tensors do not match the manifest is deleted and rebuilt, never loaded.

Writing is off the load's critical path: :meth:`ExpertsCache.store` only records which stacks to
write and starts a (non-daemon) writer thread, which copies one stack at a time to the host (host
memory holds one stack, not the model's experts), serializes, hashes and writes it. Reading checks
and deserializes the same in-memory bytes (one pass over each file), several stacks at a time.

On a hit the loader never reads the checkpoint's expert tensors when they are stored per expert
(the fusion converter hands over the cached stack instead), and never quantizes them in any case.
``save_quantized`` / ``load_quantized`` are not used here: they save and rebuild a whole model,
and refuse one whose ``nn.Linear`` layers bitsandbytes has quantized, which is the Axolotl QLoRA
setup; this cache keeps only the expert stacks and lets the usual loader build the rest.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import nn

from ..formats import QuantStack
from .parametrize import quant_stack_of
from .transformers import quantized_stacks

logger = logging.getLogger(__name__)

# 2: one file per stack, each with its own size and SHA-256 (1 kept every stack in one file).
CACHE_VERSION = 2
MANIFEST_NAME = "manifest.json"
_FIELDS = ("packed", "absmax", "absmax_scale", "absmax_offset")
_READ_THREADS = 4  # file reads and SHA-256 release the GIL, so stacks are checked in parallel
# safetensors' dtype names (the entry's files are plain safetensors files, readable by that library)
_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


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


def _stack_meta(stack: QuantStack) -> dict:
    return {"shape": list(stack.shape), "blocksize": stack.blocksize, "dtype": str(stack.dtype).removeprefix("torch."),
            "quant_type": stack.quant_type, "double_quant": stack.double_quant}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

_writers: dict[str, list["_EntryWriter"]] = {}  # cache directory (real path) -> writes started in this process
_writers_lock = threading.Lock()


def wait_for_writes(cache_dir: Optional[str] = None) -> None:
    """Join the entry writes this process started in ``cache_dir`` (every cache directory when ``None``)."""
    with _writers_lock:
        if cache_dir is None:
            pending = [w for ws in _writers.values() for w in ws]
            _writers.clear()
        else:
            pending = _writers.pop(os.path.realpath(cache_dir), [])
    for writer in pending:
        writer.join()


# The writers are non-daemon threads, which the interpreter joins before it exits anyway; the
# atexit join also covers an embedding that tears threads down differently.
atexit.register(wait_for_writes)


def _host_tensors(tensors: dict[str, torch.Tensor], ready: dict, streams: dict) -> dict[str, torch.Tensor]:
    """One stack's tensors on the host (a copy for device tensors; the CPU tensors themselves).

    The copy runs on a side stream of the writer thread, after the event ``store`` recorded on the
    caller's stream: it waits for the quantization that produced the stack, but not for anything
    training queues later (a copy on the caller's stream would sit between its kernels, and a
    synchronous copy of every stack in ``store`` would hold them all on the host at once). The stacks
    are frozen, so nothing writes them while they are copied; they stay referenced until the copy
    (into pageable memory, which returns once the side stream has finished it) is done."""
    host = {}
    for field, tensor in tensors.items():
        if tensor.device.type != "cuda":
            host[field] = tensor.contiguous()
            continue
        stream = streams.get(tensor.device)
        if stream is None:
            stream = streams[tensor.device] = torch.cuda.Stream(device=tensor.device)
            stream.wait_event(ready[tensor.device])
        with torch.cuda.stream(stream):
            host[field] = tensor.to("cpu")
    return host


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _write_file(path: str, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Write ``tensors`` (on the host) as a safetensors file straight from their memory, hashing the same
    bytes on the way (``safetensors.torch.save`` would first copy them into one more buffer); returns the
    file's size and SHA-256. No fsync: a crash may lose a renamed entry's bytes, but the size/SHA-256
    check then rebuilds it."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))  # aligned offsets
    header, offset, chunks = {}, 0, []
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"moequant cache: cannot store {name} of dtype {tensor.dtype}")
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + raw.numel()]}
        offset += raw.numel()
        chunks.append(raw)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for part in [len(encoded).to_bytes(8, "little"), encoded] + [memoryview(c.numpy()) for c in chunks]:
            digest.update(part)
            f.write(part)
            size += len(part)
    return size, digest.hexdigest()


_PARTIAL = re.compile(r"^\.partial-(\d+)@(.+)-[A-Za-z0-9_]+$")  # .partial-<pid>@<host>-<random>


def _partial_prefix() -> str:
    return f".partial-{os.getpid()}@{socket.gethostname()}-"


def _remove_orphaned_partials(parent: str) -> None:
    """Delete the temporary directories of writers killed on this host (their process is gone); those of
    live processes, or of other hosts sharing the directory, are left alone."""
    host = socket.gethostname()
    for entry in os.listdir(parent):
        match = _PARTIAL.match(entry)
        if match is None or match.group(2) != host:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except OSError:  # alive, under another user
            pass


class _EntryWriter(threading.Thread):
    """Writes one entry: ``stacks`` is ``[(name, meta, {field: tensor})]``; ``ready`` the event per CUDA device
    after which the stacks may be read."""

    def __init__(self, stacks: list, directory: str, ready: dict):
        super().__init__(name=f"moequant-cache-writer-{os.path.basename(directory)}", daemon=False)
        self.stacks, self.directory, self.ready = stacks, directory, ready
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self._write()
        except BaseException as err:  # the entry is simply absent; the next run quantizes and writes again
            self.error = err
            logger.warning("moequant: writing the experts cache entry %s failed (%s: %s); it will be rebuilt",
                           self.directory, type(err).__name__, err)
        finally:
            self.stacks = []  # drop the references to the model's stacks

    def _write(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.directory))
        os.makedirs(parent, exist_ok=True)
        _remove_orphaned_partials(parent)
        tmp = tempfile.mkdtemp(prefix=_partial_prefix(), dir=parent)
        try:
            streams, manifest = {}, {}
            for index in range(len(self.stacks)):
                name, meta, tensors = self.stacks[index]
                self.stacks[index] = None  # the stack is no longer held once it is written
                host = _host_tensors(tensors, self.ready, streams)
                del tensors
                file = f"stack-{index:05d}.safetensors"
                size, checksum = _write_file(os.path.join(tmp, file), host)
                del host  # at most one stack's host copy at a time
                manifest[name] = dict(meta, file=file, size=size, sha256=checksum)
            with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
                json.dump({"version": CACHE_VERSION, "stacks": manifest}, f, indent=1)
            shutil.rmtree(self.directory, ignore_errors=True)
            os.replace(tmp, self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("moequant: experts cache entry %s written (%d stacks)", self.directory, len(manifest))


def entry_writer(model: nn.Module, directory: str) -> tuple[_EntryWriter, int]:
    """A writer (not started) of every quantized stack of ``model`` as the entry at ``directory``, and the
    bytes of the stacks' tensors. The stacks are taken now, under the names the loader gives them (a
    PEFT wrapper added later would prefix them), and may be read once the current stream gets here."""
    stacks, nbytes, devices = [], 0, set()
    for name, module, pname in quantized_stacks(model):
        stack = quant_stack_of(module, pname)
        tensors = {field: getattr(stack, field).detach() for field in _FIELDS if getattr(stack, field) is not None}
        stacks.append((name, _stack_meta(stack), tensors))
        for tensor in tensors.values():
            nbytes += tensor.numel() * tensor.element_size()
            if tensor.device.type == "cuda":
                devices.add(tensor.device)
    if not stacks:
        raise ValueError(f"moequant cache: {type(model).__name__} has no quantized expert stacks to save")
    ready = {device: torch.cuda.current_stream(device).record_event() for device in devices}
    return _EntryWriter(stacks, directory, ready), nbytes


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is partial (no {MANIFEST_NAME})")
    try:
        with open(path) as f:
            manifest = json.load(f)
        version, stacks = manifest.get("version"), manifest["stacks"]
        for name, meta in stacks.items():
            file, size, checksum = meta["file"], int(meta["size"]), meta["sha256"]
            if not isinstance(file, str) or os.path.basename(file) != file or not isinstance(checksum, str):
                raise ValueError(f"bad file entry for {name}: {file!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is unreadable ({err})") from None
    if version != CACHE_VERSION:
        raise ValueError(f"{path} has cache version {version}, expected {CACHE_VERSION}")
    if not stacks:
        raise ValueError(f"{path} lists no stacks")
    return stacks


def _tensors_of(buffer: torch.Tensor, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in ``buffer`` (uint8), as views of it: the bytes that
    were hashed are the bytes loaded, with no second copy (``safetensors.torch.load`` copies each)."""
    if buffer.numel() < 8:
        raise ValueError(f"{path} is too short to be a safetensors file")
    header_len = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
    if header_len > buffer.numel() - 8:
        raise ValueError(f"{path} has a header of {header_len} bytes, longer than the file")
    try:
        header = json.loads(buffer[8:8 + header_len].numpy().tobytes())
    except ValueError as err:
        raise ValueError(f"{path} has an unreadable header ({err})") from None
    data, tensors = buffer[8 + header_len:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, -1))
        shape = info.get("shape")
        if dtype is None or not 0 <= begin <= end <= data.numel() or not isinstance(shape, list):
            raise ValueError(f"{path}: tensor {name} has an unreadable entry {info}")
        raw = data[begin:end]
        if raw.storage_offset() % dtype.itemsize:
            raw = raw.clone()  # not aligned for its dtype: a copy of this one tensor
        numel = 1
        for size in shape:
            numel *= int(size)
        if numel * dtype.itemsize != end - begin:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {info['dtype']}")
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def _read_stack(directory: str, name: str, meta: dict, quant_type: str, double_quant: bool,
                blocksize: int) -> QuantStack:
    """One stack, checked against the manifest: the SHA-256 is taken over exactly the bytes deserialized."""
    if (meta["quant_type"], bool(meta["double_quant"]), int(meta["blocksize"])) != (
            quant_type, bool(double_quant), int(blocksize)):
        raise ValueError(f"{name} in {directory} is {meta['quant_type']} (double_quant={meta['double_quant']}, "
                         f"blocksize {meta['blocksize']}), expected {quant_type} ({double_quant}, {blocksize})")
    path = os.path.join(directory, meta["file"])
    if not os.path.isfile(path):
        raise ValueError(f"{path} ({name}) is missing")
    size = os.path.getsize(path)
    if size != int(meta["size"]):
        raise ValueError(f"{path} has {size} bytes, the manifest says {meta['size']}")
    buffer = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    with open(path, "rb") as f:
        read = f.readinto(view)
    if read != size or hashlib.sha256(view).hexdigest() != meta["sha256"]:
        raise ValueError(f"{path} does not match its SHA-256 in the manifest")
    tensors = _tensors_of(buffer, path)
    unknown = set(tensors) - set(_FIELDS)
    if unknown or "packed" not in tensors or "absmax" not in tensors:
        raise ValueError(f"{path} holds {sorted(tensors)}, expected packed, absmax and optional statistics")
    state = dict(tensors, shape=torch.tensor(meta["shape"], dtype=torch.int64), dtype=meta["dtype"],
                 blocksize=torch.tensor(int(meta["blocksize"])), quant_type=meta["quant_type"])
    return QuantStack.from_state_dict(state, quant_type=quant_type, double_quant=double_quant)


def load_entry(directory: str, quant_type: str, double_quant: bool, blocksize: int) -> dict[str, QuantStack]:
    """The stacks of a cache entry, on the CPU; ``ValueError`` saying what is wrong with an entry that
    is partial, corrupt, or of another format."""
    stacks_meta = _read_manifest(directory)
    names = list(stacks_meta)
    with ThreadPoolExecutor(max_workers=max(1, min(_READ_THREADS, os.cpu_count() or 1, len(names)))) as pool:
        futures = [pool.submit(_read_stack, directory, name, stacks_meta[name], quant_type, double_quant, blocksize)
                   for name in names]
        try:
            return {name: future.result() for name, future in zip(names, futures)}
        except BaseException:
            for future in futures:
                future.cancel()
            raise


class EntryPrefetch:
    """Looks an entry up in a background thread, ahead of the load that needs it, so that reading and
    checking its files overlaps what the caller does meanwhile (Axolotl: validating the config and
    loading the datasets). :meth:`take` hands the looked-up cache over only if its key is the one the
    load computes then; otherwise (a different format or dtype, or any error in the thread) the load
    looks up for itself, so a prefetch can only save time, never change what is loaded."""

    def __init__(self, cache_dir: str, checkpoint: str, quant_type: str, double_quant: bool, blocksize: int,
                 dtype: torch.dtype):
        self._args = (cache_dir, checkpoint, quant_type, double_quant, blocksize, dtype)
        self.cache: Optional[ExpertsCache] = None
        self.error: Optional[BaseException] = None
        # A daemon: an unused prefetch must not keep the interpreter alive (it only reads).
        self._thread = threading.Thread(target=self._run, name="moequant-cache-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            cache = ExpertsCache(*self._args)
            cache.lookup()
            self.cache = cache
        except BaseException as err:  # e.g. a hub checkpoint not downloaded yet: the load looks up itself
            self.error = err

    def take(self, key: str) -> Optional["ExpertsCache"]:
        """The looked-up cache if it is the entry ``key``, else ``None`` (waits for the thread)."""
        self._thread.join()
        cache, self.cache = self.cache, None
        if cache is None or cache.key != key:
            if self.error is not None:
                logger.debug("moequant: experts cache prefetch failed (%s)", self.error)
            return None
        return cache


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
        self.cache_dir = cache_dir
        self.directory = os.path.join(cache_dir, self.key)
        self.writer: Optional[_EntryWriter] = None
        self.stacks: Optional[dict[str, QuantStack]] = None
        self.served: set[str] = set()

    @property
    def hit(self) -> bool:
        """Whether :meth:`lookup` found a sound entry (its stacks are held on the host)."""
        return self.stacks is not None

    def lookup(self) -> bool:
        """Load the entry if it is there and sound; a partial or corrupt one is deleted (and rebuilt later).
        Writes this process started in the same cache directory are finished first."""
        wait_for_writes(self.cache_dir)
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

    def store(self, model: nn.Module, start: bool = True) -> int:
        """Write ``model``'s quantized stacks as this entry in the background (see :meth:`wait`); returns the
        bytes of the stacks' tensors. ``start=False`` only takes the stacks: :meth:`start_write` begins the
        write later (Axolotl's loader: after the load, whose remaining steps it would otherwise slow), and
        :meth:`cancel_write` drops it (a load that failed)."""
        wait_for_writes(self.cache_dir)  # one write per entry at a time: the rename replaces what is there
        self.writer, nbytes = entry_writer(model, self.directory)
        if start:
            self.start_write()
        return nbytes

    def start_write(self) -> None:
        """Start the write that :meth:`store` prepared (nothing when there is none, or it has started)."""
        if self.writer is None or self.writer.ident is not None:
            return
        with _writers_lock:
            _writers.setdefault(os.path.realpath(self.cache_dir), []).append(self.writer)
        self.writer.start()

    def cancel_write(self) -> None:
        """Drop a write that :meth:`store` prepared but that has not started (and release its stacks)."""
        if self.writer is not None and self.writer.ident is None:
            self.writer = None

    def wait(self) -> None:
        """Block until the entry started by :meth:`store` (and any other write to this cache directory) is
        on disk, or has failed (the failure is logged, and the entry simply absent)."""
        wait_for_writes(self.cache_dir)

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

