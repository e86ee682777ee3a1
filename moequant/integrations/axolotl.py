"""Axolotl plugin: ``quantize_moe_experts: true`` quantizes the fused experts with moequant.

    plugins:
      - moequant.integrations.axolotl.MoequantPlugin
    quantize_moe_experts: true
    adapter: qlora              # + load_in_4bit: 4-bit experts (bnb_config_kwargs.bnb_4bit_quant_type nf4|fp4,
    load_in_4bit: true          #   bnb_4bit_use_double_quant, default true as in Axolotl); or
                                # adapter: lora + load_in_8bit: 8-bit (row-wise int8) experts
    lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]
    lora_dropout: 0.0           # required when experts are targeted
    moequant_blocksize: 64      # optional (4-bit formats)
    moequant_fuse: quantized    # optional: quantized | cpu | device, see moequant.quantize_experts_on_load
    moequant_cache_dir: ...     # optional: keep the quantized experts; the next run loads them instead

Where each step happens in Axolotl 0.21's loader:

* ``register`` (raw config, before validation): the option is taken over. ``quantize_moe_experts``
  is cleared and ``moequant_quantize_experts`` records the request, so Axolotl's validator, its
  ``device_map`` override (``{"": LOCAL_RANK}``) and its own loader patch never see it; the
  settings are checked here, so a config moequant cannot train fails before any data is loaded.
  With ``moequant_cache_dir``, the cache entry is read and checked in a background thread from
  here on, while Axolotl validates the config and loads the datasets.
* ``pre_model_load``: architecture check on an empty (meta) model, CPU/GPU check, experts cache
  lookup (the prefetched entry when its key is the one the validated config gives), then the
  transformers loader is patched (:func:`moequant.quantize_experts_on_load`).
* ``post_model_build``: the load is finished (stacks counted, memory line logged), the stacks to
  cache taken on a miss, the loader unpatched, and ``model._moe_experts_quantized`` set so that
  Axolotl skips ``prepare_model_for_kbit_training`` (it would upcast every frozen weight).
* ``pre_lora_load`` / ``post_lora_load``: around ``get_peft_model``, moequant's PEFT injection is
  the outermost one: quantized stacks are wrapped first, in their dense order, then Axolotl's own
  target-parameters patch handles the rest; removed afterwards.
* ``post_model_load`` (the end of the load): the cache entry starts being written, in the
  background, so that it does not compete with the rest of the load.
* A failure anywhere in ``ModelLoader.load`` closes whatever the plugin opened (transformers and
  PEFT end up unpatched); the ``ParamWrapper`` methods of :func:`moequant.integrations.peft.patch_peft`
  stay, as the trained model's forward needs them (they pass through for any other parameter).

moequant's summary lines are logged under ``axolotl.integrations.moequant``, which Axolotl shows
at INFO (it hides INFO from loggers outside ``axolotl.*``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Literal, Optional

import torch
from pydantic import BaseModel, field_validator

from .cache import EntryPrefetch, ExpertsCache
from .peft import quantized_experts_injection, remove_injection
from .transformers import _check_model, load_stats, memory_summary, quantize_experts_on_load

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # importable without Axolotl
    BasePlugin = object

LOG = logging.getLogger("axolotl.integrations.moequant")

_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_4BIT_TYPES = ("nf4", "fp4")


class MoequantArgs(BaseModel):
    """The Axolotl config keys this plugin reads (``quantize_moe_experts`` is Axolotl's own)."""

    moequant_blocksize: int = 64
    moequant_fuse: Literal["quantized", "cpu", "device"] = "quantized"
    moequant_cache_dir: Optional[str] = None
    # Set by the plugin when it takes ``quantize_moe_experts: true`` over (not meant to be written by hand).
    moequant_quantize_experts: Optional[bool] = None

    @field_validator("moequant_blocksize")
    @classmethod
    def _blocksize(cls, value: int) -> int:
        if value not in _BLOCKSIZES:
            raise ValueError(f"moequant_blocksize must be a power of two in [32, 4096], got {value}")
        return value


def experts_format(cfg) -> tuple[str, bool]:
    """``(quant_type, double_quant)`` of the experts for an Axolotl config, from its adapter and
    ``load_in_*`` settings; ``ValueError`` naming the setting for anything moequant cannot train."""
    adapter = cfg.get("adapter")
    four, eight = bool(cfg.get("load_in_4bit")), bool(cfg.get("load_in_8bit"))
    if adapter not in ("qlora", "lora"):
        raise ValueError(
            f"quantize_moe_experts with moequant trains an adapter on frozen quantized experts: set adapter: qlora "
            f"(with load_in_4bit: true) or adapter: lora (with load_in_8bit: true); got adapter: {adapter!r}"
        )
    if four and eight:
        raise ValueError("quantize_moe_experts with moequant: set one of load_in_4bit / load_in_8bit, not both")
    if adapter == "qlora":
        if not four:
            raise ValueError(
                "quantize_moe_experts with adapter: qlora needs load_in_4bit: true (4-bit experts); for 8-bit experts "
                "use adapter: lora with load_in_8bit: true"
            )
        kwargs = cfg.get("bnb_config_kwargs") or {}
        quant_type = kwargs.get("bnb_4bit_quant_type") or cfg.get("bnb_4bit_quant_type") or "nf4"
        if quant_type not in _4BIT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be one of {_4BIT_TYPES} for moequant experts, got "
                             f"{quant_type!r}")
        double_quant = kwargs.get("bnb_4bit_use_double_quant", cfg.get("bnb_4bit_use_double_quant"))
        # Axolotl's QLoRA default (loaders/model.py _set_quantization_config) is double quantization on.
        return quant_type, True if double_quant is None else bool(double_quant)
    if not eight:
        raise ValueError(
            "quantize_moe_experts with adapter: lora needs load_in_8bit: true (8-bit experts); for 4-bit experts use "
            f"adapter: qlora with load_in_4bit: true (got load_in_4bit: {four}, load_in_8bit: {eight})"
        )
    return "int8", False


