"""CUDA experts kernels (experts_forward, _experts_forward_train, experts_backward) against the
plain-PyTorch reference (fp32 arithmetic on upcast inputs) and its autograd gradients."""

import os
import re
import subprocess
import sys

import pytest
import torch

import moequant  # noqa: F401
from moequant import ops
from moequant.reference import experts_forward_reference

from experts_cases import make_case, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Relative Frobenius error allowed against the fp32 reference, by compute dtype.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LORA_NAMES = ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B")


@pytest.fixture
def env(monkeypatch):
    """Sets MOEQUANT_* environment knobs the CUDA kernels read on every call."""
    return monkeypatch.setenv


def cuda_case(**kw):
    kw.setdefault("device", "cuda")
    return make_case(**kw)


def fp32_inputs(case):
    """Detached fp32 leaf copies of the differentiable inputs, plus the matching kwargs."""
    hidden = case.hidden.detach().float().requires_grad_()
    weights = case.weights.detach().float().requires_grad_()
    kwargs = dict(case.kwargs)
    leaves = [hidden, weights]
    for name in LORA_NAMES:
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].detach().float().requires_grad_()
            leaves.append(kwargs[name])
    for name in ("gate_up_bias", "down_bias"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].float()
    return hidden, weights, kwargs, leaves


def reference(case, grad_out):
    hidden, weights, kwargs, leaves = fp32_inputs(case)
    packed = case.args()[3:]
    out = experts_forward_reference(hidden, case.index, weights, *packed, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.float(), allow_unused=True) if out.numel() else None
    return out, grads


def check_case(case, dtype, tol_scale=1.0):
    tol = TOL[dtype] * tol_scale
    args, kw = case.args(), case.kwargs
    out = ops.experts_forward(*[a.detach() for a in args], **{k: (v.detach() if torch.is_tensor(v) else v)
                                                                for k, v in kw.items()})
    assert out.shape == case.hidden.shape and out.dtype == case.hidden.dtype and out.is_cuda
    grad_out = torch.randn_like(out)
    ref_out, ref_grads = reference(case, grad_out)
    if out.numel():
        assert torch.isfinite(out).all()
        assert rel_err(out, ref_out) < tol, rel_err(out, ref_out)
    # Backward through the train forward + experts_backward, directly and via autograd.
    det = [a.detach() for a in args]
    det_kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kw.items()}
    out_t, gate_up_out = ops._experts_forward_train(*det, **det_kw)
    assert torch.equal(out_t, out) or out.shape[0] * case.index.shape[1] <= 64  # decode path may differ
    grads = ops.experts_backward(grad_out, *det[:3], gate_up_out, *det[3:], **det_kw)
    assert grads[0].dtype == case.hidden.dtype and grads[1].dtype == case.weights.dtype
    present = [n for n in LORA_NAMES if kw.get(n) is not None]
    got = [grads[0], grads[1]] + [grads[2 + LORA_NAMES.index(n)] for n in present]
    for n, g in zip(LORA_NAMES, grads[2:]):
        if kw.get(n) is None:
            assert g.numel() == 0
        else:
            assert g.shape == kw[n].shape and g.dtype == kw[n].dtype
    if ref_grads is not None:
        for name, g, w in zip(["hidden", "weights"] + present, got, ref_grads):
            assert torch.isfinite(g).all(), name
            if w is None or w.norm() == 0:
                assert g.float().norm() == 0, name
                continue
            assert rel_err(g, w) < 2 * tol, (name, rel_err(g, w))
    return out, gate_up_out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "swiglu_oai"])
