"""Loads the compiled library that registers ``torch.ops.moequant``."""

import torch

from . import _C  # noqa: F401  (static initializers register the operators)

ops = torch.ops.moequant