def check_config(cfg) -> None:
    """Every setting the plugin can check without the model; ``ValueError`` naming the setting."""
    experts_format(cfg)
    targets = cfg.get("lora_target_parameters") or []
    if targets and cfg.get("lora_dropout"):
        raise ValueError(
            "lora_target_parameters on moequant-quantized experts needs lora_dropout: 0 (dropout on the experts' "
            f"input cannot be factored out of the fused experts op), got lora_dropout: {cfg.get('lora_dropout')}"
        )
    impl = cfg.get("experts_implementation")
    if impl not in (None, "moequant"):
        raise ValueError(
            f"experts_implementation: {impl!r} would replace moequant's experts implementation on the quantized "
            "experts; remove it (moequant selects its own) or drop quantize_moe_experts"
        )
    blocksize = cfg.get("moequant_blocksize")
    if blocksize is not None and blocksize not in _BLOCKSIZES:
        raise ValueError(f"moequant_blocksize must be a power of two in [32, 4096], got {blocksize}")
    fuse = cfg.get("moequant_fuse")
    if fuse is not None and fuse not in ("quantized", "cpu", "device"):
        raise ValueError(f"moequant_fuse must be one of 'quantized', 'cpu', 'device', got {fuse!r}")


def _experts_dtype(cfg) -> torch.dtype:
    """The dtype the experts are loaded in: Axolotl's ``torch_dtype`` once the config is normalized; from
    the raw config, the one Axolotl's normalization will choose (``bf16: auto`` resolved as it does).
    A wrong guess costs only the prefetch: the load compares cache keys."""
    dtype = cfg.get("torch_dtype")
    if isinstance(dtype, torch.dtype):
        return dtype
    bf16, fp16 = cfg.get("bf16"), cfg.get("fp16")
    if bf16 == "auto":
        bf16 = not fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not bf16 and fp16 is None and not cfg.get("float16"):
            fp16 = True
    if bf16 or cfg.get("bfloat16"):
        return torch.bfloat16
    if cfg.get("load_in_8bit") or fp16 or cfg.get("float16"):
        return torch.float16
    return torch.float32


def _cache_args(cfg) -> tuple:
    """``ExpertsCache`` arguments for a config (its cache directory, checkpoint, format, blocksize, dtype)."""
    quant_type, double_quant = experts_format(cfg)
    return (cfg["moequant_cache_dir"], cfg.get("base_model"), quant_type, double_quant,
            int(cfg.get("moequant_blocksize") or 64), _experts_dtype(cfg))


def _gpu_only_settings(cfg) -> list[str]:
    """Settings of ``cfg`` that need a CUDA device."""
    found = []
    device_map = cfg.get("device_map")
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    if any(isinstance(v, int) or (isinstance(v, str) and v.startswith("cuda")) for v in values):
        found.append(f"device_map: {device_map!r}")
    for key in ("deepspeed", "fsdp", "fsdp_config", "flash_attention"):
        if cfg.get(key):
            found.append(f"{key}: {cfg.get(key)!r}")
    return found


