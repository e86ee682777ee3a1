"""Save a model with quantized experts and load it back without quantizing again.

``save_quantized(model, dir)`` writes the model's config and its whole state dict (packed expert
codes as ``…experts.parametrizations.gate_up_proj.original``, their statistics as ``….0.absmax``
(and ``….0.absmax_scale`` / ``….0.absmax_offset`` when double-quantized), all other weights as
they are) to ``dir/moequant_model.safetensors``, and the format (quant_type, double_quant,
blocksize) to ``moequant_config.json``. ``load_quantized(dir)`` builds the model with empty
weights, installs empty stacks of that format and shape and assigns the saved tensors: no dense
expert tensor is created and nothing is re-quantized.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional, Union

import torch
from torch import nn

from ..formats import QUANT_TYPES, check_stack, format_name
from .fsdp import full_state_dict
from .parametrize import nf4_stack_of
from .transformers import install_parameter_accounting, quantize_model_experts, quantized_stacks

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "moequant_model.safetensors"
FORMAT = "moequant"  # moequant_config.json "format"; "moequant-nf4" (earlier versions) is plain NF4
METADATA_NAME = "moequant_config.json"


def save_quantized(model: nn.Module, save_directory: Union[str, os.PathLike]) -> None:
    """Write ``config.json``, ``moequant_config.json`` and the quantized state dict to ``save_directory``.

    A model sharded with FSDP2 (:func:`moequant.integrations.fsdp.shard_model`) saves the same
    files: every rank must call it, rank 0 writes."""
    from safetensors.torch import save_file

    stacks = list(quantized_stacks(model))
    if not stacks:
        raise ValueError(f"save_quantized: {type(model).__name__} has no moequant-quantized experts")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError(
            "save_quantized stores moequant's quantized experts next to plain tensors; a model whose nn.Linear layers are "
            "bitsandbytes-quantized is not supported (load it from its original checkpoint instead)"
        )
    quantized = [nf4_stack_of(module, p) for _, module, p in stacks]
    blocksizes = sorted({s.blocksize for s in quantized})
    dtypes = sorted({str(s.dtype).removeprefix("torch.") for s in quantized})
    formats = sorted({(s.quant_type, s.double_quant) for s in quantized})
    if len(blocksizes) != 1 or len(dtypes) != 1 or len(formats) != 1:
        raise ValueError(
            "save_quantized: one blocksize, dtype and format per model expected, found "
            f"{blocksizes}, {dtypes}, {[format_name(*f) for f in formats]}"
        )
    quant_type, double_quant = formats[0]
    # Sharded by FSDP2: every rank sends its shards (packed bytes as stored, nothing dequantized)
    # and rank 0 alone writes.
    full_state = full_state_dict(model)
    if full_state is None:
        return
    os.makedirs(save_directory, exist_ok=True)
    model.config.save_pretrained(save_directory)
    with open(os.path.join(save_directory, METADATA_NAME), "w") as f:
        json.dump(
            {"format": FORMAT, "quant_type": quant_type, "double_quant": double_quant, "blocksize": blocksizes[0],
             "dtype": dtypes[0], "num_stacks": len(stacks)},
            f,
            indent=2,
        )

    # safetensors refuses tensors sharing storage (tied embeddings): keep the first name of each.
    state, seen = {}, set()
    for name, tensor in full_state.items():
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
    if meta.get("format") == "moequant-nf4":  # written before other formats existed
        quant_type, double_quant = "nf4", False
    elif meta.get("format") == FORMAT:
        quant_type, double_quant = meta.get("quant_type"), meta.get("double_quant")
        if quant_type not in QUANT_TYPES or not isinstance(double_quant, bool):
            raise ValueError(f"load_quantized: {meta_path} has quant_type={quant_type!r}, "
                             f"double_quant={double_quant!r}; expected one of {QUANT_TYPES} and a bool")
    else:
        raise ValueError(f"load_quantized: unknown format {meta.get('format')!r} in {meta_path}")
    config = AutoConfig.from_pretrained(save_directory)
    model_class = model_class or AutoModelForCausalLM
    dtype = dtype or getattr(torch, meta.get("dtype", "bfloat16"))
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=dtype)
    # empty (meta) stacks of the saved format and shapes
    quantize_model_experts(model, blocksize=int(meta["blocksize"]), quant_type=quant_type, double_quant=double_quant)

    state = load_file(os.path.join(save_directory, WEIGHTS_NAME), device=str(device))
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shapes of another format (or another model)
        raise ValueError(f"load_quantized: the tensors in {save_directory} do not fit "
                         f"{format_name(quant_type, double_quant)} stacks as {METADATA_NAME} says: {err}") from None
    if result.unexpected_keys:
        raise ValueError(f"load_quantized: unexpected keys in the checkpoint: {result.unexpected_keys[:8]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    still_meta += [n for n, b in model.named_buffers() if b.device.type == "meta" and ".parametrizations." in n]
    if still_meta:
        raise ValueError(f"load_quantized: parameters missing from the checkpoint: {still_meta[:8]}")
    for name, module, pname in quantized_stacks(model):
        try:
            check_stack(nf4_stack_of(module, pname))
        except ValueError as err:
            raise ValueError(f"load_quantized: {name} in {save_directory} does not hold a "
                             f"{format_name(quant_type, double_quant)} stack as {METADATA_NAME} says: {err}") from None
    model.to(device)  # the buffers built at __init__ (rotary tables…)
    model.eval()
    install_parameter_accounting(model)
    logger.info("moequant: loaded pre-quantized %s in %.2f s", type(model).__name__, time.perf_counter() - start)
    return model
