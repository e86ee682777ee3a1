"""The no-grad decode path of experts_forward (the fused GEMV, T*k <= 64) makes no device->host copy
and no host sync, in every format and with LoRA: it captures in a CUDA graph (with and without
programmatic dependent launches), replays bitwise like eager, runs under
torch.compile(mode="reduce-overhead"), matches the routed path (LoRA kernels included, on shapes
with tails in every loop), and still fails loudly on a negative expert id (a device-side assert,
checked in a subprocess because it ends the CUDA context)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moequant
from test_experts_cuda import cuda_kernel_names

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Qwen3-MoE-like, scaled down: top-8 of 16 experts, gated SiLU, I = H / 2. T=8 gives 64 pairs, the
# largest problem the GEMV takes by default.
H, I, E, K = 256, 128, 16, 8
FORMATS = {  # name -> (quant_type, double_quant)
    "nf4": ("nf4", False),
    "nf4_dq": ("nf4", True),
    "fp4": ("fp4", False),
    "fp4_dq": ("fp4", True),
    "int8": ("int8", False),
}


def make_stacks(fmt):
    quant_type, double_quant = FORMATS[fmt]
    g = torch.Generator().manual_seed(7)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    return tuple(moequant.quantize(w.cuda(), quant_type, 64, double_quant) for w in (gate_up, down))


def routed_inputs(T, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    logits = torch.randn(T, E, device="cuda", generator=g)
    weights, index = torch.softmax(logits, dim=-1).topk(K, dim=-1)
    return hidden, index, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)


def decode_call(gate_up, down, **kwargs):
    def call(hidden, index, weights):
        return moequant.experts_forward(hidden, index, weights, gate_up, down, **kwargs)

    return call


def lora_factors(rank=16, dtype=torch.bfloat16, seed=3):
    """LoRA kwargs of the typed wrapper for both projections, B non-zero."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale: (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)  # noqa: E731
    return dict(gate_up_lora=(rnd(E, rank, H, scale=H**-0.5), rnd(E, 2 * I, rank, scale=0.1), 2.0),
                down_lora=(rnd(E, rank, I, scale=I**-0.5), rnd(E, H, rank, scale=0.1), 0.5))


@pytest.fixture(autouse=True)
def default_decode_threshold(monkeypatch):
    monkeypatch.delenv("MOEQUANT_DECODE_MAX_PAIRS", raising=False)  # the GEMV takes T*k <= 64
    monkeypatch.delenv("MOEQUANT_DECODE_PDL", raising=False)  # programmatic dependent launches on sm_90+


