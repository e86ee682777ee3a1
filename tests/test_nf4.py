"""quantize_nf4 / dequant_expert on CPU: format, bit-exactness, API, errors."""

import io
import json
import os

import numpy as np
import pytest
import torch

import moequant
from moequant import NF4Stack, dequant_expert, ops, quantize_nf4

from conftest import HAS_BNB

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)


def python_quantize(w: torch.Tensor, blocksize: int):
    """Independent re-statement of DESIGN.md §2 in plain PyTorch."""
    x = w.reshape(-1, blocksize).float()
    absmax = x.abs().amax(dim=1)
    absmax = torch.where(x.isnan().any(dim=1), torch.nan, absmax)
    scaled = x * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    mids = (NF4[:-1] + NF4[1:]) / 2
    codes = (~(scaled.unsqueeze(-1) <= mids)).sum(-1).reshape(-1)
    packed = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)
    return packed, absmax


def test_midpoints_match_header():
    header = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "nf4_format.h")).read()
    block = header.split("#define MOEQUANT_NF4_MIDPOINTS")[1].split("constexpr")[0]
    literals = [float(v.strip().rstrip("f")) for v in block.replace("\\", "").replace("{", "").replace("}", "").split(",")]
    mids = ((NF4[:-1] + NF4[1:]) / 2).tolist()
    assert torch.tensor(literals, dtype=torch.float32).tolist() == mids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_matches_python_statement(dtype, blocksize):
    w = (torch.randn(3, 16, 256) * 2).to(dtype)
    s = quantize_nf4(w, blocksize)
    packed, absmax = python_quantize(w, blocksize)
    assert s.packed.shape == (3, 16, 128) and s.packed.dtype == torch.uint8
    assert s.absmax.shape == (3, 16 * 256 // blocksize) and s.absmax.dtype == torch.float32
    assert torch.equal(s.packed.reshape(-1), packed)
    assert torch.equal(s.absmax.reshape(-1), absmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_dequant_definition_and_roundtrip_error(dtype, out_dtype, blocksize):
    w = torch.randn(4, 32, 128).to(dtype)
    s = quantize_nf4(w, blocksize)
    d = dequant_expert(s, dtype=out_dtype)
    assert d.shape == w.shape and d.dtype == out_dtype
    codes = unpack_codes(s.packed)
    scale = s.absmax.reshape(-1).repeat_interleave(blocksize)
    expected = (NF4[codes] * scale).to(out_dtype).reshape(w.shape)
    assert torch.equal(d, expected)
    # NF4 rounding error: at most half the largest gap between codes (0.1474 at the ends), times absmax.
    err = (d.float() - w.float()).abs().reshape(-1, blocksize)
    bound = s.absmax.reshape(-1, 1) * (0.5 * 0.3038 + 1e-2)
    assert (err <= bound).all()
    rel = (d.float() - w.float()).norm() / w.float().norm()
    assert rel < 0.12


def test_golden_vectors():
    with open(os.path.join(os.path.dirname(__file__), "data", "nf4_golden.json")) as f:
        golden = json.load(f)
    b = golden["blocksize"]
    for case in golden["cases"]:
        w = torch.from_numpy(np.array(case["input_bits"], dtype=np.uint32).view(np.float32).copy())
        s = quantize_nf4(w.reshape(1, b), b)
        assert s.packed.reshape(-1).tolist() == case["packed"]
        got = s.absmax.numpy().view(np.uint32)[0]
        assert int(got) == case["absmax_bits"]


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_bit_exact_with_bitsandbytes(dtype, blocksize):
    import bitsandbytes.functional as F

    w = (torch.randn(2, 64, 256) * torch.rand(2, 64, 1) * 4).to(dtype)
    w[0, 0, :blocksize // 2] = 0  # partly zero block
    w[1, :, :] = 0  # all-zero blocks
    w[0, 5, 7] = 1e-40
    s = quantize_nf4(w, blocksize)
    packed, state = F.quantize_4bit(w.flatten(), blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(s.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(s.absmax.reshape(-1), state.absmax)
    # Dequant is codebook * absmax in fp32, rounded once to the output dtype. bitsandbytes' fp32
    # output is that product; its 16-bit outputs come from a hardware-specific kernel on AVX-512
    # hosts (fp16 there differs by an ulp), so the 16-bit check rounds its fp32 result.
    state.dtype = torch.float32
    ref = F.dequantize_4bit(packed, state).to(dtype)
    assert torch.equal(dequant_expert(s).reshape(-1), ref.reshape(-1))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_nonfinite_matches_bitsandbytes():
    import bitsandbytes.functional as F

    w = torch.randn(4, 64)
    w[0, 3] = float("nan")
    w[1, 9] = float("inf")
    w[2, 1] = -float("inf")
    s = quantize_nf4(w, 64)
    packed, state = F.quantize_4bit(w.flatten(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(s.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(s.absmax.nan_to_num(-1), state.absmax.nan_to_num(-1))


def test_nonfinite_documented_behaviour():
    w = torch.randn(3, 64)
    w[0, 3] = float("nan")
    w[1, 9] = float("inf")
    s = quantize_nf4(w, 64)
    assert s.absmax[0].isnan() and s.absmax[1].isinf() and s.absmax[2].isfinite()
    codes = unpack_codes(s.packed).reshape(3, 64)
    assert (codes[0] == 15).all()
    assert codes[1, 9] == 15 and (codes[1, torch.arange(64) != 9] == 7).all()


def test_all_zero_block_is_0x77():
    s = quantize_nf4(torch.zeros(2, 128), 64)
    assert (s.packed == 0x77).all() and (s.absmax == 0).all()
    assert (dequant_expert(s) == 0).all()


def test_expert_slice_equals_full():
    w = torch.randn(5, 24, 64, dtype=torch.bfloat16)
    s = quantize_nf4(w, 128)
    full = dequant_expert(s)
    for e in range(5):
        assert torch.equal(dequant_expert(s, expert=e), full[e])


def test_two_dim_and_four_dim():
    w2 = torch.randn(32, 64)
    s2 = quantize_nf4(w2, 64)
    assert s2.packed.shape == (32, 32) and s2.absmax.shape == (32,)
    w4 = torch.randn(2, 3, 8, 64)
    s4 = quantize_nf4(w4, 64)
    assert s4.absmax.shape == (2, 3, 8)
    assert torch.equal(dequant_expert(s4).reshape(6, 8, 64), dequant_expert(quantize_nf4(w4.reshape(6, 8, 64), 64)))


def test_non_contiguous_input_is_handled():
    w = torch.randn(4, 64, 128)
    t = w.transpose(1, 2)  # [4, 128, 64], non-contiguous
    s = quantize_nf4(t, 64)
    assert torch.equal(s.packed, quantize_nf4(t.contiguous(), 64).packed)
    sliced = torch.randn(8, 32, 64)[::2]
    assert torch.equal(quantize_nf4(sliced, 64).packed, quantize_nf4(sliced.contiguous(), 64).packed)


def test_empty_tensors():
    s = quantize_nf4(torch.empty(0, 16, 64), 64)
    assert s.packed.shape == (0, 16, 32) and s.absmax.shape == (0, 16)
    assert dequant_expert(s).shape == (0, 16, 64)


def test_stack_state_dict_roundtrip():
    s = quantize_nf4(torch.randn(3, 16, 64, dtype=torch.bfloat16), 64)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    s2 = NF4Stack.from_state_dict(torch.load(buf, weights_only=True))
    assert s2.shape == s.shape and s2.blocksize == 64 and s2.dtype == torch.bfloat16
    assert torch.equal(s2.dequantize(), s.dequantize())
    bad = dict(s.state_dict(), absmax=s.absmax[:, :-1])
    with pytest.raises(ValueError, match="absmax"):
        NF4Stack.from_state_dict(bad)


def test_nbytes_counts_packed_and_absmax():
    s = quantize_nf4(torch.randn(2, 8, 64), 64)
    assert s.nbytes() == 2 * 8 * 32 + 2 * 8 * 4


@pytest.mark.parametrize(
    "weight,blocksize,match",
    [
        (torch.randint(0, 5, (4, 64)), 64, "float32, float16 or bfloat16"),
        (torch.randn(4, 63), 64, "must be even"),
        (torch.randn(3, 34), 64, "multiple of blocksize"),
        (torch.randn(4, 64), 48, "power of two"),
        (torch.randn(4, 64), 16, "power of two"),
        (torch.randn(64), 64, "at least 2 dims"),
    ],
)
def test_quantize_bad_inputs(weight, blocksize, match):
    with pytest.raises(RuntimeError, match=match):
        ops.quantize_nf4(weight, blocksize)


def test_dequant_bad_inputs():
    s = quantize_nf4(torch.randn(3, 8, 64), 64)
    with pytest.raises(RuntimeError, match=r"expert must be in \[0, 3\)"):
        ops.dequant_expert(s.packed, s.absmax, 64, torch.float32, 3)
    with pytest.raises(RuntimeError, match=r"expert must be in"):
        ops.dequant_expert(s.packed, s.absmax, 64, torch.float32, -1)
    with pytest.raises(RuntimeError, match="absmax must have shape"):
        ops.dequant_expert(s.packed, s.absmax[:, :4], 64, torch.float32, None)
    with pytest.raises(RuntimeError, match="absmax must have shape"):
        ops.dequant_expert(s.packed, s.absmax, 32, torch.float32, None)
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        ops.dequant_expert(s.packed.to(torch.int16), s.absmax, 64, torch.float32, None)
    with pytest.raises(RuntimeError, match="absmax must be float32"):
        ops.dequant_expert(s.packed, s.absmax.double(), 64, torch.float32, None)
    with pytest.raises(RuntimeError, match="dtype must be"):
        ops.dequant_expert(s.packed, s.absmax, 64, torch.int32, None)
    with pytest.raises(RuntimeError, match="same device"):
        ops.dequant_expert(s.packed, s.absmax.to("meta"), 64, torch.float32, None)
    with pytest.raises(RuntimeError, match="needs a stack"):
        s2 = quantize_nf4(torch.randn(8, 64), 64)
        ops.dequant_expert(s2.packed, s2.absmax, 64, torch.float32, 0)
    with pytest.raises(TypeError, match="QuantStack"):
        dequant_expert(s.packed)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])


def test_meta_kernels_give_exact_shapes():
    w = torch.empty(6, 40, 128, device="meta", dtype=torch.bfloat16)
    packed, absmax = ops.quantize_nf4(w, 64)
    assert packed.shape == (6, 40, 64) and packed.dtype == torch.uint8
    assert absmax.shape == (6, 80) and absmax.dtype == torch.float32
    out = ops.dequant_expert(packed, absmax, 64, torch.float16, 2)
    assert out.shape == (40, 128) and out.dtype == torch.float16
    with pytest.raises(RuntimeError, match="multiple of blocksize"):
        ops.quantize_nf4(torch.empty(2, 3, 2, device="meta"), 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    w = torch.randn(3, 16, 64).to(dtype)
    torch.library.opcheck(ops.quantize_nf4.default, (w, 64))
    s = quantize_nf4(w, 64)
    torch.library.opcheck(ops.dequant_expert.default, (s.packed, s.absmax, 64, dtype, None))
    torch.library.opcheck(ops.dequant_expert.default, (s.packed, s.absmax, 64, torch.float32, 1))


def test_compile_fullgraph_dynamic():
    def f(w):
        p, a = ops.quantize_nf4(w, 64)
        return ops.dequant_expert(p, a, 64, torch.bfloat16, None)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for e in (2, 3):
        w = torch.randn(e, 8, 64)
        assert torch.equal(compiled(w), f(w))


def test_parallel_kernel_matches_single_thread():
    w = torch.randn(16, 256, 512)
    s = quantize_nf4(w, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s1 = quantize_nf4(w, 64)
        d1 = dequant_expert(s1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(s.packed, s1.packed) and torch.equal(dequant_expert(s), d1)


def test_version():
    assert moequant.__version__