@pytest.mark.parametrize("layout", ["plain", "transposed", "interleaved", "transposed_interleaved"])
@pytest.mark.parametrize("I", [32, 36])
def test_activations_layouts(dtype, activation, layout, I):
    # I=32: the activation kernels take 16 bytes of each row a thread; I=36 (not a multiple of 8):
    # one element a thread for 16-bit dtypes.
    case = cuda_case(T=40, I=I, dtype=dtype, activation=activation, transposed="transposed" in layout,
                     interleaved="interleaved" in layout, bias=layout != "plain", E=8, k=4)
    check_case(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("lora", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_lora(dtype, lora, rank):
    case = cuda_case(T=48, dtype=dtype, lora=lora, rank=rank, bias=True, E=8, k=4)
    check_case(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("routing", ["uniform", "skewed"])
@pytest.mark.parametrize("sentinels", [False, True])
def test_routing(dtype, routing, sentinels):
    case = cuda_case(T=64, dtype=dtype, routing=routing, sentinels=sentinels, lora=(True, True), rank=8,
                     bias=True, E=16, k=4)
    check_case(case, dtype)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_top_k(k):
    check_case(cuda_case(T=33, k=k, E=8, dtype=torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("T", [0, 1, 2, 5])
@pytest.mark.parametrize("decode", ["gemv", "grouped"])
def test_token_counts(T, decode, env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "64" if decode == "gemv" else "0")
    case = cuda_case(T=T, dtype=torch.bfloat16, bias=True, sentinels=True, k=4, E=8)
    out, _, grads = check_case(case, torch.bfloat16)
    assert out.shape == (T, 64) and grads[0].shape == (T, 64) and grads[1].shape == (T, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_decode_gemv_matches_grouped_path(dtype, activation, env):
    case = cuda_case(T=3, k=8, E=16, H=128, I=64, dtype=dtype, activation=activation, bias=True, sentinels=True,
                     interleaved=activation == "swiglu_oai", requires_grad=False)
    env("MOEQUANT_DECODE_MAX_PAIRS", "64")
    gemv = ops.experts_forward(*case.args(), **case.kwargs)
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    grouped = ops.experts_forward(*case.args(), **case.kwargs)
    ref = experts_forward_reference(*case.args(), **case.kwargs)
    assert rel_err(gemv, ref) < TOL[dtype] and rel_err(grouped, ref) < TOL[dtype]


# The decode GEMV reads LoRA factors as given when they are float32 (PEFT's default adapter dtype)
# or in the compute dtype, B with any strides (PEFT's expert-minor view), rounding float32 elements
# to the compute dtype as it reads them: bitwise what the same factors converted to contiguous
# tensors of the compute dtype give. Rank 8 and 17 (a rank row wider than a warp's lanes); H split
# in two input ranges (H = 32 * 130).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rank", [8, 17])
@pytest.mark.parametrize("H", [128, 32 * 130])
def test_decode_gemv_reads_float32_strided_lora(dtype, rank, H, env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "64")
    case = cuda_case(T=2, k=4, E=8, H=H, I=96, dtype=dtype, lora=(True, True), rank=rank, requires_grad=False)
    given = dict(case.kwargs)
    for name in LORA_NAMES:
        f = case.kwargs[name].detach().float()
        f = f + 1e-3 * torch.randn_like(f)  # values between those of the compute dtype: rounding matters
        if name.endswith("_B"):  # stored [out, r, E] (PEFT's expert-minor [out, r*E]), viewed [E, out, r]
            f = f.permute(1, 2, 0).contiguous().permute(2, 0, 1)
            assert not f.is_contiguous()
        given[name] = f
    converted = {n: (v.to(dtype).contiguous() if n in LORA_NAMES else v) for n, v in given.items()}
    names = cuda_kernel_names(lambda: ops.experts_forward(*case.args(), **given))
    out = ops.experts_forward(*case.args(), **given)
    want = ops.experts_forward(*case.args(), **converted)
    assert torch.equal(out, want), (out - want).abs().max()
    assert rel_err(out, experts_forward_reference(*case.args(), **converted)) < TOL[dtype]
    if names is not None:  # the decode kernels ran, and no conversion copy of the factors
        assert any("gemv" in n for n in names) and not any("copy" in n.lower() for n in names), sorted(names)


@pytest.mark.parametrize("blocksize", [32, 256])
def test_decode_gemv_split_inputs(blocksize, env):
    # H = 130 and I = 67 16-byte units per row: the GEMV splits each input dimension into
    # uneven ranges (44 + 44 + 42 and 34 + 33 units) whose partial sums are added later.
    case = cuda_case(T=2, k=2, E=4, H=32 * 130, I=32 * 67, blocksize=blocksize, dtype=torch.bfloat16, bias=True,
                     requires_grad=False)
    env("MOEQUANT_DECODE_MAX_PAIRS", "64")
    gemv = ops.experts_forward(*case.args(), **case.kwargs)
    again = ops.experts_forward(*case.args(), **case.kwargs)
    ref = experts_forward_reference(*case.args(), **case.kwargs)
    assert rel_err(gemv, ref) < TOL[torch.bfloat16]
    assert torch.equal(gemv, again)  # fixed summation order


def test_int32_index():
    check_case(cuda_case(T=20, index_dtype=torch.int32, sentinels=True, dtype=torch.bfloat16, lora=(True, True),
                         rank=8), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("transposed", [False, True])
def test_row_sliced_scratch(dtype, transposed, env):
    # A scratch budget below one expert forces row slices of a single expert per chunk (slices
    # are whole multiples of 128 rows: 4 for gate_up [512, 256], 2 for down [256, 256]).
    env("MOEQUANT_EXPERTS_SCRATCH_BYTES", "8192")
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "0")  # the scratch path under test
    case = cuda_case(T=30, H=256, I=256, E=4, k=2, dtype=dtype, transposed=transposed, lora=(True, True), rank=8,
                     bias=True)
    check_case(case, dtype)


# Rung (a) adds each projection's LoRA term as it copies a chunk's product out
# (experts_low_rank.cuh): ranks 7/8 and 16/17 (gate_up/down), chunks of experts with empty
# experts in between (few tokens over 16 experts), sentinels, and an output width that is not a
# multiple of 8 (H=100: the element-wise path of that kernel).
@pytest.mark.parametrize("rank", [7, 16])
@pytest.mark.parametrize("T,H,blocksize", [(12, 128, 64), (64, 128, 64), (40, 100, 32)])
def test_scratch_rung_lora_folded(rank, T, H, blocksize, env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "0")
    case = cuda_case(T=T, H=H, I=24 if H == 100 else 64, E=16, k=2, dtype=torch.bfloat16, bias=True,
                     lora=(True, True), rank=rank, sentinels=T == 64, blocksize=blocksize)
    check_case(case, torch.bfloat16)


def peak_transient_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def lora_peak_increase(T, H, I, E, k):
    """What LoRA r=16 on both projections adds to the transient peak of a bf16 call: (no-grad
    forward, forward+backward), in bytes."""
    peaks = {}
    for lora in (False, True):
        case = cuda_case(T=T, H=H, I=I, E=E, k=k, dtype=torch.bfloat16, lora=(lora, lora), rank=16,
                         weight_scale=0.02)
        args, kw = case.args(), case.kwargs
        grad = torch.randn_like(case.hidden)

        def fwd_bwd():
            ops.experts_forward(*args, **kw).backward(grad)

        fwd_bwd()  # warm-up: cuBLAS workspaces
        with torch.no_grad():
            nograd = peak_transient_bytes(lambda: ops.experts_forward(*args, **kw))
        peaks[lora] = (nograd, peak_transient_bytes(fwd_bwd))
    return tuple(with_lora - without for without, with_lora in zip(peaks[False], peaks[True]))


# With the LoRA terms added as each chunk's product is copied out, LoRA on both projections costs
# the forward and the backward well under one more [R, H] buffer (R = T * k routed rows): whole
# terms ([R, 2I], [R, H], [R, I], [R, H]) would cost several.
def test_scratch_rung_lora_memory(env):
    T, H, I, E, k = 2048, 1024, 128, 16, 2
    expert_bytes = 2 * I * H * 2  # one gate_up expert at bf16
    env("MOEQUANT_EXPERTS_SCRATCH_BYTES", str(2 * expert_bytes))  # chunks of two experts
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "0")
    row_buffer = T * k * H * 2  # one [R, H] bf16 buffer
    for phase, increase in zip(("forward", "forward+backward"), lora_peak_increase(T, H, I, E, k)):
        assert increase < row_buffer / 2, (phase, increase, row_buffer)


def kernel_launches(fn, name_part):
    """How many kernels whose name contains name_part fn() launches, or None where the profiler
    sees no kernels at all (CUPTI unavailable)."""
    names = cuda_kernel_launches(fn)
    return sum(name_part in n for n in names) if names else None


# Without a budget set, a scratch chunk takes enough experts for its grouped GEMM to span a few
# waves of tiles, up to the bytes of the routed rows the product reads. E=64 experts of about
# 256 rows: the 5% default budget (10.07 MB) holds 4 gate_up / 9 down experts a chunk (16 + 8
# dequant launches in a forward); the rows allow 16 of either (4 + 4).
def test_scratch_chunks_fill_the_gpu(env):
    T, H, I, E, k = 2048, 1024, 512, 64, 8
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "0")
    case = cuda_case(T=T, H=H, I=I, E=E, k=k, dtype=torch.bfloat16, lora=(True, True), rank=16)
    check_case(case, torch.bfloat16)

    def forward():
        with torch.no_grad():
            ops.experts_forward(*case.args(), **case.kwargs)

    grown = kernel_launches(forward, "dequant_")
    env("MOEQUANT_EXPERTS_SCRATCH_BYTES", str(2 * (E * 2 * I * H + E * H * I) // 20))  # the default, fixed
    fixed = kernel_launches(forward, "dequant_")
    if grown is not None:
        assert fixed == 16 + 8 and grown < fixed, (grown, fixed)


# The down LoRA's gradients need act(h) [R, I]; the activation backward writes it over the
# [R, I] buffer it consumes, so LoRA adds well under one [R, I] buffer to the fwd+bwd peak (with
# I = 4H here, the largest routing-order buffer besides gate_up's [R, 2I]).
def test_lora_backward_reuses_activation_buffer():
    T, H, I, E, k = 1024, 256, 1024, 8, 2
    act_buffer = T * k * I * 2  # one [R, I] bf16 buffer
    _, increase = lora_peak_increase(T, H, I, E, k)
    assert increase < act_buffer / 2, (increase, act_buffer)


def cuda_kernel_launches(fn):
    """The name of every CUDA kernel launch of fn(), in order ([] where the profiler sees none:
    CUPTI is unavailable, e.g. under compute-sanitizer)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


def cuda_kernel_names(fn):
    """Names of the CUDA kernels fn() launches, or None where the profiler sees none at all (CUPTI
    is unavailable, e.g. under compute-sanitizer): the numeric checks in fn still run."""
    return set(cuda_kernel_launches(fn)) or None


def ran_fused_gemm(names):
    return names is None or any("nf4_gemm_" in n for n in names)


def tile_heights(names):
    """Row-tile heights of the fused GEMM kernels among the kernel names."""
    return {int(m) for n in names for m in re.findall(r"nf4_gemm_\w+<[^,]+, [\w:()\s]*TileShape<(\d+)", n)}


# E=4, k=2 with H=192, I=64: every product of forward and backward qualifies for the fused kernel
# (input dims 64/128/192, output dims 64/128/192, so column tiles of 128 end part-filled), and the
# rows per expert (about T/2) pick each row-tile height: 16, 32, 64, 128, under both row-tile rules
# (experts_tile_plan.h). At T=128 the mean is exactly 64 rows: the decode-once rule gives each
# expert one tile of 64 or 128 rows (two lists of a few CTAs: side by side on two streams), the
# mean-height rule 64-row tiles and 16-row remainders. At T=300 every expert gets more than 128
# rows (about 150): one full 128-row tile each, and the remainder in shorter tiles.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
@pytest.mark.parametrize("T", [3, 40, 100, 128, 300])
@pytest.mark.parametrize("plan", ["decode_once", "mean"])
def test_fused_nf4_gemm(dtype, transposed, T, plan, env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "1")
    env("MOEQUANT_TILE_PLAN", plan)
    case = cuda_case(T=T, H=192, I=64, E=4, k=2, dtype=dtype, transposed=transposed, bias=True,
                     lora=(True, True), rank=8, routing="skewed" if T == 100 else "uniform", sentinels=T == 40)
    names = cuda_kernel_names(lambda: check_case(case, dtype))
    assert ran_fused_gemm(names), sorted(names)
    if T == 300 and names is not None:
        heights = tile_heights(names)
        assert 128 in heights and heights & {16, 32, 64}, sorted(names)
    if T == 128 and names is not None:
        heights = tile_heights(names)
        assert heights and heights <= ({64, 128} if plan == "decode_once" else {16, 64}), sorted(names)

    def forward():
        return ops.experts_forward(*[a.detach() for a in case.args()], **case.kwargs)

    out_b = forward()
    assert torch.equal(out_b, forward())
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "0")
    names = cuda_kernel_names(forward)
    assert names is None or not any("nf4_gemm_" in n for n in names)
    out_a = forward()
    # Same decoded weights, fp32 accumulation in another order: agreement far inside the tolerance.
    assert rel_err(out_b, out_a) < TOL[dtype] / 4, rel_err(out_b, out_a)


# The decode-once plan launches its lists of less than a wave on pool streams forked from the
# current stream and joined back: on a caller's own stream, what follows the op on that stream
# sees every list's rows (bitwise the default stream's result, forward and backward).
def test_fused_gemm_lists_join_the_current_stream(env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "1")
    case = cuda_case(T=1000, H=192, I=64, E=16, k=2, dtype=torch.bfloat16, routing="uniform")
    det = [a.detach() for a in case.args()]
    kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in case.kwargs.items()}

    def forward_backward():
        out, gate_up_out = ops._experts_forward_train(*det, **kw)
        grads = ops.experts_backward(torch.ones_like(out), *det[:3], gate_up_out, *det[3:], **kw)
        return out * 2, grads[0] * 2  # consumers on the same stream

    names = cuda_kernel_names(forward_backward)
    if names is not None:  # about 125 rows per expert: 128-row tiles and shorter remainders
        heights = tile_heights(names)
        assert 128 in heights and len(heights) >= 2, sorted(names)
    expected = forward_backward()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)  # the caller's stream is busy when the op forks from it
        got = forward_backward()
    stream.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("blocksize", [32, 256])
def test_fused_nf4_gemm_blocksizes(blocksize, env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "1")
    case = cuda_case(T=50, H=256, I=128, E=3, k=2, dtype=torch.bfloat16, blocksize=blocksize)
    names = cuda_kernel_names(lambda: check_case(case, torch.bfloat16))
    assert ran_fused_gemm(names), sorted(names)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


# The Hopper (wgmma) form of the fused kernel's [N, K] products: the forward of the plain layout,
# the input gradient of the transposed one. H=576: the gate_up product walks 9 k-tiles (the 4-stage
# ring wraps twice) and the down product's last 128-feature tile is half full; the rows per expert
# (about T/2) pick row tiles of 16, 32, 64 and 128 (+ remainders), under both row-tile rules.
@pytest.mark.skipif(not HOPPER, reason="wgmma needs an sm_90 device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
@pytest.mark.parametrize("T", [5, 60, 110, 400])
@pytest.mark.parametrize("plan", ["decode_once", "mean"])
def test_wgmma_nk_gemm(dtype, transposed, T, plan, env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "1")
    env("MOEQUANT_TILE_PLAN", plan)
    case = cuda_case(T=T, H=576, I=192, E=4, k=2, dtype=dtype, transposed=transposed, bias=True,
                     lora=(True, True), rank=8, routing="skewed" if T == 110 else "uniform", sentinels=T == 60)
    names = cuda_kernel_names(lambda: check_case(case, dtype))
    assert names is None or any("nf4_gemm_nk_wgmma" in n for n in names), sorted(names)
    det = [a.detach() for a in case.args()]
    kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in case.kwargs.items()}

    def forward_backward():
        out, gate_up_out = ops._experts_forward_train(*det, **kw)
        grads = ops.experts_backward(torch.ones_like(out), *det[:3], gate_up_out, *det[3:], **kw)
        return out, grads[0]

    out_w, dx_w = forward_backward()
    again = forward_backward()
    assert torch.equal(out_w, again[0]) and torch.equal(dx_w, again[1])  # deterministic
    env("MOEQUANT_EXPERTS_WGMMA", "0")
    names = cuda_kernel_names(forward_backward)
    assert names is None or (ran_fused_gemm(names) and not any("wgmma" in n for n in names)), sorted(names)
    out_m, dx_m = forward_backward()
    # Same decoded weights, fp32 accumulation in another order: agreement far inside the tolerance.
    assert rel_err(out_w, out_m) < TOL[dtype] / 4, rel_err(out_w, out_m)
    assert rel_err(dx_w, dx_m) < TOL[dtype] / 4, rel_err(dx_w, dx_m)


def test_blocksize_32_and_odd_shapes():
    case = cuda_case(T=17, H=96, I=48, E=5, k=3, blocksize=32, dtype=torch.bfloat16, lora=(True, True), rank=8,
                     bias=True, sentinels=True)
    check_case(case, torch.bfloat16)


def test_gate_up_out_is_routing_order():
    case = cuda_case(T=21, E=6, k=3, dtype=torch.float32, bias=True, lora=(True, False), sentinels=True,
                     requires_grad=False)
    _, h = ops._experts_forward_train(*case.args(), **case.kwargs)
    E, k = 6, 3
    idx = case.index.long().flatten()
    order = torch.sort(idx.clamp(max=E), stable=True).indices
    w = ops.dequant_expert(case.gate_up.packed, case.gate_up.absmax, 64, torch.float32, None)
    x = case.hidden[order // k]
    valid = idx[order] < E
    kw = case.kwargs
    rows = []
    for p, e in zip(order.tolist(), idx[order].tolist()):
        if e >= E:
            rows.append(torch.zeros(h.shape[1], device="cuda"))
            continue
        xe = case.hidden[p // k]
        r = xe @ w[e].t() + kw["gate_up_bias"][e] + kw["gate_up_lora_scaling"] * (
            (xe @ kw["gate_up_lora_A"][e].t()) @ kw["gate_up_lora_B"][e].t())
        rows.append(r)
    want = torch.stack(rows)
    assert rel_err(h[valid], want[valid]) < 1e-4
    assert torch.count_nonzero(h[~valid]) == 0
    del x


def test_backward_recompute_matches_saved():
    case = cuda_case(T=50, E=8, k=4, dtype=torch.bfloat16, bias=True, lora=(True, True), rank=8,
                     requires_grad=False)
    out, h = ops._experts_forward_train(*case.args(), **case.kwargs)
    g = torch.randn_like(out)
    saved = ops.experts_backward(g, *case.args()[:3], h, *case.args()[3:], **case.kwargs)
    recomputed = ops.experts_backward(g, *case.args()[:3], None, *case.args()[3:], **case.kwargs)
    for a, b in zip(saved, recomputed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_deterministic(dtype):
    case = cuda_case(T=300, E=16, k=8, dtype=dtype, bias=True, lora=(True, True), rank=16, requires_grad=False,
                     routing="skewed")
    out, h = ops._experts_forward_train(*case.args(), **case.kwargs)
    g = torch.randn_like(out)
    runs = [ops.experts_backward(g, *case.args()[:3], h, *case.args()[3:], **case.kwargs) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    out2, h2 = ops._experts_forward_train(*case.args(), **case.kwargs)
    assert torch.equal(out, out2) and torch.equal(h, h2)


def test_autograd_matches_reference():
    case = cuda_case(T=40, E=8, k=4, dtype=torch.bfloat16, bias=True, lora=(True, True), rank=8)
    out = ops.experts_forward(*case.args(), **case.kwargs)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, case.differentiable(), grad_out)
    _, want = reference(case, grad_out)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 4e-2


def test_zero_token_experts_get_zero_lora_grads():
    case = cuda_case(T=40, routing="skewed", lora=(True, True), rank=8, E=8, k=2, dtype=torch.bfloat16,
                     requires_grad=False)
    out, h = ops._experts_forward_train(*case.args(), **case.kwargs)
    grads = ops.experts_backward(torch.randn_like(out), *case.args()[:3], h, *case.args()[3:], **case.kwargs)
    idle = [e for e in range(8) if not (case.index == e).any()]
    assert idle
    for g in grads[2:]:
        assert torch.count_nonzero(g[idle]) == 0 and torch.count_nonzero(g) > 0


def test_all_pairs_sentinel():
    case = cuda_case(T=7, E=4, k=2, dtype=torch.bfloat16, lora=(True, True), rank=8, bias=True,
                     requires_grad=False)
    idx = torch.full_like(case.index, 4)
    out, h = ops._experts_forward_train(case.hidden, idx, case.weights, *case.args()[3:], **case.kwargs)
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(h) == 0
    grads = ops.experts_backward(torch.randn_like(out), case.hidden, idx, case.weights, h, *case.args()[3:],
                                 **case.kwargs)
    for g in grads:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("decode", ["gemv", "grouped"])
def test_negative_index_raises(decode, env):
    """The routed paths raise on the host; the decode GEMV's no-grad call (decode="gemv") asserts on
    the device instead, which ends the CUDA context: tests/test_experts_cuda_graphs.py runs it in a
    subprocess."""
    env("MOEQUANT_DECODE_MAX_PAIRS", "64" if decode == "gemv" else "0")
    case = cuda_case(T=4, k=2, E=4, requires_grad=False)
    idx = case.index.clone()
    idx[1, 0] = -1
    if decode == "grouped":
        with pytest.raises(RuntimeError, match="negative expert id"):
            ops.experts_forward(case.hidden, idx, case.weights, *case.args()[3:], **case.kwargs)
    with pytest.raises(RuntimeError, match="negative expert id"):
        ops._experts_forward_train(case.hidden, idx, case.weights, *case.args()[3:], **case.kwargs)


def test_bad_inputs_raise():
    case = cuda_case(T=4, k=2, E=4, requires_grad=False)
    with pytest.raises(RuntimeError, match="activation"):
        ops.experts_forward(*case.args(), **dict(case.kwargs, activation="relu"))
    with pytest.raises(RuntimeError, match="float64|float32, float16 or bfloat16"):
        ops.experts_forward(case.hidden.double(), case.index, case.weights, *case.args()[3:], **case.kwargs)
    out, h = ops._experts_forward_train(*case.args(), **case.kwargs)
    with pytest.raises(RuntimeError, match="gate_up_out"):
        ops.experts_backward(out, *case.args()[:3], h[:3], *case.args()[3:], **case.kwargs)


# ---- every format: FP4, int8, double-quantized statistics ------------------------------------

FORMATS = {"nf4_dq": ("nf4", True), "fp4": ("fp4", False), "fp4_dq": ("fp4", True), "int8": ("int8", False)}
# MOEQUANT_INT8_FUSED_GEMM="0" keeps int8 stacks on the scratch rung; the kernels read it once per
# process, so it is set for a whole run (test_int8_fused_gemm_switch_off runs one).
INT8_FUSED = os.environ.get("MOEQUANT_INT8_FUSED_GEMM") != "0"
RUNGS = {"auto": {}, "scratch": {"MOEQUANT_EXPERTS_FUSED_GEMM": "0", "MOEQUANT_DECODE_MAX_PAIRS": "0"},
         "fused": {"MOEQUANT_EXPERTS_FUSED_GEMM": "1", "MOEQUANT_DECODE_MAX_PAIRS": "0"},
         "fused_mma": {"MOEQUANT_EXPERTS_FUSED_GEMM": "1", "MOEQUANT_DECODE_MAX_PAIRS": "0",
                       "MOEQUANT_EXPERTS_WGMMA": "0"}}


class FormatCase:
    """An experts case whose stacks are re-quantized (from the NF4 case's dequantized weights) in
    another format, with the dense weights that format decodes to for the reference."""

    def __init__(self, case, quant_type, double_quant):
        self.case = case
        bs = case.kwargs["blocksize"]
        self.stacks, self.dense = [], []
        extra = {"quant_type": quant_type}
        for name, stack in (("gate_up", case.gate_up), ("down", case.down)):
            w = ops.dequant_expert(stack.packed, stack.absmax, bs, torch.float32, None)
            packed, absmax = ops.quantize_nf4(w, bs, quant_type)
            scale = offset = None
            if double_quant:
                absmax, scale, offset = ops.compress_statistics(absmax)
                extra[f"{name}_absmax_scale"], extra[f"{name}_absmax_offset"] = scale, offset
            self.stacks += [packed, absmax]
            self.dense.append(ops.dequant_expert(packed, absmax, bs, torch.float32, None, quant_type, scale, offset))
        self.kwargs = dict(case.kwargs, **extra)

    def args(self):
        return (self.case.hidden, self.case.index, self.case.weights, *self.stacks)


def dense_reference(fc, hidden, weights, kwargs):
    """experts_forward on the dense weights a format decodes to (fp32 arithmetic)."""
    from moequant.reference import _project, gated_activation

    w_gu, w_d = (w.double() for w in fc.dense)
    opt = lambda name, e: None if kwargs.get(name) is None else kwargs[name][e].double()  # noqa: E731
    x_all = hidden.double()
    out = torch.zeros_like(x_all)
    index = fc.case.index
    for e in range(w_gu.shape[0]):
        tok, slot = torch.nonzero(index == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = _project(x_all[tok], w_gu[e], kwargs["transposed"], opt("gate_up_bias", e), opt("gate_up_lora_A", e),
                     opt("gate_up_lora_B", e), kwargs.get("gate_up_lora_scaling", 1.0))
        a = gated_activation(h, kwargs["activation"], kwargs["interleaved"], kwargs.get("act_alpha", 1.702),
                             kwargs.get("act_limit", 7.0))
        y = _project(a, w_d[e], kwargs["transposed"], opt("down_bias", e), opt("down_lora_A", e),
                     opt("down_lora_B", e), kwargs.get("down_lora_scaling", 1.0))
        out = out.index_add(0, tok, y * weights[tok, slot].double().unsqueeze(-1))
    return out


def check_format_case(fc, dtype):
    """Output of experts_forward and every gradient of experts_backward against the dense
    reference's autograd, like check_case."""
    tol = TOL[dtype]
    case = fc.case
    det = [a.detach() for a in fc.args()]
    kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in fc.kwargs.items()}
    out = ops.experts_forward(*det, **kw)
    out_t, gate_up_out = ops._experts_forward_train(*det, **kw)
    grad_out = torch.randn_like(out)
    grads = ops.experts_backward(grad_out, *det[:3], gate_up_out, *det[3:], **kw)
    hidden = case.hidden.detach().double().requires_grad_()
    weights = case.weights.detach().double().requires_grad_()
    ref_kw = dict(case.kwargs)
    leaves, names = [hidden, weights], ["hidden", "weights"]
    for name in LORA_NAMES:
        if ref_kw.get(name) is not None:
            ref_kw[name] = ref_kw[name].detach().double().requires_grad_()
            leaves.append(ref_kw[name])
            names.append(name)
    ref = dense_reference(fc, hidden, weights, ref_kw)
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    assert rel_err(out_t, ref) < tol
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    got = [grads[0], grads[1]] + [grads[2 + LORA_NAMES.index(n)] for n in names[2:]]
    for name, g, w in zip(names, got, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < 2 * tol, (name, rel_err(g, w))
    return out, gate_up_out, grads


# Each format through each rung (auto dispatch, scratch forced, fused forced with wgmma on Hopper,
# fused on mma.sync), plain / transposed / interleaved layouts, with and without LoRA. H=192, I=64:
# every product qualifies for the fused kernel, int8 stacks included (unless
# MOEQUANT_INT8_FUSED_GEMM=0 keeps them on the scratch rung).
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rung", list(RUNGS))
@pytest.mark.parametrize("layout", ["plain", "transposed", "interleaved"])
@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
def test_formats(fmt, rung, layout, lora, env):
    if rung == "fused_mma" and not HOPPER:
        pytest.skip("the mma.sync form differs from 'fused' only on Hopper")
    for k, v in RUNGS[rung].items():
        env(k, v)
    case = cuda_case(T=40, H=192, I=64, E=4, k=2, dtype=torch.bfloat16, transposed=layout == "transposed",
                     interleaved=layout == "interleaved", activation="swiglu_oai" if layout == "interleaved" else "silu",
                     bias=True, lora=(lora, lora), rank=8, sentinels=True, requires_grad=False)
    fc = FormatCase(case, *FORMATS[fmt])
    names = cuda_kernel_names(lambda: check_format_case(fc, torch.bfloat16))
    if names is not None and rung in ("fused", "fused_mma"):
        fused = any("nf4_gemm_" in n for n in names)
        if fmt == "int8" and not INT8_FUSED:  # every product dequantizes to scratch instead
            assert not fused and any("dequant_int8" in n for n in names), sorted(names)
        else:
            assert fused and not any("dequant_" in n for n in names), sorted(names)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_formats_dtypes(fmt, dtype):
    case = cuda_case(T=24, H=128, I=64, E=6, k=3, dtype=dtype, bias=True, lora=(True, True), rank=4,
                     requires_grad=False)
    check_format_case(FormatCase(case, *FORMATS[fmt]), dtype)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("T,H,I", [(1, 128, 64), (3, 128, 64), (2, 32 * 130, 32 * 67)])
def test_formats_decode(fmt, T, H, I, env):
    """No-grad decode: the GEMV for every format (int8: a one-byte decode step), including input
    dimensions split into uneven ranges (H = 130 and I = 67 units of 32 weights)."""
    env("MOEQUANT_DECODE_MAX_PAIRS", "64")
    case = cuda_case(T=T, k=4 if T < 2 else 2, E=8 if H == 128 else 4, H=H, I=I, dtype=torch.bfloat16, bias=True,
                     sentinels=True, requires_grad=False)
    fc = FormatCase(case, *FORMATS[fmt])
    names = cuda_kernel_names(lambda: ops.experts_forward(*fc.args(), **fc.kwargs))
    if names is not None:
        assert any("gemv" in n for n in names), sorted(names)
    out = ops.experts_forward(*fc.args(), **fc.kwargs)
    assert rel_err(out, dense_reference(fc, case.hidden, case.weights, case.kwargs)) < TOL[torch.bfloat16]


def decoded_absmax(packed, codes, scale, offset, blocksize, quant_type):
    """The fp32 block scales that double-quantized statistics decode to, through the kernels
    themselves: every weight set to the code of 1.0 dequantizes to its block's scale."""
    one = 15 if quant_type == "nf4" else 3  # code of 1.0
    ones = torch.full_like(packed, one * 17)
    w = ops.dequant_expert(ones, codes, blocksize, torch.float32, None, quant_type, scale, offset)
    return w.reshape(w.shape[0], -1, blocksize)[..., 0].contiguous()


# Double-quantized statistics are decoded inside each kernel: every rung must compute exactly what
# it computes from a plain absmax holding the decoded values (same weights, same order).
# Blocks of 32 and 64 weights: the wgmma [N, K] kernel and the GEMV share decoded scales between
# the threads whose weights lie in one block (blocks of 64: four threads of a quad, two lanes).
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("rung", ["scratch", "fused", "fused_mma", "gemv"])
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_double_quant_bitwise_equals_decoded_plain(quant_type, rung, transposed, blocksize, env):
    if rung == "fused_mma" and not HOPPER:
        pytest.skip("the mma.sync form differs from 'fused' only on Hopper")
    if rung == "gemv":
        env("MOEQUANT_DECODE_MAX_PAIRS", "64")
    else:
        for k, v in RUNGS[rung].items():
            env(k, v)
    T = 3 if rung == "gemv" else 70
    case = cuda_case(T=T, H=320, I=64, E=4, k=2, dtype=torch.bfloat16, transposed=transposed and rung != "gemv",
                     bias=True, lora=(rung != "gemv",) * 2, rank=8, requires_grad=False, blocksize=blocksize)
    fc = FormatCase(case, quant_type, True)
    plain = list(fc.stacks)
    for i, name in ((1, "gate_up"), (3, "down")):
        plain[i] = decoded_absmax(fc.stacks[i - 1], fc.stacks[i], fc.kwargs[f"{name}_absmax_scale"],
                                  fc.kwargs[f"{name}_absmax_offset"], blocksize, quant_type)
    kw_plain = {k: v for k, v in fc.kwargs.items() if "absmax_" not in k}
    base = (case.hidden, case.index, case.weights)
    out_dq = ops.experts_forward(*fc.args(), **fc.kwargs)
    out_plain = ops.experts_forward(*base, *plain, **kw_plain)
    assert torch.equal(out_dq, out_plain)
    if rung == "gemv":
        return
    o1, h1 = ops._experts_forward_train(*fc.args(), **fc.kwargs)
    o2, h2 = ops._experts_forward_train(*base, *plain, **kw_plain)
    assert torch.equal(o1, o2) and torch.equal(h1, h2)
    g = torch.randn_like(o1)
    g_dq = ops.experts_backward(g, *base, h1, *fc.stacks, **fc.kwargs)
    g_plain = ops.experts_backward(g, *base, h2, *plain, **kw_plain)
    for a, b in zip(g_dq, g_plain):
        assert torch.equal(a, b)


# The decode GEMV on tensor cores (16-bit inputs; 4-bit codes in blocks of 64 or more; input
# dimensions of whole 256-weight steps: H=768 splits into 3 steps over 4 warps, one of them idle)
# in every 4-bit format, against the dense reference and its FFMA path (MOEQUANT_DECODE_MMA=0), with
# bias, LoRA and sentinel slots; reproducible; and double-quantized statistics bitwise what their
# decoded plain absmax gives.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("fmt", ["nf4", "nf4_dq", "fp4", "fp4_dq"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_decode_gemv_tensor_cores(dtype, fmt, blocksize, env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "64")
    case = cuda_case(T=3, k=4, E=8, H=768, I=256, dtype=dtype, bias=True, sentinels=True, lora=(True, True),
                     rank=8, requires_grad=False, blocksize=blocksize)
    quant_type, double_quant = fmt.split("_")[0], fmt.endswith("_dq")
    fc = FormatCase(case, quant_type, double_quant)
    mma = ops.experts_forward(*fc.args(), **fc.kwargs)
    assert torch.equal(mma, ops.experts_forward(*fc.args(), **fc.kwargs))  # fixed summation order
    env("MOEQUANT_DECODE_MMA", "0")
    ffma = ops.experts_forward(*fc.args(), **fc.kwargs)
    ref = dense_reference(fc, case.hidden, case.weights, case.kwargs)
    assert rel_err(mma, ref) < TOL[dtype] and rel_err(ffma, ref) < TOL[dtype]
    assert not torch.equal(mma, ffma)  # the switch chose another path (codes enter the products in dtype)
    assert rel_err(mma, ffma) < TOL[dtype]
    if double_quant:
        env("MOEQUANT_DECODE_MMA", "1")
        plain = list(fc.stacks)
        for i, name in ((1, "gate_up"), (3, "down")):
            plain[i] = decoded_absmax(fc.stacks[i - 1], fc.stacks[i], fc.kwargs[f"{name}_absmax_scale"],
                                      fc.kwargs[f"{name}_absmax_offset"], blocksize, quant_type)
        kw_plain = {k: v for k, v in fc.kwargs.items() if "absmax_" not in k}
        assert torch.equal(mma, ops.experts_forward(case.hidden, case.index, case.weights, *plain, **kw_plain))


# The tensor-core GEMV's two ring depths (MOEQUANT_DECODE_MMA_STAGES: two stages a warp at three
# CTAs per SM, three at two) add the same products in the same order: bitwise equal, with and without
# LoRA, on input splits of 3 and 8 steps (H=768 and 2048). Without the switch a projection takes two
# stages where three CTAs per SM give the busiest CTA fewer row tiles than two do: qwen3-30b-a3b's
# sizes at T=1 on 132 SMs, gate_up two stages (48 tiles a pair, 8 pairs: one round instead of two),
# down three (64 tiles: two rounds either way).
@pytest.mark.parametrize("fmt", ["nf4", "nf4_dq"])
@pytest.mark.parametrize("H,I,T", [(768, 256, 3), (2048, 768, 1)])
@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
def test_decode_gemv_ring_depths(fmt, H, I, T, lora, env, monkeypatch):
    env("MOEQUANT_DECODE_MAX_PAIRS", "64")
    case = cuda_case(T=T, k=8, E=16, H=H, I=I, dtype=torch.bfloat16, bias=True, sentinels=T > 1,
                     lora=(lora, lora), rank=8, requires_grad=False, blocksize=64)
    fc = FormatCase(case, fmt.split("_")[0], fmt.endswith("_dq"))
    call = lambda: ops.experts_forward(*fc.args(), **fc.kwargs)  # noqa: E731
    outs, names = {}, {}
    for stages in ("2", "3", None):
        if stages is None:
            monkeypatch.delenv("MOEQUANT_DECODE_MMA_STAGES", raising=False)
        else:
            env("MOEQUANT_DECODE_MMA_STAGES", stages)
        names[stages] = cuda_kernel_names(lambda: outs.__setitem__(stages, call()))
    assert torch.equal(outs["2"], outs["3"]) and torch.equal(outs[None], outs["3"])
    assert rel_err(outs[None], dense_reference(fc, case.hidden, case.weights, case.kwargs)) < TOL[torch.bfloat16]
    if names[None] is None:
        return

    def depths(found, act_input):  # ring depths of the gate_up (act_input false) or down GEMVs that ran
        # gemv_kernel<in_t, kActInput, kAct, kDoubleQuant, kInt8, kMma, kStages>
        kernels = [re.search(r"gemv_kernel<[^,]+, (\w+), [^,]+, \w+, \w+, true, (\d+)>", n) for n in found]
        return {int(m.group(2)) for m in kernels if m and m.group(1) == act_input}

    for forced in ("2", "3"):
        assert depths(names[forced], "false") == depths(names[forced], "true") == {int(forced)}, names[forced]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pairs = T * 8  # one split of the input dimension (H, I <= 2048), 32 rows a tile

    def rounds(tiles, ctas_per_sm):  # row tiles of the busiest CTA of the persistent grid
        per_pair = min(max(ctas_per_sm * sms // pairs, 1), tiles)
        return -(-tiles // per_pair)

    def expected(tiles):
        return 2 if rounds(tiles, 3) < rounds(tiles, 2) else 3

    assert depths(names[None], "false") == {expected(2 * I // 32)}, names[None]
    assert depths(names[None], "true") == {expected(H // 32)}, names[None]
    if sms == 132 and (H, I, T) == (2048, 768, 1):  # H100 SXM / H200: the case the rule is for
        assert (expected(2 * I // 32), expected(H // 32)) == (2, 3)


@pytest.mark.parametrize("transposed", [False, True])
def test_int8_row_sliced_scratch(transposed, env):
    """int8 stacks through row slices of one expert (a scratch budget below one expert) and an
    intermediate size that is not a multiple of 8 (rows of 36 codes: chunks that straddle rows)."""
    env("MOEQUANT_EXPERTS_SCRATCH_BYTES", "8192")
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    case = cuda_case(T=30, H=256, I=36, E=4, k=2, dtype=torch.bfloat16, transposed=transposed, lora=(True, True),
                     rank=8, bias=True, requires_grad=False, blocksize=32)
    check_format_case(FormatCase(case, "int8", False), torch.bfloat16)


# int8 stacks through the fused kernels (not the scratch rung): output and every gradient against
# the dense reference. H=576, I=192 (E=6, top-2): every product qualifies, the [N, K] products walk
# 9 or 3 k-tiles and the [K, N] ones 6 or 9; 576 and 192 output features end in part-filled
# 128-feature tiles. Rows per expert: 1 (T=1), about 13, 33 and 100 (uniform T=40, 100, 300) and,
# skewed at T=300, two experts of 300 rows (two full 128-row tiles and a 44-row remainder) beside
# experts of a few rows or none: every row-tile height, full and part-filled.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
@pytest.mark.parametrize("T,routing", [(1, "uniform"), (40, "uniform"), (100, "uniform"), (300, "uniform"),
                                       (300, "skewed")])
def test_int8_fused_gemm(dtype, layout, lora, T, routing, env):
    env("MOEQUANT_DECODE_MAX_PAIRS", "0")
    env("MOEQUANT_EXPERTS_FUSED_GEMM", "1")
    case = cuda_case(T=T, H=576, I=192, E=6, k=2, dtype=dtype, transposed=layout == "transposed", bias=True,
                     lora=(lora, lora), rank=8, routing=routing, sentinels=T == 40, requires_grad=False)
    fc = FormatCase(case, "int8", False)
    names = cuda_kernel_names(lambda: check_format_case(fc, dtype))
    if names is not None and INT8_FUSED:
        assert not any("dequant_" in n for n in names), sorted(names)
        # [K, N] products (standard layout: the input gradients) on mma.sync; [N, K] on wgmma on Hopper
        assert any("nf4_gemm_kn_kernel" in n for n in names), sorted(names)
        nk = "nf4_gemm_nk_wgmma_kernel" if HOPPER else "nf4_gemm_nk_kernel"
        assert any(nk in n for n in names), sorted(names)
    first = ops._experts_forward_train(*fc.args(), **fc.kwargs)
    again = ops._experts_forward_train(*fc.args(), **fc.kwargs)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # deterministic


def unit_rows(T, H, dtype):
    """Token t = the unit vector e_j, j = 37 t mod H (distinct for t < H when gcd(37, H) = 1)."""
    cols = (37 * torch.arange(T)) % H
    x = torch.zeros(T, H, dtype=dtype)
    x[torch.arange(T), cols] = 1.0
    return x.cuda(), cols.cuda()


# int8 decoded by the fused kernels bit for bit as dequant_expert decodes it: with unit-vector tokens
# each row of the gate_up product is one decoded weight vector summed with exact zeros (1 * w is
# exact, and w is already in the compute dtype), so any slip in a fragment slot, the input-row
# permutation, a row scale or the decode's rounding shows as a mismatch. Plain layout: a column of
# the stored [2I, H] matrix (the [N, K] kernel); transposed: a row of the stored [H, 2I] matrix (the
# [K, N] kernel). H=576: 9 k-tiles; 2I=320 features: the last 128-feature tile is part-filled. The
# scratch rung (dequantize + cuBLAS) must pass it too.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize("rung", ["scratch", "fused"] + (["fused_mma"] if HOPPER else []))
@pytest.mark.parametrize("T", [5, 60, 300])
def test_int8_fused_gemm_decodes_exactly(dtype, layout, rung, T, env):
    for k, v in RUNGS[rung].items():
        env(k, v)
    H, I, E, k = 576, 160, 4, 2
    case = cuda_case(T=T, H=H, I=I, E=E, k=k, dtype=dtype, transposed=layout == "transposed", requires_grad=False)
    case.hidden, cols = unit_rows(T, H, dtype)
    fc = FormatCase(case, "int8", False)
    names = cuda_kernel_names(lambda: ops._experts_forward_train(*fc.args(), **fc.kwargs))
    _, h = ops._experts_forward_train(*fc.args(), **fc.kwargs)
    idx = case.index.long().flatten()
    order = torch.sort(idx, stable=True).indices  # routing order: by expert, then token slot
    experts, tokens = idx[order], order // k
    w = ops.dequant_expert(fc.stacks[0], fc.stacks[1], case.kwargs["blocksize"], dtype, None, "int8")
    want = w[experts, :, cols[tokens]] if layout == "plain" else w[experts, cols[tokens], :]
    assert h.shape == want.shape and h.dtype == dtype
    assert torch.equal(h, want), (h != want).nonzero()[:8].tolist()
    if names is not None and rung != "scratch" and INT8_FUSED:
        kernel = {("plain", True): "nf4_gemm_nk_wgmma_kernel", ("plain", False): "nf4_gemm_nk_kernel",
                  ("transposed", True): "nf4_gemm_kn_kernel", ("transposed", False): "nf4_gemm_kn_kernel"}
        assert any(kernel[layout, HOPPER and rung == "fused"] in n for n in names), sorted(names)


def test_int8_fused_gemm_switch_off():
    """MOEQUANT_INT8_FUSED_GEMM=0 keeps int8 stacks on the scratch rung. The kernels read it once per
    process, so test_formats' int8 cases on the forced-fused rungs run again in a fresh process with
    it set: there they must match the reference with every product dequantized to scratch and no
    fused kernel launched (test_formats checks the kernel names)."""
    env = dict(os.environ, MOEQUANT_INT8_FUSED_GEMM="0")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                        "-rs", "-k", "test_formats and int8 and fused"], cwd=os.path.dirname(tests_dir), env=env,
                       capture_output=True, text=True)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    summary = re.search(r"(\d+) passed", r.stdout)
    # 3 layouts x 2 LoRA settings on "fused", and on Hopper "fused_mma" too (skipped elsewhere)
    assert summary and int(summary.group(1)) == (12 if HOPPER else 6), tail


def test_format_mismatch_errors():
    case = cuda_case(T=4, k=2, E=4, requires_grad=False)
    fc = FormatCase(case, "int8", False)
    with pytest.raises(RuntimeError):  # int8 codes handed over as NF4
        ops.experts_forward(*fc.args(), **dict(fc.kwargs, quant_type="nf4"))
    fq = FormatCase(case, "nf4", True)
    kw = dict(fq.kwargs)
    del kw["down_absmax_scale"]
    with pytest.raises(RuntimeError, match="absmax"):
        ops.experts_forward(*fq.args(), **kw)


# ---- read-once switches, compared bit for bit -------------------------------------------------
# A switch read once per process (MOEQUANT_LOW_RANK_KERNEL, MOEQUANT_KN_DQ_SCALES,
# MOEQUANT_KN_PLAIN_SCALES, MOEQUANT_DECODE_DQ_BOUNDS) is compared by running the same saved cases in two fresh processes,
# the default and the switch set to "0": each saves its results and the kernels it launched whose
# names contain a filter (none are seen under compute-sanitizer, where the profiler sees nothing).
SWITCH_CHILD = r"""
import sys, torch
from torch.profiler import ProfilerActivity, profile
from moequant import ops
cases_path, out_path, mode, name_filter = sys.argv[1:5]
results, names, saw_kernels = [], set(), False
for case in torch.load(cases_path):
    args, kw = case["args"], case["kwargs"]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        if mode == "train":  # training forward + backward: output, gate_up_out and every gradient
            out, gate_up_out = ops._experts_forward_train(*args, **kw)
            results.append([out, gate_up_out, *ops.experts_backward(case["grad_out"], *args[:3], gate_up_out,
                                                                    *args[3:], **kw)])
        else:  # no-grad forward
            results.append([ops.experts_forward(*args, **kw)])
        torch.cuda.synchronize()
    keys = {e.key for e in prof.key_averages()}
    saw_kernels |= bool(keys)
    names |= {k for k in keys if name_filter in k}
torch.save({"results": results, "names": sorted(names), "saw_kernels": saw_kernels}, out_path)
"""


def run_switch_cases(tmp_path, cases, mode, name_filter, switch, value, **env_set):
    """SWITCH_CHILD on `cases` in a fresh process with `switch` unset (value None) or set, plus env_set."""
    cases_file = tmp_path / "cases.pt"
    if not cases_file.exists():
        torch.save(cases, cases_file)
    out_file = tmp_path / f"{switch}-{value}.pt"
    env = {k: v for k, v in os.environ.items() if k != switch}
    env.update(env_set)
    if value is not None:
        env[switch] = value
    r = subprocess.run([sys.executable, "-c", SWITCH_CHILD, str(cases_file), str(out_file), mode, name_filter],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out_file)


def assert_results_bitwise(new, old, num_cases, outputs):
    """Both processes' results equal bit for bit (16-bit tensors as int16), each case's first
    result (the output) non-zero."""
    assert len(new["results"]) == len(old["results"]) == num_cases
    for c, (got, want) in enumerate(zip(new["results"], old["results"])):
        assert len(got) == len(want) == outputs, c
        assert got[0].float().norm() > 0, c
        for i, (a, b) in enumerate(zip(got, want)):
            assert (a is None) == (b is None), (c, i)
            if a is None:
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, (c, i)
            bits = (lambda t: t.view(torch.int16)) if a.element_size() == 2 else (lambda t: t)
            assert torch.equal(bits(a), bits(b)), (c, i, (a.float() - b.float()).abs().max().item())


def ran(result, name):
    """Whether a kernel whose name contains `name` ran (True where the profiler saw no kernels)."""
    return not result["saw_kernels"] or any(name in n for n in result["names"])


def ran_not(result, name):
    return not result["saw_kernels"] or not any(name in n for n in result["names"])


# add_low_rank_rows' bf16/fp16 kernels: the streaming kernel (32 x 64 warp tiles of 16-byte
# vectors, the default) must give bitwise what add_low_rank_mma_kernel gives
# (MOEQUANT_LOW_RANK_KERNEL=0). Tiles of several experts (E=16, k=2: a few rows each), rows (T * k)
# not a multiple of 32, widths not a multiple of 64 (H=200, 2I=80, I=40), ranks 16/17 and 7/8
# (gate_up/down: the odd one loads factors element-wise), bf16 and fp16; and widths not a multiple
# of 8 (H=100, I=24: the old kernel in both processes).
def test_low_rank_stream_kernel_bitwise(tmp_path):
    shapes = [(50, 200, 40, 16), (301, 200, 40, 4), (40, 100, 24, 16)]
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        for rank in (16, 7):
            for T, H, I, E in shapes:
                case = cuda_case(T=T, H=H, I=I, E=E, k=2, dtype=dtype, lora=(True, True), rank=rank,
                                 sentinels=T == 301, blocksize=32 if H == 100 else 64, requires_grad=False)
                cases.append({"args": list(case.args()), "kwargs": case.kwargs,
                              "grad_out": torch.randn_like(case.hidden)})
    run = lambda value: run_switch_cases(tmp_path, cases, "train", "add_low_rank",  # noqa: E731
                                         "MOEQUANT_LOW_RANK_KERNEL", value)
    new, old = run(None), run("0")
    assert ran(new, "add_low_rank_stream_kernel"), new["names"]
    assert ran_not(old, "add_low_rank_stream_kernel") and ran(old, "add_low_rank_mma_kernel"), old["names"]
    assert_results_bitwise(new, old, len(cases), outputs=8)


# The [K, N] mma.sync kernel reads 4-bit block scales through registers (double quant: by default;
# plain: MOEQUANT_KN_PLAIN_SCALES=1, every tile height) or through its shared-memory stages
# (MOEQUANT_KN_DQ_SCALES=0 / MOEQUANT_KN_PLAIN_SCALES=0): both must give the same bits, with the fused kernels
# forced (MOEQUANT_KN_WGMMA=0: the [K, N] products on mma.sync), training forward + backward.
# H=320, I=192: 5 / 6 / 3 k-tiles, the 320- and 192-column products end in part-filled 128-column
# tiles; blocksizes 32 / 64 / 256; 1 to 100 rows per expert (T=3 over 8 experts; skewed routing
# puts about 100 on two experts).
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain"])
def test_kn_scales_in_registers_bitwise(tmp_path, double_quant):
    # (T, routing, blocksize, dtype, layout, quant_type, lora)
    specs = [(3, "uniform", 64, torch.bfloat16, "plain", "nf4", False),
             (60, "uniform", 32, torch.float16, "transposed", "nf4", False),
             (100, "skewed", 256, torch.bfloat16, "plain", "fp4", True),
             (200, "uniform", 64, torch.bfloat16, "transposed", "nf4", False),
             (100, "skewed", 64, torch.float16, "transposed", "fp4", False),
             (40, "uniform", 256, torch.bfloat16, "transposed", "nf4", True)]
    cases = []
    for T, routing, blocksize, dtype, layout, quant_type, lora in specs:
        case = cuda_case(T=T, H=320, I=192, E=8, k=2, dtype=dtype, transposed=layout == "transposed",
                         routing=routing, sentinels=T == 200, blocksize=blocksize, bias=True, lora=(lora, lora),
                         rank=8, requires_grad=False)
        fc = FormatCase(case, quant_type, double_quant)
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        assert fc.stacks[1].dtype == absmax_dtype and fc.stacks[3].dtype == absmax_dtype
        cases.append({"args": list(fc.args()), "kwargs": fc.kwargs, "grad_out": torch.randn_like(case.hidden)})
    switch = "MOEQUANT_KN_DQ_SCALES" if double_quant else "MOEQUANT_KN_PLAIN_SCALES"
    run = lambda value: run_switch_cases(tmp_path, cases, "train", "nf4_gemm_kn", switch,  # noqa: E731
                                         value, MOEQUANT_EXPERTS_FUSED_GEMM="1", MOEQUANT_DECODE_MAX_PAIRS="0",
                                         MOEQUANT_KN_WGMMA="0")
    new, old = run(None if double_quant else "1"), run("0")
    assert ran(new, "nf4_gemm_kn_regs_kernel") and ran_not(new, "nf4_gemm_kn_kernel"), new["names"]
    assert ran(old, "nf4_gemm_kn_kernel") and ran_not(old, "nf4_gemm_kn_regs_kernel"), old["names"]
    assert_results_bitwise(new, old, len(cases), outputs=8)
    for got in new["results"]:
        assert got[2].float().norm() > 0  # the gradient of hidden
    if not double_quant:  # plain stacks by default: registers for 16-row tiles only
        default = run(None)
        regs = [n for n in default["names"] if "nf4_gemm_kn_regs_kernel" in n]
        assert regs and tile_heights(regs) == {16}, default["names"]
        assert tile_heights([n for n in default["names"] if "nf4_gemm_kn_kernel" in n]) - {16}, default["names"]
        assert_results_bitwise(default, old, len(cases), outputs=8)


def test_kn_plain_scales_bad_switch():
    """A MOEQUANT_KN_PLAIN_SCALES value that is no height raises a clear error at the first [K, N] product."""
    code = ("import torch, sys; sys.path.insert(0, 'tests');"
            "from test_experts_cuda import cuda_case, check_case;"
            "case = cuda_case(T=40, H=256, I=128, E=4, k=2, dtype=torch.bfloat16);"
            "check_case(case, torch.bfloat16)")
    env = dict(os.environ, MOEQUANT_KN_PLAIN_SCALES="48", MOEQUANT_DECODE_MAX_PAIRS="0",
               MOEQUANT_EXPERTS_FUSED_GEMM="1", MOEQUANT_KN_WGMMA="0")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(tests_dir), env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0
    assert 'MOEQUANT_KN_PLAIN_SCALES must be 0, 1, 16, 32, 64 or 128, got "48"' in r.stderr, r.stderr[-3000:]


def decode_dq_switch(tmp_path, specs, switch):
    """No-grad decode cases of double-quantized bf16 stacks, one per (T, H, I, blocksize, quant_type,
    lora) spec, run by the FFMA GEMV (MOEQUANT_DECODE_MMA=0: the switches below are its own) in a
    process with `switch` unset and one with it "0"; both processes' results."""
    cases = []
    for T, H, I, blocksize, quant_type, lora in specs:
        case = cuda_case(T=T, k=4 if T < 2 else 2, E=8 if H < 1000 else 4, H=H, I=I, dtype=torch.bfloat16, bias=True,
                         lora=(lora, lora), rank=8, requires_grad=False, blocksize=blocksize)
        fc = FormatCase(case, quant_type, True)
        cases.append({"args": list(fc.args()), "kwargs": fc.kwargs})
    new, old = (run_switch_cases(tmp_path, cases, "decode", "gemv", switch, value, MOEQUANT_DECODE_MAX_PAIRS="64",
                                 MOEQUANT_DECODE_MMA="0") for value in (None, "0"))
    assert_results_bitwise(new, old, len(cases), outputs=1)
    return new, old


# The decode GEMV of double-quantized stacks runs gemv_dq_kernel on sm_90+ (bounded to three CTAs
# per SM) and gemv_kernel with MOEQUANT_DECODE_DQ_BOUNDS=0: the same body, so the same bits.
# No-grad decode cases: T=1, 2; the gate_up input split in two ranges (H = 32 * 130); LoRA.
def test_decode_double_quant_bounds_bitwise(tmp_path):
    new, old = decode_dq_switch(tmp_path, [(1, 128, 64, 64, "nf4", False), (2, 32 * 130, 32 * 67, 64, "fp4", False),
                                           (1, 256, 128, 64, "nf4", True)], "MOEQUANT_DECODE_DQ_BOUNDS")
    assert ran(new, "gemv_dq_kernel" if HOPPER else "gemv_kernel"), new["names"]
    assert ran(old, "gemv_kernel") and ran_not(old, "gemv_dq_kernel"), old["names"]


# gemv_dq_kernel's pair scales (lanes 2j and 2j + 1 decode two rows' block scales each and swap
# them) against each lane decoding all four (MOEQUANT_DECODE_PAIR_SCALES=0): the same bits.
# Blocks of 64, 128 and 256 weights; rows of an even number of units (H = 128, I = 192) and of an
# odd number (I = 32 * 67, whose down GEMV keeps per-lane scales), split inputs (H = 32 * 130),
# T = 1 and 3, LoRA.
def test_decode_pair_scales_bitwise(tmp_path):
    new, _ = decode_dq_switch(tmp_path, [(1, 128, 192, 64, "nf4", False), (3, 128, 192, 128, "fp4", True),
                                         (2, 32 * 130, 32 * 67, 64, "nf4", False), (1, 256, 128, 256, "nf4", False)],
                              "MOEQUANT_DECODE_PAIR_SCALES")
    assert ran(new, "gemv_dq_kernel" if HOPPER else "gemv_kernel"), new["names"]