def check_architecture(cfg) -> None:
    """Build the model on the meta device and check its experts; ``ValueError`` naming the model type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = bool(cfg.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(cfg.get("base_model_config") or cfg.get("base_model"), trust_remote_code=trust)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    except Exception as err:  # e.g. a multimodal class Axolotl loads otherwise: the loader's own check remains
        LOG.debug("moequant: no early architecture check for %s (%s)", config.model_type, err)
        return
    try:
        _check_model(model)
    except ValueError as err:
        moe_like = sorted({type(m).__name__ for m in model.modules()
                           if any(s in type(m).__name__.lower() for s in ("expert", "moe"))})
        raise ValueError(
            f"quantize_moe_experts with moequant: model type {config.model_type!r} ({type(model).__name__}) is not "
            f"supported: {err}. MoE-like modules found: {', '.join(moe_like) or 'none'}"
        ) from None


def _check_linear_targets(cfg, model) -> None:
    """``lora_target_linear`` adds every linear layer's name to ``target_modules``; PEFT's transformers
    conversion maps names such as ``gate_proj``/``down_proj`` onto fused expert parameters, which
    ``lora_target_parameters`` already targets: refuse that double targeting."""
    if not cfg.get("lora_target_linear") or not cfg.get("lora_target_parameters"):
        return
    try:
        from axolotl.loaders.adapter import find_all_linear_names
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:
        return
    names = sorted(set(find_all_linear_names(model)) | set(cfg.get("lora_target_modules") or []))
    probe = LoraConfig(target_modules=names, target_parameters=[])
    convert_peft_config_for_transformers(probe, model=model, conversions=get_model_conversion_mapping(model))
    converted = sorted(probe.target_parameters or [])
    if converted:
        raise ValueError(
            f"lora_target_linear adds {names} to the LoRA targets; PEFT maps {converted} of them onto the fused "
            f"expert parameters, which lora_target_parameters {list(cfg.get('lora_target_parameters'))} already "
            "targets, so the quantized experts would be targeted twice: set lora_target_linear: false and list "
            "lora_target_modules explicitly"
        )


class MoequantPlugin(BasePlugin):
    """Routes ``quantize_moe_experts: true`` through moequant's quantize-on-load (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._open = contextlib.ExitStack()  # what a load has patched; closed at its end or on failure
        self._cache: Optional[ExpertsCache] = None
        self._prefetch: Optional[EntryPrefetch] = None

    def get_input_args(self) -> str:
        return "moequant.integrations.axolotl.MoequantArgs"

    # -- config ------------------------------------------------------------------------------

    def register(self, cfg) -> None:
        if cfg.get("quantize_moe_experts"):
            check_config(cfg)
            # Axolotl reads quantize_moe_experts in validation and in _set_device_map_config, before
            # pre_model_load: it is taken over here, with the request kept under our own key.
            cfg["moequant_quantize_experts"] = True
            cfg["quantize_moe_experts"] = False
        if cfg.get("moequant_quantize_experts"):
            _guard_model_loader(self)
            if cfg.get("moequant_cache_dir") and cfg.get("base_model"):
                self._prefetch = EntryPrefetch(*_cache_args(cfg))

    def on_config_validation_error(self, cfg) -> None:
        _unguard_model_loader()

    def post_train_unload(self, cfg) -> None:
        self._close()
        _unguard_model_loader()

    # -- model load --------------------------------------------------------------------------

    def pre_model_load(self, cfg) -> None:
        if not cfg.get("moequant_quantize_experts"):
            return
        check_config(cfg)
        quant_type, double_quant = experts_format(cfg)
        if not torch.cuda.is_available():
            gpu_only = _gpu_only_settings(cfg)
            if gpu_only:
                raise ValueError(
                    f"quantize_moe_experts with moequant: this machine has no CUDA device, but the config asks for "
                    f"one ({'; '.join(gpu_only)}); remove those settings to train on the CPU"
                )
        check_architecture(cfg)
        self._close()
        # The loader installs moequant's PEFT injection (patch_peft); it is taken off again at the end.
        self._open.callback(remove_injection)
        blocksize = int(cfg.get("moequant_blocksize") or 64)
        self._cache, prefetched = None, None
        if cfg.get("moequant_cache_dir"):
            self._cache = ExpertsCache(*_cache_args(cfg))
            prefetched = self._prefetch.take(self._cache.key) if self._prefetch is not None else None
            self._prefetch = None
            if prefetched is not None:
                self._cache = prefetched
            else:
                self._cache.lookup()
        self._open.enter_context(
            quantize_experts_on_load(blocksize=blocksize, fuse=str(cfg.get("moequant_fuse") or "quantized"),
                                     quant_type=quant_type, double_quant=double_quant)
        )
        if self._cache_hit:
            self._open.enter_context(self._cache.hooks())
        LOG.info("moequant: quantize_moe_experts handled by moequant (%s experts%s, blocksize %d, fused LoRA op)%s",
                 quant_type, " with double-quantized statistics" if double_quant else "", blocksize,
                 f"; experts cache hit: {self._cache.directory}"
                 + (" (read ahead of the load)" if prefetched is not None else "") if self._cache_hit else "")

    def post_model_build(self, cfg, model) -> None:
        if not cfg.get("moequant_quantize_experts"):
            return
        self._close()  # finishes the load (experts the checkpoint lacked quantized) and unpatches transformers
        stats = load_stats(model)
        summary = memory_summary(model)
        if summary.num_stacks == 0:
            raise ValueError(f"quantize_moe_experts with moequant: no expert stack of {type(model).__name__} was "
                             "quantized")
        # Axolotl's post-build step recorded False (its own patch was off); True makes it skip
        # prepare_model_for_kbit_training, which would upcast frozen weights and read every stack dense.
        model._moe_experts_quantized = True
        if stats is not None:
            LOG.info("moequant: loaded %s in %.2f s (%.2f s quantizing)", type(model).__name__,
                     time.perf_counter() - stats.started, stats.quantize_seconds)
        LOG.info("moequant: %s", summary.format())
        if self._cache is not None:
            if self._cache_hit:
                LOG.info("moequant: %d expert stacks from the cache %s (none quantized)", summary.num_stacks,
                         self._cache.directory)
            else:
                size = self._cache.store(model, start=False)  # written once the load is over
                LOG.info("moequant: %d quantized expert stacks to be written to the cache %s in the background "
                         "after the load (%.1f MB)", summary.num_stacks, self._cache.directory, size / 2**20)

    def pre_lora_load(self, cfg, model) -> None:
        if not cfg.get("moequant_quantize_experts"):
            return
        _check_linear_targets(cfg, model)
        self._open.callback(remove_injection)
        self._open.enter_context(quantized_experts_injection())

    def post_lora_load(self, cfg, model) -> None:
        if not cfg.get("moequant_quantize_experts"):
            return
        self._close()
        if hasattr(model, "get_nb_trainable_parameters"):
            trainable, total = model.get_nb_trainable_parameters()
            LOG.info("moequant: trainable params %d || all params %d (quantized experts counted as their weights)",
                     trainable, total)

    def post_model_load(self, cfg, model) -> None:
        self._close()  # nothing is left open past the load, whatever happened in between
        if self._cache is not None:
            self._cache.start_write()

    def _drop_unstarted_write(self) -> None:
        """A load that failed before its end writes no cache entry."""
        if self._cache is not None:
            self._cache.cancel_write()

    @property
    def _cache_hit(self) -> bool:
        return self._cache is not None and self._cache.hit

    def _close(self) -> None:
        self._open.close()
        self._open = contextlib.ExitStack()


def _guard_model_loader(plugin: MoequantPlugin) -> None:
    """Wrap ``ModelLoader.load`` (idempotent) so that a load that fails between two plugin hooks
    still closes what the plugin patched."""
    try:
        from axolotl.loaders.model import ModelLoader
    except ImportError:
        return
    if getattr(ModelLoader.load, "_moequant_guarded", None) is not None:
        ModelLoader.load._moequant_plugins[:] = [plugin]
        return
    original = ModelLoader.load
    plugins = [plugin]

    @functools.wraps(original)
    def load(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except BaseException:
            for p in plugins:
                p._drop_unstarted_write()
            raise
        finally:
            for p in plugins:
                p._close()

    load._moequant_guarded = original
    load._moequant_plugins = plugins
    ModelLoader.load = load


def _unguard_model_loader() -> None:
    try:
        from axolotl.loaders.model import ModelLoader
    except ImportError:
        return
    original = getattr(ModelLoader.load, "_moequant_guarded", None)
    if original is not None:
        ModelLoader.load = original
