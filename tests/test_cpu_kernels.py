"""The CPU kernels' two ways of multiplying by a packed matrix (decoded on the fly for experts
with few rows, decoded in pieces for BLAS above MOEQUANT_CPU_ON_THE_FLY_ROWS) and their AVX2 and
portable loops (MOEQUANT_CPU_SIMD=0): both against the dequantized reference in every format and
layout, the loops bitwise against each other, the on-the-fly sums bitwise across thread counts."""

import pytest
import torch

from moequant import dequant_expert, ops, quantize
from moequant.reference import experts_forward_reference

from experts_cases import format_kwargs, in_format, make_case, rel_err

FORMATS = [("nf4", False), ("nf4", True), ("fp4", True), ("int8", False)]
FORMAT_IDS = ["nf4", "nf4+dq", "fp4+dq", "int8"]
ALWAYS_ON_THE_FLY, NEVER_ON_THE_FLY = "1000000", "0"


def odd_case(fmt, layout, lora=True, T=40, **shape):
    """H = 76: rows that are not a multiple of the 32 sum lanes or of a 4-byte decode step, and
    64-element blocks that straddle rows; skewed routing gives experts 0 to 40 rows."""
    transposed = layout == "transposed"
    case = make_case(T=T, H=shape.get("H", 76), I=shape.get("I", 32), E=shape.get("E", 5), k=2,
                     routing="skewed", transposed=transposed, interleaved=transposed, bias=transposed,
                     lora=(lora, lora), activation="swiglu_oai" if transposed else "silu", sentinels=True)
    return in_format(case, *fmt)


def forward_and_grads(case, kw, forward=ops.experts_forward):
    out = forward(*case.args(), **kw)
    grad = torch.linspace(-1, 1, out.numel()).view_as(out)
    return [out.detach()] + list(torch.autograd.grad(out, case.differentiable(), grad))


def check_against_reference(case, kw):
    got = forward_and_grads(case, kw)
    want = forward_and_grads(case, kw, experts_forward_reference)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < 2e-5


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize("rows", [ALWAYS_ON_THE_FLY, NEVER_ON_THE_FLY, None], ids=["on_the_fly", "blas", "default"])
@pytest.mark.parametrize("H", [76, 304])
def test_products_match_reference(fmt, layout, rows, H, monkeypatch):
    if rows is not None:
        monkeypatch.setenv("MOEQUANT_CPU_ON_THE_FLY_ROWS", rows)
    case = odd_case(fmt, layout, H=H)
    check_against_reference(case, format_kwargs(case))


@pytest.mark.parametrize("layout", ["plain", "transposed"])
def test_blas_path_in_several_pieces(layout, monkeypatch):
    # gate_up of 16448 x 64 (plain) spans two million-weight pieces; the backward sums its pieces
    monkeypatch.setenv("MOEQUANT_CPU_ON_THE_FLY_ROWS", NEVER_ON_THE_FLY)
    case = odd_case(("nf4", True), layout, H=64, I=8224, E=2, T=30)
    check_against_reference(case, format_kwargs(case))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize("H", [76, 304])  # 304: split-order decode, and stored rows in two groups
def test_simd_and_portable_loops_bitwise(fmt, layout, H, monkeypatch):
    monkeypatch.setenv("MOEQUANT_CPU_ON_THE_FLY_ROWS", ALWAYS_ON_THE_FLY)
    case = odd_case(fmt, layout, H=H)
    kw = format_kwargs(case)
    simd = forward_and_grads(case, kw)
    monkeypatch.setenv("MOEQUANT_CPU_SIMD", "0")
    portable = forward_and_grads(case, kw)
    for a, b in zip(simd, portable):
        assert torch.equal(a, b)
    # and the result is not trivially equal: the two strategies sum in different orders
    monkeypatch.setenv("MOEQUANT_CPU_ON_THE_FLY_ROWS", NEVER_ON_THE_FLY)
    blas = forward_and_grads(case, kw)
    assert rel_err(blas[0], simd[0]) < 1e-6


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_dequant_fp32_loops_bitwise(fmt, monkeypatch):
    # fp32 output decodes through CpuLoops (AVX2 or portable), 16-bit outputs through the scalar
    # decode rounded once: all the same values
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3, 16, 76, generator=g)
    w[1, 3] = 0.0  # an all-zero row
    stack = quantize(w, fmt[0], blocksize=64, double_quant=fmt[1])
    fp32 = dequant_expert(stack, dtype=torch.float32)
    monkeypatch.setenv("MOEQUANT_CPU_SIMD", "0")
    assert torch.equal(dequant_expert(stack, dtype=torch.float32), fp32)
    monkeypatch.delenv("MOEQUANT_CPU_SIMD")
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequant_expert(stack, dtype=dtype), fp32.to(dtype))
    assert torch.equal(dequant_expert(stack, 2, torch.float32), fp32[2])
    assert rel_err(fp32, w) < 0.15


def test_on_the_fly_sums_do_not_depend_on_threads(monkeypatch):
    monkeypatch.setenv("MOEQUANT_CPU_ON_THE_FLY_ROWS", ALWAYS_ON_THE_FLY)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            for layout in ("plain", "transposed"):
                case = odd_case(("nf4", True), layout, H=512, I=96)
                results.append(forward_and_grads(case, format_kwargs(case)))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(results[:2], results[2:]):
        for a, b in zip(one, three):
            assert torch.equal(a, b)


@pytest.mark.parametrize("value", ["-1", "many", ""])
def test_bad_on_the_fly_rows_setting(value, monkeypatch):
    monkeypatch.setenv("MOEQUANT_CPU_ON_THE_FLY_ROWS", value)
    case = odd_case(("nf4", False), "plain", lora=False)
    with pytest.raises(RuntimeError, match="MOEQUANT_CPU_ON_THE_FLY_ROWS must be a non-negative integer"):
        ops.experts_forward(*case.args(), **format_kwargs(case))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize("H", [76, 304])
def test_one_token_alone_equals_its_row_in_the_batch(fmt, layout, H, monkeypatch):
    # On the fly, each activation row's sums do not depend on the other rows, and a lone row
    # (decode, T=1) takes the fused decode-and-dot loop: bitwise the same output row.
    monkeypatch.setenv("MOEQUANT_CPU_ON_THE_FLY_ROWS", ALWAYS_ON_THE_FLY)
    case = odd_case(fmt, layout, lora=False, T=10, H=H)
    kw = format_kwargs(case)
    with torch.no_grad():
        batch = ops.experts_forward(*case.args(), **kw)
        for t in (0, 4, 9):
            alone = ops.experts_forward(case.hidden[t:t + 1], case.index[t:t + 1], case.weights[t:t + 1],
                                        *case.args()[3:], **kw)
            assert torch.equal(alone[0], batch[t])
