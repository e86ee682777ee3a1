"""The no-grad decode path of experts_forward (the fused GEMV, T*k <= 64) makes no device->host copy
and no host sync, in every format: it captures in a CUDA graph, replays bitwise like eager, runs
under torch.compile(mode="reduce-overhead"), and still fails loudly on a negative expert id (a
device-side assert, checked in a subprocess because it ends the CUDA context)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moequant

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


def decode_call(gate_up, down):
    def call(hidden, index, weights):
        return moequant.experts_forward(hidden, index, weights, gate_up, down)

    return call


@pytest.fixture(autouse=True)
def default_decode_threshold(monkeypatch):
    monkeypatch.delenv("MOEQUANT_DECODE_MAX_PAIRS", raising=False)  # the GEMV takes T*k <= 64


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.no_grad()
def test_capture_and_replay_bitwise(fmt, T):
    call = decode_call(*make_stacks(fmt))
    static = [t.clone() for t in routed_inputs(T, seed=0)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs advises
        for _ in range(2):
            call(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call(*static)
    for seed in (1, 2, 3):
        new_inputs = routed_inputs(T, seed)
        for dst, src in zip(static, new_inputs):
            dst.copy_(src)
        graph.replay()
        eager = call(*new_inputs)
        assert static_out.abs().sum() > 0
        assert torch.equal(static_out, eager), (fmt, T, seed, (static_out.float() - eager.float()).abs().max().item())


@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.no_grad()
def test_decode_call_does_not_sync(fmt):
    call = decode_call(*make_stacks(fmt))
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


@torch.no_grad()
def test_compile_reduce_overhead_matches_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    call = decode_call(*make_stacks("nf4_dq"))
    compiled = torch.compile(call, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # cudagraph trees record on the second or third call, then replay
        inputs = routed_inputs(1, seed)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*inputs).clone()
        assert torch.equal(out, call(*inputs)), seed
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


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
