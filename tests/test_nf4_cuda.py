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
