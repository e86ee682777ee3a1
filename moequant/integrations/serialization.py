"""Save a model with quantized experts and load it back without quantizing again.

``save_quantized(model, dir)`` writes the model's config and its whole state dict (packed expert
codes as ``…experts.parametrizations.gate_up_proj.original``, their absmax as ``….0.absmax``, all
other weights as they are) to ``dir/moequant_model.safetensors``. ``load_quantized(dir)`` builds
the model with empty weights, installs empty NF4 stacks of the right shapes and assigns the saved
tensors: no dense expert tensor is created and nothing is re-quantized.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional, Union

import torch
from torch import nn

from .parametrize import nf4_stack_of
from .transformers import install_parameter_accounting, quantize_model_experts, quantized_stacks

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "moequant_model.safetensors"
METADATA_NAME = "moequant_config.json"


def save_quantized(model: nn.Module, save_directory: Union[str, os.PathLike]) -> None:
    """Write ``config.json``, ``moequant_config.json`` and the quantized state dict to ``save_directory``."""
    from safetensors.torch import save_file

    stacks = list(quantized_stacks(model))
    if not stacks:
        raise ValueError(f"save_quantized: {type(model).__name__} has no moequant-quantized experts")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError(
            "save_quantized stores moequant's NF4 experts next to plain tensors; a model whose nn.Linear layers are "
            "bitsandbytes-quantized is not supported (load it from its original checkpoint instead)"
        )
    os.makedirs(save_directory, exist_ok=True)
    model.config.save_pretrained(save_directory)
    nf4 = [nf4_stack_of(module, p) for _, module, p in stacks]
    blocksizes = sorted({s.blocksize for s in nf4})
    dtypes = sorted({str(s.dtype).removeprefix("torch.") for s in nf4})
    if len(blocksizes) != 1 or len(dtypes) != 1:
        raise ValueError(f"save_quantized: one blocksize and dtype per model expected, found {blocksizes}, {dtypes}")
    with open(os.path.join(save_directory, METADATA_NAME), "w") as f:
        json.dump(
            {"format": "moequant-nf4", "blocksize": blocksizes[0], "dtype": dtypes[0], "num_stacks": len(stacks)},
            f,
            indent=2,
        )

    # safetensors refuses tensors sharing storage (tied embeddings): keep the first name of each.
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.contiguous()
    save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    logger.info("moequant: saved %d quantized expert stacks to %s", len(stacks), save_directory)


def load_quantized(
    save_directory: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    model_class=None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Load what :func:`save_quantized` wrote, on ``device``, in eval mode.

    ``model_class`` defaults to ``AutoModelForCausalLM``; ``dtype`` is the dtype the model is built
    in (default: the dtype the experts were quantized from); the saved tensors keep their own.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    meta_path = os.path.join(save_directory, METADATA_NAME)
    if not os.path.exists(meta_path):
        raise ValueError(f"load_quantized: {save_directory} has no {METADATA_NAME}; was it written by save_quantized?")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != "moequant-nf4":
        raise ValueError(f"load_quantized: unknown format {meta.get('format')!r} in {meta_path}")
    config = AutoConfig.from_pretrained(save_directory)
    model_class = model_class or AutoModelForCausalLM
    dtype = dtype or getattr(torch, meta.get("dtype", "bfloat16"))
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=dtype)
    quantize_model_experts(model, blocksize=int(meta["blocksize"]))  # empty (meta) stacks of the right shapes

    state = load_file(os.path.join(save_directory, WEIGHTS_NAME), device=str(device))
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"load_quantized: unexpected keys in the checkpoint: {result.unexpected_keys[:8]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"load_quantized: parameters missing from the checkpoint: {still_meta[:8]}")
    model.to(device)  # the buffers built at __init__ (rotary tables…)
    model.eval()
    install_parameter_accounting(model)
    logger.info("moequant: loaded pre-quantized %s in %.2f s", type(model).__name__, time.perf_counter() - start)
    return model
