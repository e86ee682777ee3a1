"""CUDA quantize_nf4 / dequant_expert against the CPU kernels (bit for bit) and, when importable,
against bitsandbytes' CUDA backend (equal absmax; dequantized values equal except rare one-code
flips at thresholds, since bitsandbytes' CUDA kernels are built with fast math)."""

import math

import pytest
import torch

from moequant import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def assert_bits_equal(got, want):
    """Bitwise equality; NaNs must sit at the same places but their payloads may differ (the GPU
    writes canonical NaNs, the CPU propagates the input's)."""
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.is_floating_point():
        nan_g, nan_w = torch.isnan(got), torch.isnan(want)
        assert torch.equal(nan_g, nan_w), "NaN positions differ"
        got, want = got.masked_fill(nan_g, 0), want.masked_fill(nan_w, 0)
    view = _INT_VIEW[got.element_size()]
    diff = (got.view(view) != want.view(view)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ, first at {diff[:5].tolist()}"


def check_against_cpu(w, bs, out_dtypes=DTYPES):
    """Quantize w on CPU and CUDA, compare; dequantize both stacks into every dtype, compare."""
    p_cpu, a_cpu = ops.quantize_nf4(w.cpu(), bs)
    p_gpu, a_gpu = ops.quantize_nf4(w.cuda(), bs)
    assert p_gpu.is_cuda and a_gpu.is_cuda
    assert_bits_equal(p_gpu, p_cpu)
    assert_bits_equal(a_gpu, a_cpu)
    for dt in out_dtypes:
        assert_bits_equal(ops.dequant_expert(p_gpu, a_gpu, bs, dt, None), ops.dequant_expert(p_cpu, a_cpu, bs, dt, None))
    return p_gpu, a_gpu


def blocks_to_weight(blocks, dtype):
    """[n, bs] blocks -> a [n', 2 * bs] weight (a zero block appended when n is odd)."""
    if blocks.shape[0] % 2:
        blocks = torch.cat([blocks, blocks.new_zeros(1, blocks.shape[1])])
    return blocks.to(dtype).reshape(-1, 2 * blocks.shape[1])


def random_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    # Rows of very different scales, as in real checkpoints.
    w = w * torch.exp2(torch.randint(-20, 10, shape[:-1] + (1,), generator=g).float())
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", BLOCKSIZES)
def test_random_matches_cpu(dtype, bs):
    w = random_weight((3, 64, 2 * max(bs, 128)), dtype, seed=bs)
    check_against_cpu(w, bs)


@pytest.mark.parametrize("bs", [32, 64, 4096])
def test_odd_block_counts_and_2d(bs):
    # Block counts that leave a warp's tail partially filled; a plain 2-D weight.
    for shape in [(1, bs), (3, 1, 3 * bs), (6, 7 * bs // 2), (2, 3, 5, bs)]:
        check_against_cpu(random_weight(shape, torch.bfloat16, seed=len(shape)), bs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_representable_value(dtype):
    """Every finite value in [-1, 1] of a 16-bit type, in blocks whose absmax is exactly 1 (so the
    scaled value is the value itself): covers every threshold and tie the type can express."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    vals = bits.float()
    vals = vals[torch.isfinite(vals) & (vals.abs() <= 1)]
    bs = 64
    per_block = bs - 1
    vals = torch.cat([vals, vals.new_zeros((-vals.numel()) % per_block)]).view(-1, per_block)
    check_against_cpu(blocks_to_weight(torch.cat([torch.ones(vals.shape[0], 1), vals], dim=1), dtype), bs)


def test_fp32_ties_and_neighbours():
    """fp32 midpoints themselves (ties go to the lower code), their neighbours a few ulps away,
    and the edges of the kernel's encoding bins (multiples of 1/32), at absmax 1 and at others."""
    from_cpu = torch.tensor
    mids = from_cpu([-0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
                     -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
                     0.120255246758461, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
                     0.5016634464263916, 0.6427869200706482, 0.8614784479141235], dtype=torch.float32)
    edges = torch.arange(-33, 34, dtype=torch.float32) / 32
    pts = torch.cat([mids, edges]).clamp(-1, 1)
    bits = pts.view(torch.int32)
    near = torch.cat([(bits + d).view(torch.float32) for d in range(-8, 9)])
    near = near[near.abs() <= 1]
    for amax in [1.0, 3.0, 0.7, 1e-30, 2.0**-126, 3e38]:
        vals = near * amax
        n = vals.numel()
        pad = (-n) % 63
        vals = torch.cat([vals, torch.zeros(pad)]).view(-1, 63)
        w = blocks_to_weight(torch.cat([torch.full((vals.shape[0], 1), amax), vals], dim=1), torch.float32)
        check_against_cpu(w, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_values(dtype):
    bs = 64
    finfo = torch.finfo(dtype)
    blocks = [
        torch.zeros(bs),                                    # all-zero block -> 0x77, absmax 0
        -torch.zeros(bs),                                   # negative zeros
        torch.full((bs,), float("nan")),                    # NaN block
        torch.cat([torch.tensor([float("nan")]), torch.randn(bs - 1)]),  # one NaN
        torch.cat([torch.tensor([float("inf")]), torch.randn(bs - 1)]),  # Inf: finite values -> 7
        torch.cat([torch.tensor([-float("inf")]), torch.randn(bs - 1)]),
        torch.full((bs,), finfo.max),                       # huge
        torch.randn(bs) * finfo.smallest_normal,            # mostly subnormal
        torch.randn(bs) * finfo.smallest_normal * 2.0**-5,  # deep subnormals
        torch.full((bs,), finfo.smallest_normal * 2.0**-3),
        torch.tensor([finfo.max, -finfo.max] * (bs // 2)),
    ]
    if dtype == torch.float32:
        blocks.append(torch.randn(bs) * 1e-39)  # absmax below the 1e-38 clamp
        blocks.append(torch.randn(bs) * 1e-44)
    w = torch.stack(blocks).to(dtype)  # [n, bs]: one block per row
    p, a = check_against_cpu(w, bs)
    assert torch.all(p.view(-1, bs // 2)[:2].cpu() == 0x77)
    assert torch.all(a.view(-1)[:2].cpu() == 0)


def test_noncontiguous_and_unaligned():
    bs = 64
    base = random_weight((4, 256, 192), torch.bfloat16)
    # Transposed view (non-contiguous).
    wt = base.transpose(-1, -2).cuda()
    assert not wt.is_contiguous()
    check_against_cpu(wt, bs)
    # Storage offsets of 1..7 elements: data pointer not 16-byte aligned.
    for off in range(1, 8):
        buf = torch.randn(base.numel() + off, dtype=torch.float16, device="cuda")
        w = buf[off:].view(base.shape)
        assert w.data_ptr() % 16 != 0
        p_gpu, a_gpu = ops.quantize_nf4(w, bs)
        p_cpu, a_cpu = ops.quantize_nf4(w.cpu(), bs)
        assert_bits_equal(p_gpu, p_cpu)
        assert_bits_equal(a_gpu, a_cpu)
        # Unaligned packed input for dequant.
        pbuf = torch.empty(p_gpu.numel() + off, dtype=torch.uint8, device="cuda")
        pu = pbuf[off:].view(p_gpu.shape)
        pu.copy_(p_gpu)
        assert_bits_equal(ops.dequant_expert(pu, a_gpu, bs, torch.bfloat16, None),
                          ops.dequant_expert(p_cpu, a_cpu, bs, torch.bfloat16, None))
    # Non-contiguous packed / absmax (every other expert).
    p, a = ops.quantize_nf4(base.cuda(), bs)
    p2, a2 = p[::2], a[::2]
    assert not p2.is_contiguous()
    assert_bits_equal(ops.dequant_expert(p2, a2, bs, torch.float32, None),
                      ops.dequant_expert(p2.cpu(), a2.cpu(), bs, torch.float32, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [32, 64, 256])
def test_expert(dtype, bs):
    w = random_weight((5, 48, 256), torch.bfloat16, seed=7)
    p, a = ops.quantize_nf4(w.cuda(), bs)
    full = ops.dequant_expert(p, a, bs, dtype, None)
    for e in range(5):
        one = ops.dequant_expert(p, a, bs, dtype, e)
        assert one.shape == (48, 256)
        assert_bits_equal(one, full[e])
        assert_bits_equal(one, ops.dequant_expert(p.cpu(), a.cpu(), bs, dtype, e))


def test_empty():
    p, a = ops.quantize_nf4(torch.empty(0, 4, 64, device="cuda"), 64)
    assert p.shape == (0, 4, 32) and a.shape == (0, 4)
    assert ops.dequant_expert(p, a, 64, torch.bfloat16, None).shape == (0, 4, 64)


def test_matches_bitsandbytes_cpu_format():
    """Our CUDA stack equals bitsandbytes' CPU/default quantize_4bit bit for bit (DESIGN.md §2)."""
    F = pytest.importorskip("bitsandbytes.functional")
    w = random_weight((2, 64, 256), torch.float32)
    for bs in [64, 128]:
        q, st = F.quantize_4bit(w.flatten(), blocksize=bs, quant_type="nf4", compress_statistics=False)
        p, a = ops.quantize_nf4(w.cuda(), bs)
        assert torch.equal(p.cpu().flatten(), q.cpu().flatten())
        assert torch.equal(a.cpu().flatten(), st.absmax.cpu().flatten())


def _bnb_cuda():
    try:
        import bitsandbytes.functional as F

        q, _ = F.quantize_4bit(torch.randn(256, device="cuda"), blocksize=64, quant_type="nf4")
        assert q.is_cuda
        return F
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bitsandbytes CUDA backend unavailable: {e}")


def _codes(packed):
    p = packed.flatten().int()
    return torch.stack([p >> 4, p & 0xF], dim=1).flatten()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [64, 128, 256, 512, 1024, 2048, 4096])
def test_vs_bitsandbytes_cuda(dtype, bs, record_property):
    """Equal absmax; codes equal except one-code flips at thresholds (bnb's fast math), counted and
    bounded; dequantizing either stack with either library gives the same values."""
    F = _bnb_cuda()
    w = random_weight((8, 512, 1024), dtype, seed=bs).cuda()
    w.view(-1, bs)[:3] = 0  # all-zero blocks: 0x77 here, 0x00 in bnb's CUDA backend
    p, a = ops.quantize_nf4(w, bs)
    q, st = F.quantize_4bit(w.flatten(), blocksize=bs, quant_type="nf4", compress_statistics=False)
    assert torch.equal(a.flatten(), st.absmax.flatten())
    zero = (a.flatten() == 0).repeat_interleave(bs)
    ours, theirs = _codes(p)[~zero], _codes(q)[~zero]
    flips = (ours != theirs).sum().item()
    assert (ours - theirs).abs().max().item() <= 1
    n = ours.numel()
    print(f"bnb CUDA one-code flips dtype={dtype} bs={bs}: {flips} of {n} ({flips / n:.2e})")
    record_property("bnb_flips", flips)
    assert flips <= max(10, n * 1e-4)
    # Where codes agree, dequantized values agree exactly (both libraries, both stacks).
    d_ours = ops.dequant_expert(p, a, bs, dtype, None).flatten()
    d_theirs = F.dequantize_4bit(q, st).flatten()
    same = torch.ones_like(zero)
    same[~zero] = ours == theirs
    assert torch.equal(d_ours[same], d_theirs[same])
    assert torch.equal(d_ours[zero], torch.zeros_like(d_ours[zero]))
    # bnb reads our stack: same values as our dequant (outputs here are never subnormal).
    st.absmax = a.flatten()
    assert torch.equal(F.dequantize_4bit(p.view(-1, 1), st).flatten(), d_ours)


def test_over_2_pow_31_elements():
    """A stack of more than 2^31 elements (64-bit indexing): sampled rows, including those past
    element 2^31, match the CPU kernel run on those rows alone."""
    E, N, K = 2, 32768, 32768 + 64
    assert E * N * K > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GB of free GPU memory")
    bs = 64
    torch.manual_seed(0)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16)
    p, a = ops.quantize_nf4(w, bs)
    out = ops.dequant_expert(p, a, bs, torch.bfloat16, None)
    # Every element written and close to w: within half the widest NF4 gap (0.152, between -1
    # and -0.696) of its block's absmax, plus bf16 rounding.
    for e in range(E):
        for r0 in range(0, N, 4096):
            wf = w[e, r0 : r0 + 4096].float().view(-1, bs)
            amax = a[e, r0 * K // bs : (r0 + 4096) * K // bs].view(-1, 1)
            err = (out[e, r0 : r0 + 4096].float().view(-1, bs) - wf).abs()
            assert torch.all(err <= amax * 0.16 + wf.abs() * 2**-8), (e, r0)
    first_row_past_2_31 = (2**31 - N * K) // K
    rows = [0, 1, N // 2, first_row_past_2_31 - 1, first_row_past_2_31, first_row_past_2_31 + 1, N - 1]
    blocks_per_row = K // bs
    for e in range(E):
        for r in rows:
            w_row = w[e, r : r + 1].cpu()
            p_cpu, a_cpu = ops.quantize_nf4(w_row, bs)
            assert_bits_equal(p[e, r : r + 1], p_cpu)
            assert_bits_equal(a[e, r * blocks_per_row : (r + 1) * blocks_per_row], a_cpu.flatten())
    del w
    one = ops.dequant_expert(p, a, bs, torch.bfloat16, E - 1)
    for e in range(E):
        for r in rows:
            p_row = p[e, r : r + 1].cpu()
            a_row = a[e, r * blocks_per_row : (r + 1) * blocks_per_row].cpu()
            want = ops.dequant_expert(p_row, a_row, bs, torch.bfloat16, None)
            assert_bits_equal(out[e, r : r + 1], want)
            if e == E - 1:
                assert_bits_equal(one[r : r + 1], want)
    assert_bits_equal(one[-3:], out[-1, -3:])
    assert math.prod(out.shape) == E * N * K


# ---- every format: FP4 and int8 codes, double-quantized statistics --------------------------

QUANT_TYPES = ["nf4", "fp4", "int8"]


def check_format_against_cpu(w, bs, quant_type, out_dtypes=DTYPES):
    """quantize_nf4(quant_type) on CPU and CUDA bit for bit, and dequant of both stacks into every dtype."""
    p_cpu, a_cpu = ops.quantize_nf4(w.cpu(), bs, quant_type)
    p_gpu, a_gpu = ops.quantize_nf4(w.cuda(), bs, quant_type)
    assert p_gpu.is_cuda and p_gpu.dtype == (torch.int8 if quant_type == "int8" else torch.uint8)
    assert_bits_equal(p_gpu, p_cpu)
    assert_bits_equal(a_gpu, a_cpu)
    for dt in out_dtypes:
        assert_bits_equal(ops.dequant_expert(p_gpu, a_gpu, bs, dt, None, quant_type),
                          ops.dequant_expert(p_cpu, a_cpu, bs, dt, None, quant_type))
    return p_gpu, a_gpu


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [32, 64, 256, 4096])
def test_formats_random_match_cpu(quant_type, dtype, bs):
    w = random_weight((3, 64, 2 * max(bs, 128)), dtype, seed=bs + 1)
    check_format_against_cpu(w, bs, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_formats_many_blocks_per_warp(quant_type):
    """A stack several waves of the persistent grid deep (a qwen3 gate_up shape, 8 experts): each
    warp takes many blocks or rows in turn, loading the next while encoding this one; every code
    and statistic is the CPU kernel's."""
    w = random_weight((8, 1536, 2048), torch.bfloat16, seed=21)
    check_format_against_cpu(w, 64, quant_type, out_dtypes=[torch.bfloat16])


@pytest.mark.parametrize("quant_type", ["fp4", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_formats_edge_values(quant_type, dtype):
    """All-zero rows/blocks, -0, NaN, +-Inf, huge and subnormal values: CUDA stores what the CPU
    kernel (and so bitsandbytes) stores."""
    bs = 64
    finfo = torch.finfo(dtype)
    blocks = [
        torch.zeros(bs), -torch.zeros(bs), torch.full((bs,), float("nan")),
        torch.cat([torch.tensor([float("nan")]), torch.randn(bs - 1)]),
        torch.cat([torch.tensor([float("inf")]), torch.randn(bs - 1)]),
        torch.cat([torch.tensor([-float("inf")]), torch.randn(bs - 1)]),
        torch.full((bs,), finfo.max), torch.randn(bs) * finfo.smallest_normal,
        torch.randn(bs) * finfo.smallest_normal * 2.0**-5, torch.tensor([finfo.max, -finfo.max] * (bs // 2)),
        torch.tensor([0.0, -0.0, 1.0, -1.0] * (bs // 4)),
    ]
    if dtype == torch.float32:
        blocks += [torch.randn(bs) * 1e-39, torch.randn(bs) * 1e-44]
    w = torch.stack(blocks).to(dtype)  # one block (4-bit) or one row (int8) each
    p, a = check_format_against_cpu(w, bs, quant_type)
    if quant_type == "fp4":  # bitsandbytes' fp4 stores +0 and -0 both as code 0 (its rank-7 value)
        assert torch.all(p.view(-1, bs // 2)[:2].cpu() == 0x00)
    else:  # an all-zero row: 0 * (127 / 0) = NaN, stored as 0
        assert torch.all(p[:2].cpu() == 0) and torch.all(a[:2].cpu() == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp4_every_representable_value(dtype):
    """Every finite value in [-1, 1] of a 16-bit type at absmax 1: every FP4 threshold and tie,
    including the three midpoints within 1/32 of zero that the fast encoder counts apart."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    vals = bits.float()
    vals = vals[torch.isfinite(vals) & (vals.abs() <= 1)]
    per_block = 63
    vals = torch.cat([vals, vals.new_zeros((-vals.numel()) % per_block)]).view(-1, per_block)
    check_format_against_cpu(blocks_to_weight(torch.cat([torch.ones(vals.shape[0], 1), vals], dim=1), dtype), 64,
                             "fp4")


def test_fp4_fp32_ties_and_neighbours():
    mids = torch.tensor([-0.8333333730697632, -0.5833333730697632, -0.4166666865348816, -0.2916666865348816,
                         -0.2083333432674408, -0.0859375, -0.0026041667442768812, 0.0, 0.0026041667442768812,
                         0.0859375, 0.2083333432674408, 0.2916666865348816, 0.4166666865348816,
                         0.5833333730697632, 0.8333333730697632], dtype=torch.float32)
    edges = torch.arange(-33, 34, dtype=torch.float32) / 32
    bits = torch.cat([mids, edges]).clamp(-1, 1).view(torch.int32)
    near = torch.cat([(bits + d).view(torch.float32) for d in range(-8, 9)])
    near = near[near.abs() <= 1]
    for amax in [1.0, 3.0, 0.7, 1e-30, 3e38]:
        vals = near * amax
        vals = torch.cat([vals, torch.zeros((-vals.numel()) % 63)]).view(-1, 63)
        w = blocks_to_weight(torch.cat([torch.full((vals.shape[0], 1), amax), vals], dim=1), torch.float32)
        check_format_against_cpu(w, 64, "fp4")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 3, 8, 30, 100, 768, 2048, 2056, 5000])
def test_int8_row_lengths(dtype, cols):
    """Rows held in registers (<= 2048), rows re-read for the encode, and lengths that are not a
    multiple of 8 (the element-wise kernels), in stacks and a 2-D weight."""
    check_format_against_cpu(random_weight((3, 5, cols), dtype, seed=cols), 64, "int8")
    check_format_against_cpu(random_weight((7, cols), dtype, seed=cols + 1), 64, "int8")


def test_int8_rounding_ties():
    """Values whose scaled form is exactly k + 0.5 round half to even, as torch.round does."""
    row = torch.tensor([127.0] + [k + 0.5 for k in range(-126, 126)] + [0.0, -127.0], dtype=torch.float32)
    check_format_against_cpu(row.view(1, -1), 64, "int8")


def compress_both(absmax):
    return ops.compress_statistics(absmax.cuda()), ops.compress_statistics(absmax.cpu())


@pytest.mark.parametrize("bs,shape", [(64, (4, 96, 512)), (32, (3, 100, 320)), (256, (2, 64, 4096)),
                                      (64, (160, 256)), (4096, (2, 8, 8192))])
def test_compress_statistics_matches_cpu(bs, shape, record_property):
    """Group absmax and codes equal the CPU kernel's wherever the per-matrix offset (torch's fp32
    mean, reduced in another order on the GPU) is the same; where it is off by rounding, codes move
    by at most one step and rarely. Everything downstream of the statistics is exact: decoding any
    given statistics gives the CPU's bits."""
    w = random_weight(shape, torch.bfloat16, seed=sum(shape))
    _, absmax = ops.quantize_nf4(w.cuda(), bs)
    (c_g, s_g, offset_g), (c_c, s_c, offset_c) = compress_both(absmax)
    assert c_g.dtype == torch.uint8 and c_g.shape == absmax.shape
    assert s_g.shape == s_c.shape and offset_g.shape == offset_c.shape == absmax.shape[:-1]
    o_g, o_c = offset_g.cpu().view(-1), offset_c.view(-1)
    assert torch.allclose(o_g, o_c, rtol=1e-6, atol=0)
    same = (o_g == o_c).repeat_interleave(absmax.shape[-1])
    codes_g, codes_c = c_g.cpu().view(-1).int(), c_c.view(-1).int()
    assert torch.equal(codes_g[same], codes_c[same])
    flips = (codes_g != codes_c).sum().item()
    assert (codes_g - codes_c).abs().max().item() <= 1
    assert flips <= max(4, codes_g.numel() // 100)
    record_property("offset_mismatches", int((o_g != o_c).sum()))
    record_property("code_flips", flips)
    print(f"compress_statistics bs={bs} shape={shape}: offsets differ in {(o_g != o_c).sum().item()} of "
          f"{o_g.numel()} matrices, {flips} of {codes_g.numel()} codes flipped")
    # Same statistics in, same bits out: CUDA dequant of the GPU's statistics equals the CPU's.
    p, _ = ops.quantize_nf4(w.cuda(), bs)
    for dt in DTYPES:
        assert_bits_equal(ops.dequant_expert(p, c_g, bs, dt, None, "nf4", s_g, offset_g),
                          ops.dequant_expert(p.cpu(), c_g.cpu(), bs, dt, None, "nf4", s_g.cpu(), offset_g.cpu()))


@pytest.mark.parametrize("shape", [(3, 0), (2, 4, 0), (0, 5), (0,)])
def test_compress_statistics_empty_shapes_match_cpu(shape):
    """Stacks with no blocks per matrix (or no matrices): the same shapes as on CPU, and each
    matrix's offset is the CPU's NaN (the mean of an empty row), never uninitialized memory."""
    absmax = torch.rand(shape)
    (c_g, s_g, o_g), (c_c, s_c, o_c) = compress_both(absmax)
    for g, c in ((c_g, c_c), (s_g, s_c), (o_g, o_c)):
        assert g.shape == c.shape and g.dtype == c.dtype
    assert torch.equal(o_g.cpu().isnan(), o_c.isnan())
    assert o_c.numel() == 0 or bool(o_c.isnan().all()) == (shape[-1] == 0)


def test_compress_statistics_exact_when_offsets_agree():
    """Absmax rows whose fp32 mean is exact in any order (small integers times a power of two,
    1024 per row: the sum is exact and dividing by 1024 or multiplying by 1/1024, as torch's CUDA
    mean does, agree): the GPU's statistics equal the CPU's bit for bit."""
    g = torch.Generator().manual_seed(3)
    absmax = torch.randint(0, 64, (5, 1024), generator=g).float() * 2.0**-7
    absmax[1] = 0  # an all-zero matrix: zero group absmax, code 0
    absmax[2, :300] = absmax[2, 0]  # a constant group
    (c_g, s_g, o_g), (c_c, s_c, o_c) = compress_both(absmax)
    assert_bits_equal(o_g, o_c)
    assert_bits_equal(s_g, s_c)
    assert_bits_equal(c_g, c_c)


def test_compress_statistics_many_groups_per_warp():
    """More groups of 256 blocks than the grid has warps (each warp codes several in turn, the next
    one's values in flight), with offsets exact in any summation order: bit for bit the CPU's."""
    g = torch.Generator().manual_seed(5)
    absmax = torch.randint(0, 64, (64, 32768), generator=g).float() * 2.0**-7
    absmax[3] = 0  # an all-zero matrix
    absmax[9, 256:512] = absmax[9, 256]  # a constant group
    (c_g, s_g, o_g), (c_c, s_c, o_c) = compress_both(absmax)
    assert_bits_equal(o_g, o_c)
    assert_bits_equal(s_g, s_c)
    assert_bits_equal(c_g, c_c)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [32, 64, 512])
def test_double_quant_dequant_matches_cpu(quant_type, dtype, bs):
    """Dequant with double-quantized statistics (whole stack and one expert), bit for bit with the
    CPU kernel decoding the same statistics; blocks per matrix not a multiple of 256 included."""
    w = random_weight((3, 72, 2 * max(bs, 160)), torch.bfloat16, seed=bs + 5)
    p, a = ops.quantize_nf4(w.cuda(), bs, quant_type)
    codes, scale, offset = ops.compress_statistics(a)
    full = ops.dequant_expert(p, codes, bs, dtype, None, quant_type, scale, offset)
    want = ops.dequant_expert(p.cpu(), codes.cpu(), bs, dtype, None, quant_type, scale.cpu(), offset.cpu())
    assert_bits_equal(full, want)
    for e in range(3):
        assert_bits_equal(ops.dequant_expert(p, codes, bs, dtype, e, quant_type, scale, offset), want[e])
    # Close to the plain stack: double quant moves each block scale by at most half a map step.
    plain = ops.dequant_expert(p, a, bs, torch.float32, None, quant_type).float()
    assert (full.float() - plain).abs().max() <= 0.01 * a.abs().max() + 1e-3


def test_format_errors():
    w = torch.randn(2, 8, 64, device="cuda")
    with pytest.raises(RuntimeError, match="nf4.*fp4.*int8"):
        ops.quantize_nf4(w, 64, "nf8")
    p, a = ops.quantize_nf4(w, 64, "int8")
    with pytest.raises(RuntimeError, match="int8"):
        codes, scale, offset = ops.compress_statistics(torch.rand(2, 8, device="cuda"))
        ops.dequant_expert(p, codes, 64, torch.bfloat16, None, "int8", scale, offset)
    p4, a4 = ops.quantize_nf4(w, 64, "fp4")
    with pytest.raises(RuntimeError, match="absmax"):
        ops.dequant_expert(p4, a4.to(torch.uint8), 64, torch.bfloat16, None, "fp4")


@pytest.mark.parametrize("quant_type", ["fp4", "int8"])
def test_formats_over_2_pow_31_elements(quant_type):
    """64-bit indexing for the new formats: sampled rows past element 2^31 match the CPU kernel."""
    E, N, K = 2, 16384, 65536 + 128
    assert E * N * K > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs ~16 GB of free GPU memory")
    torch.manual_seed(1)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16)
    p, a = ops.quantize_nf4(w, 64, quant_type)
    out = ops.dequant_expert(p, a, 64, torch.bfloat16, None, quant_type)
    stat_row = K // 64 if quant_type == "fp4" else 1
    for e in range(E):
        for r in [0, N // 2, N - 1]:
            p_cpu, a_cpu = ops.quantize_nf4(w[e, r : r + 1].cpu(), 64, quant_type)
            assert_bits_equal(p[e, r : r + 1], p_cpu)
            assert_bits_equal(a[e, r * stat_row : (r + 1) * stat_row].reshape(a_cpu.shape), a_cpu)
            assert_bits_equal(out[e, r : r + 1], ops.dequant_expert(p_cpu, a_cpu, 64, torch.bfloat16, None, quant_type))


def _bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def test_fp4_matches_bitsandbytes_cpu_format():
    F = _bnb_functional()
    w = random_weight((2, 64, 256), torch.float32)
    for bs in [64, 128]:
        q, st = F.quantize_4bit(w.flatten(), blocksize=bs, quant_type="fp4", compress_statistics=False)
        p, a = ops.quantize_nf4(w.cuda(), bs, "fp4")
        assert torch.equal(p.cpu().flatten(), q.cpu().flatten())
        assert torch.equal(a.cpu().flatten(), st.absmax.cpu().flatten())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_vs_bitsandbytes_cuda(quant_type):
    """bitsandbytes' CUDA dequantize_4bit reads our double-quantized statistics (its QuantState
    with nested state) and produces our values, except where its fast-math decode rounds the block
    scale differently (counted, bounded)."""
    F = _bnb_cuda()
    w = random_weight((1, 512, 1024), torch.bfloat16, seed=9).cuda()
    p, a = ops.quantize_nf4(w, 64, quant_type)
    codes, scale, offset = ops.compress_statistics(a)
    ours = ops.dequant_expert(p, codes, 64, torch.float32, None, quant_type, scale, offset).flatten()
    _, st = F.quantize_4bit(w.flatten(), blocksize=64, quant_type=quant_type, compress_statistics=True)
    st.absmax, st.offset = codes.flatten(), offset.reshape(())
    st.state2.absmax = scale.flatten()
    theirs = F.dequantize_4bit(p.view(-1, 1), st).float().flatten()
    mismatch = (ours != theirs).float().mean().item()
    assert mismatch <= 1e-3, mismatch
