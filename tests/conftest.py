import importlib.util

import pytest
import torch

import moequant  # noqa: F401  (registers torch.ops.moequant)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