def capture_call(call, static):
    """A CUDA graph of call(*static) after two warm-up calls on a side stream, and its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs advises
        for _ in range(2):
            call(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(*static)
    return graph, out


@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "no_pdl"])
@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.no_grad()
def test_capture_and_replay_bitwise(fmt, T, lora, pdl, monkeypatch):
    monkeypatch.setenv("MOEQUANT_DECODE_PDL", pdl)  # read at each call: the captured launches use it
    call = decode_call(*make_stacks(fmt), **(lora_factors() if lora else {}))
    static = [t.clone() for t in routed_inputs(T, seed=0)]
    graph, static_out = capture_call(call, static)
    for seed in (1, 2, 3):
        new_inputs = routed_inputs(T, seed)
        for dst, src in zip(static, new_inputs):
            dst.copy_(src)
        graph.replay()
        eager = call(*new_inputs)
        assert static_out.abs().sum() > 0
        assert torch.equal(static_out, eager), (fmt, T, seed, (static_out.float() - eager.float()).abs().max().item())


@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.no_grad()
def test_decode_call_does_not_sync(fmt, lora):
    call = decode_call(*make_stacks(fmt), **(lora_factors() if lora else {}))
    inputs = routed_inputs(8, seed=0)
    call(*inputs)  # first call: kernel attributes and occupancy queries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for T in (1, 8):
            call(*routed_inputs(T, seed=T))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The check itself works: a host read of a device value raises in this mode.
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            inputs[1].max().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
@torch.no_grad()
def test_compile_reduce_overhead_matches_eager(lora):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    call = decode_call(*make_stacks("nf4_dq"), **(lora_factors() if lora else {}))
    compiled = torch.compile(call, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # cudagraph trees record on the second or third call, then replay
        inputs = routed_inputs(1, seed)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*inputs).clone()
        assert torch.equal(out, call(*inputs)), seed
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


# LoRA in the decode path (u = A[e] x per pair in a kernel beside each GEMV; scaling * B[e] u added
# by lora_b_kernel to h for gate_up, to y for down) against the routed path on the same stacks
# (MOEQUANT_DECODE_MAX_PAIRS=0).
@pytest.mark.parametrize("which", ["both", "gate_up", "down"])
@pytest.mark.parametrize("activation,interleaved,bias", [("silu", False, False), ("gelu", False, True),
                                                          ("gelu_tanh", False, False), ("swiglu_oai", True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.no_grad()
def test_lora_decode_matches_routed_path(fmt, dtype, activation, interleaved, bias, which, monkeypatch):
    gate_up, down = make_stacks(fmt)
    g = torch.Generator().manual_seed(5)
    kwargs = dict(activation=activation, interleaved=interleaved, **lora_factors(dtype=dtype))
    if which != "both":
        kwargs.pop("down_lora" if which == "gate_up" else "gate_up_lora")
    if bias:
        kwargs["gate_up_bias"] = (torch.randn(E, 2 * I, generator=g) * 0.1).to("cuda", dtype)
        kwargs["down_bias"] = (torch.randn(E, H, generator=g) * 0.1).to("cuda", dtype)
    call = decode_call(gate_up, down, **kwargs)
    for T in (1, 3, 8):
        hidden, index, weights = routed_inputs(T, seed=T)
        hidden, weights = hidden.to(dtype), weights.to(dtype)
        index[0, -1] = E  # an expert-parallel sentinel slot: contributes zero
        decode = call(hidden, index, weights)
        monkeypatch.setenv("MOEQUANT_DECODE_MAX_PAIRS", "0")
        routed = call(hidden, index, weights)
        monkeypatch.delenv("MOEQUANT_DECODE_MAX_PAIRS")
        no_lora = moequant.experts_forward(hidden, index, weights, gate_up, down, activation=activation,
                                           interleaved=interleaved, gate_up_bias=kwargs.get("gate_up_bias"),
                                           down_bias=kwargs.get("down_bias"))
        err = ((decode.double() - routed.double()).norm() / routed.double().norm()).item()
        lora_size = ((routed.double() - no_lora.double()).norm() / routed.double().norm()).item()
        assert lora_size > 0.05, lora_size  # the LoRA term is a visible part of the output
        assert err < (2e-4 if dtype == torch.float32 else 2e-2), (T, err)


@pytest.mark.parametrize("weights_dtype", [torch.float16, torch.bfloat16, torch.float64])
@torch.no_grad()
def test_decode_reads_routing_weights_in_their_dtype(weights_dtype):
    """The combine reads the routing weights in their own dtype (no cast kernel): the same output as
    float32 weights of the same values, and as the routed path within rounding."""
    call = decode_call(*make_stacks("nf4"))
    for T in (1, 8):
        hidden, index, weights = routed_inputs(T, seed=T)
        weights = weights.to(weights_dtype)
        out = call(hidden, index, weights)
        assert out.abs().sum() > 0
        assert torch.equal(out, call(hidden, index, weights.float())), T
        strided = torch.empty(T, 2 * K, dtype=weights_dtype, device="cuda")[:, ::2]  # not contiguous
        strided.copy_(weights)
        assert torch.equal(out, call(hidden, index, strided)), T


# Programmatic dependent launches (each kernel of the chain starts while its predecessor drains and
# waits before reading its results) change no value: bitwise equal to plain stream-ordered launches,
# eager and replayed, with sentinel slots (whose CTAs exit early, after the wait).
@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.no_grad()
def test_dependent_launches_match_plain_launches(fmt, lora, monkeypatch):
    call = decode_call(*make_stacks(fmt), **(lora_factors() if lora else {}))
    for T in (1, 3, 8):
        hidden, index, weights = routed_inputs(T, seed=10 + T)
        index[0, 0] = E + 3
        monkeypatch.setenv("MOEQUANT_DECODE_PDL", "0")
        plain = call(hidden, index, weights)
        monkeypatch.setenv("MOEQUANT_DECODE_PDL", "1")
        outs = [call(hidden, index, weights) for _ in range(4)]  # back to back: launches overlap
        assert plain.abs().sum() > 0
        for out in outs:
            assert torch.equal(out, plain), (fmt, T)


# Calls far past the default threshold (T=64 with it raised: 512 pairs on 16 experts, each expert
# read by about 32 of them: a grid 512 pairs deep) and a sentinel slot: the GEMV is repeatable
# bitwise and matches the routed path, in every format, with and without LoRA.
@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.no_grad()
def test_many_pairs_match_routed_path(fmt, lora, monkeypatch):
    call = decode_call(*make_stacks(fmt), **(lora_factors() if lora else {}))
    for T in (2, 64):
        hidden, index, weights = routed_inputs(T, seed=20 + T)
        index[0, 1] = E + 1  # a sentinel slot
        monkeypatch.setenv("MOEQUANT_DECODE_MAX_PAIRS", "1024")
        decode = [call(hidden, index, weights) for _ in range(2)]
        monkeypatch.setenv("MOEQUANT_DECODE_MAX_PAIRS", "0")  # the routed path
        routed = call(hidden, index, weights)
        assert torch.equal(decode[0], decode[1])
        err = ((decode[0].double() - routed.double()).norm() / routed.double().norm()).item()
        assert routed.abs().sum() > 0
        assert err < 2e-2, (fmt, T, err)


# Past the threshold (T=16: 128 pairs), an eager call takes the routed path, which synchronizes;
# while a graph is being captured the GEMV takes the call instead, so batch decoding captures too,
# and its replays equal the GEMV's eager result bitwise.
@pytest.mark.parametrize("fmt", ["nf4_dq", "int8"])
@torch.no_grad()
def test_capture_past_the_threshold_takes_the_gemv(fmt, monkeypatch):
    call = decode_call(*make_stacks(fmt), **lora_factors())
    static = [t.clone() for t in routed_inputs(16, seed=0)]
    graph, static_out = capture_call(call, static)
    for seed in (1, 2):
        for dst, src in zip(static, routed_inputs(16, seed)):
            dst.copy_(src)
        graph.replay()
        monkeypatch.setenv("MOEQUANT_DECODE_MAX_PAIRS", "1024")  # the GEMV, eagerly
        gemv = call(*static)
        monkeypatch.delenv("MOEQUANT_DECODE_MAX_PAIRS")
        routed = call(*static)
        assert static_out.abs().sum() > 0
        assert torch.equal(static_out, gemv), (fmt, seed)
        assert ((gemv.double() - routed.double()).norm() / routed.double().norm()).item() < 2e-2


# A call that must take the routed path (here: with gradients) fails with a clear error inside a
# capture, raised before it launches anything the capture cannot hold.
def test_routed_path_refuses_capture_clearly():
    gate_up, down = make_stacks("nf4")
    hidden, index, weights = routed_inputs(2, seed=0)
    hidden.requires_grad_(True)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph: it takes the routed path"):
        with torch.cuda.graph(graph):
            moequant.experts_forward(hidden, index, weights, gate_up, down)
    out = moequant.experts_forward(hidden, index, weights, gate_up, down)  # the stream still works
    out.sum().backward()
    assert hidden.grad.abs().sum() > 0


def assert_decode_matches_routed(call, inputs, no_lora_call, tol, monkeypatch):
    """decode == routed within `tol` (relative Frobenius), and the LoRA term is visible in the output."""
    decode = call(*inputs)
    monkeypatch.setenv("MOEQUANT_DECODE_MAX_PAIRS", "0")
    routed = call(*inputs)
    monkeypatch.delenv("MOEQUANT_DECODE_MAX_PAIRS")
    assert torch.isfinite(decode).all()
    err = ((decode.double() - routed.double()).norm() / routed.double().norm()).item()
    lora_size = ((routed.double() - no_lora_call(*inputs).double()).norm() / routed.double().norm()).item()
    assert lora_size > 0.05, lora_size
    assert err < tol, err


# Shapes where every loop of the decode LoRA has a tail: H = 4160 is 3 GEMV splits of the gate_up
# input (64 + 64 + 2 units), 5 chunks of its A product (4 x 1024 + 64) and 17 row blocks of down's B
# product (16 x 256 + 64 rows); I = 2112 is 2 splits of the down input (64 + 2), 3 chunks and 17 row
# blocks of gate_up's B product (4224 rows); rank 40 is five rank rows a warp in the A product, rank
# 5 leaves three of its eight warps idle (and is fewer than the B product's prefetched elements);
# slot 1 of token 0 is a sentinel.
@pytest.mark.parametrize("rank", [5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.no_grad()
def test_lora_decode_matches_routed_path_with_tails(fmt, dtype, rank, monkeypatch):
    h, i, e, k = 4160, 2112, 4, 2
    quant_type, double_quant = FORMATS[fmt]
    g = torch.Generator(device="cuda").manual_seed(11)
    rnd = lambda *shape, scale: torch.randn(*shape, generator=g, device="cuda") * scale  # noqa: E731
    gate_up = moequant.quantize(rnd(e, 2 * i, h, scale=h**-0.5), quant_type, 64, double_quant)
    down = moequant.quantize(rnd(e, h, i, scale=i**-0.5), quant_type, 64, double_quant)
    biases = dict(gate_up_bias=rnd(e, 2 * i, scale=0.1).to(dtype), down_bias=rnd(e, h, scale=0.1).to(dtype))
    lora = dict(gate_up_lora=(rnd(e, rank, h, scale=h**-0.5).to(dtype), rnd(e, 2 * i, rank, scale=0.3).to(dtype), 2.0),
                down_lora=(rnd(e, rank, i, scale=i**-0.5).to(dtype), rnd(e, h, rank, scale=0.3).to(dtype), 0.5))
    call = decode_call(gate_up, down, **biases, **lora)
    no_lora_call = decode_call(gate_up, down, **biases)
    for T in (1, 5):
        hidden = rnd(T, h, scale=1.0).to(dtype)
        index = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(T)])
        index[0, 1] = e
        weights = torch.softmax(rnd(T, k, scale=1.0), dim=-1).to(dtype)
        assert_decode_matches_routed(call, (hidden, index, weights), no_lora_call,
                                     2e-4 if dtype == torch.float32 else 2e-2, monkeypatch)


# The B product stages u in shared memory 1024 ranks at a time: a rank of 1100 takes two chunks.
@torch.no_grad()
def test_lora_decode_rank_beyond_one_staged_chunk(monkeypatch):
    gate_up, down = make_stacks("nf4")
    call = decode_call(gate_up, down, **lora_factors(rank=1100))
    inputs = routed_inputs(2, seed=4)
    names = cuda_kernel_names(lambda: call(*inputs))
    if names is not None:  # CUPTI is there (not under compute-sanitizer): the decode kernels served the call
        assert any("lora_b_kernel" in n for n in names), sorted(names)
    assert_decode_matches_routed(call, inputs, decode_call(gate_up, down), 2e-2, monkeypatch)


NEGATIVE_ID_SCRIPT = textwrap.dedent(
    """
    import torch, moequant
    H, I, E = 256, 128, 16
    gate_up = moequant.quantize(torch.randn(E, 2 * I, H, device="cuda") / 16, "nf4", 64, True)
    down = moequant.quantize(torch.randn(E, H, I, device="cuda") / 12, "nf4", 64, True)
    hidden = torch.randn(4, H, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, E, (4, 8), device="cuda")
    index[2, 3] = -1
    weights = torch.full((4, 8), 0.125, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = moequant.experts_forward(hidden, index, weights, gate_up, down)
    torch.cuda.synchronize()
    print("NO ERROR", out.float().abs().sum().item())
    """
)


def test_negative_expert_id_asserts_on_device():
    env = dict(os.environ)
    env.pop("MOEQUANT_DECODE_MAX_PAIRS", None)
    env.pop("CUDA_LAUNCH_BLOCKING", None)
    r = subprocess.run([sys.executable, "-c", NEGATIVE_ID_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    output = r.stdout + r.stderr
    assert r.returncode != 0, output[-3000:]
    assert "NO ERROR" not in output
    assert "device-side assert" in output, output[-3000:]
    assert "negative expert id" in output, output[-3000:]


@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
@pytest.mark.parametrize("pdl", ["1", "chain"])
@torch.no_grad()
def test_first_kernel_reads_routing_written_just_before(pdl, lora, monkeypatch):
    """On sm_90+ the call's first kernel is a programmatic dependent launch of the stream's previous
    kernel: it must read the routing that kernel writes, however late. Here the expert ids are the
    last elements of a 512 MB elementwise result (written about last, into the block the previous
    iteration's ids occupied), and each call must equal a call with plain launches."""
    gate_up, down = make_stacks("nf4")
    call = decode_call(gate_up, down, **(lora_factors() if lora else {}))
    T = 8
    hidden, _, weights = routed_inputs(T, seed=0)
    positions = torch.arange(1 << 26, device="cuda")
    for shift in range(6):
        monkeypatch.setenv("MOEQUANT_DECODE_PDL", pdl)
        index = torch.remainder(positions + 5 * shift, E)[-T * K:].view(T, K)
        out = call(hidden, index, weights)
        monkeypatch.setenv("MOEQUANT_DECODE_PDL", "0")
        torch.cuda.synchronize()
        expected = call(hidden, index.clone(), weights)
        assert torch.equal(out, expected), (pdl, lora, shift)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fmt", ["nf4", "fp4_dq"])
@torch.no_grad()
def test_half_pair_table_within_fp16_rounding_of_codes(fmt, dtype, monkeypatch):
    """MOEQUANT_DECODE_HALF_TABLE=1: on 16-bit inputs the 4-bit GEMV decodes through half2 table
    entries (codes rounded to fp16): within that rounding of the float2 table's result, far below
    the input dtype's own. The table is the FFMA path's (MOEQUANT_DECODE_MMA=0: gate_up's rows of
    256 weights would run on tensor cores)."""
    monkeypatch.setenv("MOEQUANT_DECODE_MMA", "0")
    call = decode_call(*make_stacks(fmt))
    for T in (1, 8):
        hidden, index, weights = routed_inputs(T, seed=20 + T)
        hidden = hidden.to(dtype)
        wide = call(hidden, index, weights)
        monkeypatch.setenv("MOEQUANT_DECODE_HALF_TABLE", "1")
        half = call(hidden, index, weights)
        monkeypatch.delenv("MOEQUANT_DECODE_HALF_TABLE")
        err = ((half.double() - wide.double()).norm() / wide.double().norm()).item()
        assert wide.abs().sum() > 0
        assert err < 2e-3, (fmt, T, err)
