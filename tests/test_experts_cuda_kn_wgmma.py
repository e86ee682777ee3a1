"""The fused 4-bit GEMM's [K, N] products on Hopper wgmma: the input gradient of the standard
layout and the forward of the transposed one. MOEQUANT_KN_WGMMA picks the row-tile heights that
run there (unset: 128-row tiles; 1: every height; 0: none, all on the mma.sync kernel). The switch
is read once per process, so test_kn_wgmma_in_subprocess runs this file again in a fresh process
per setting (with 1 once more with MOEQUANT_WGMMA_FP32_EPILOGUE=1, the [N, K] kernel's opt-in
epilogue); there the checks below compare output and every gradient with the dequantized reference
for each format, with and without LoRA, plain / transposed / interleaved layouts, and expert row
counts of 0, 1, not a multiple of the row tile, and more than one tile, and check from the kernel
names which row tiles ran on which kernel."""

import os
import re
import subprocess
import sys

import pytest
import torch

from experts_cases import rel_err
from test_experts_cuda import (DTYPE_IDS, FORMATS, HOPPER, TOL, FormatCase, check_case, check_format_case,
                               cuda_case, cuda_kernel_names)
from moequant import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SWITCH = "MOEQUANT_KN_WGMMA"
CHILD = "MOEQUANT_TEST_KN_WGMMA_CHILD"  # set in the subprocess that runs the checks
IN_SUBPROCESS = os.environ.get(CHILD) == "1"
# The shortest row tile on the wgmma kernel under this process's switch (unset: 128).
MIN_WGMMA_HEIGHT = int(os.environ.get(SWITCH) or 128)
TILE_HEIGHTS = (16, 32, 64, 128)


def tile_heights(counts):
    """Row-tile heights of the decode-once plan (csrc/experts_tile_plan.cpp) for these rows per
    expert: 128-row tiles, and the rest of each expert in the shortest height that holds it."""
    heights = set()
    for c in counts:
        if c >= 128:
            heights.add(128)
        if c % 128:
            heights.add(next(h for h in TILE_HEIGHTS if h >= c % 128))
    return heights


def ran_kn_wgmma(names, counts, quantized_4bit=True):
    """The [K, N] products ran on the wgmma kernel (Hopper) for the row tiles of at least
    MIN_WGMMA_HEIGHT rows and on the mma.sync kernel for the others (every tile off Hopper and for
    int8 stacks). counts: rows per expert."""
    if names is None:  # no profiler (e.g. under compute-sanitizer): the numeric checks still ran
        return True
    kn_wgmma = any("nf4_gemm_kn_wgmma" in n for n in names)
    # the mma.sync [K, N] kernel under either name (scales through registers: nf4_gemm_kn_regs_kernel)
    kn_mma = any("nf4_gemm_kn_kernel" in n or "nf4_gemm_kn_regs_kernel" in n for n in names)
    heights = tile_heights(counts)
    on_wgmma = HOPPER and quantized_4bit and MIN_WGMMA_HEIGHT > 0
    want_wgmma = on_wgmma and any(h >= MIN_WGMMA_HEIGHT for h in heights)
    want_mma = any(not on_wgmma or h < MIN_WGMMA_HEIGHT for h in heights)
    return kn_wgmma == want_wgmma and kn_mma == want_mma


def routed(case, T, counts):
    """Replaces the case's routing (top-2, distinct experts per token) so that expert e gets
    counts[e] rows: every token goes to the last expert, plus one of the others."""
    E = len(counts)
    assert counts[-1] == T and sum(counts[:-1]) == T, counts
    other = torch.cat([torch.full((c,), e, dtype=torch.int64) for e, c in enumerate(counts[:-1])])
    index = torch.stack([other, torch.full((T,), E - 1, dtype=torch.int64)], dim=1)
    case.index = index.to(case.index.device)
    return case


# Row counts per expert (E=5, top-2): 0, 1, 37 (not a multiple of any tile), T - 38 and T. At
# T=300 (mean 150 rows per active expert) the full tiles are 128 rows: the last expert gets two full
# tiles and a 44-row remainder, so tiles of 128, 64 and 16 all run; at T=40 (mean 20) full tiles
# are 32 rows with remainders in 16-row tiles. H=576: the input gradient of down walks 9 k-tiles
# (the ring wraps) and 576 output features end in a half-full 128-feature tile; I=192 likewise.
ROW_COUNTS = {40: [0, 1, 37, 2, 40], 300: [0, 1, 37, 262, 300]}


if IN_SUBPROCESS:

    @pytest.fixture
    def env(monkeypatch):
        monkeypatch.setenv("MOEQUANT_DECODE_MAX_PAIRS", "0")  # the grouped path at any T
        monkeypatch.setenv("MOEQUANT_EXPERTS_FUSED_GEMM", "1")  # the fused kernel at any rows per expert
        return monkeypatch.setenv

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
    @pytest.mark.parametrize("layout", ["plain", "transposed"])
    @pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
    @pytest.mark.parametrize("T", sorted(ROW_COUNTS))
    def test_kn_wgmma_row_counts(dtype, layout, lora, T, env):
        case = cuda_case(T=T, H=576, I=192, E=5, k=2, dtype=dtype, transposed=layout == "transposed", bias=True,
                         lora=(lora, lora), rank=8)
        case = routed(case, T, ROW_COUNTS[T])
        names = cuda_kernel_names(lambda: check_case(case, dtype))
        assert ran_kn_wgmma(names, ROW_COUNTS[T]), sorted(names)
        det = [a.detach() for a in case.args()]
        kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in case.kwargs.items()}

        def forward_backward():
            out, gate_up_out = ops._experts_forward_train(*det, **kw)
            return out, ops.experts_backward(torch.ones_like(out), *det[:3], gate_up_out, *det[3:], **kw)

        first, again = forward_backward(), forward_backward()
        assert torch.equal(first[0], again[0])
        for a, b in zip(first[1], again[1]):
            assert torch.equal(a, b)  # deterministic

    # Each format (NF4 plain and double-quantized, FP4 plain and double-quantized, int8), each
    # layout, with and without LoRA: output and every gradient against the dense reference.
    @pytest.mark.parametrize("fmt", ["nf4"] + list(FORMATS))
    @pytest.mark.parametrize("layout", ["plain", "transposed", "interleaved", "transposed_interleaved"])
    @pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
    def test_kn_wgmma_formats(fmt, layout, lora, env):
        quant_type, double_quant = ("nf4", False) if fmt == "nf4" else FORMATS[fmt]
        interleaved = "interleaved" in layout
        case = cuda_case(T=300, H=576, I=192, E=5, k=2, dtype=torch.bfloat16, transposed="transposed" in layout,
                         interleaved=interleaved, activation="swiglu_oai" if interleaved else "silu", bias=True,
                         lora=(lora, lora), rank=8, requires_grad=False)
        case = routed(case, 300, ROW_COUNTS[300])
        fc = FormatCase(case, quant_type, double_quant)
        names = cuda_kernel_names(lambda: check_format_case(fc, torch.bfloat16))
        assert ran_kn_wgmma(names, ROW_COUNTS[300], quantized_4bit=fmt != "int8"), sorted(names)

    # Block sizes 32 (a 32-feature chunk is a whole block) and 256 (four chunks share one), at the
    # 16- and 64-row tiles; agreement with the scratch rung (dequantize + cuBLAS) on the same weights.
    @pytest.mark.parametrize("blocksize", [32, 256])
    @pytest.mark.parametrize("T", [10, 100])
    def test_kn_wgmma_blocksizes_vs_scratch(blocksize, T, env):
        case = cuda_case(T=T, H=256, I=128, E=3, k=2, dtype=torch.bfloat16, blocksize=blocksize, requires_grad=False)
        det = [a.detach() for a in case.args()]
        kw = dict(case.kwargs)

        def forward_backward():
            out, gate_up_out = ops._experts_forward_train(*det, **kw)
            return out, ops.experts_backward(torch.ones_like(out), *det[:3], gate_up_out, *det[3:], **kw)[0]

        names = cuda_kernel_names(forward_backward)
        assert ran_kn_wgmma(names, torch.bincount(case.index.flatten().long(), minlength=3).tolist()), sorted(names)
        out_w, dx_w = forward_backward()
        env("MOEQUANT_EXPERTS_FUSED_GEMM", "0")
        out_s, dx_s = forward_backward()
        assert rel_err(out_w, out_s) < TOL[torch.bfloat16] / 4, rel_err(out_w, out_s)
        assert rel_err(dx_w, dx_s) < TOL[torch.bfloat16] / 4, rel_err(dx_w, dx_s)

else:

    # (switch, fp32_epilogue): the default (128-row tiles on wgmma), every height on wgmma, and
    # every height with MOEQUANT_WGMMA_FP32_EPILOGUE=1, the [N, K] kernel's unserialized epilogue
    # (the forward of the standard layout, the input gradient of the transposed one), opt-in.
    @pytest.mark.parametrize("switch,fp32_epilogue", [(None, "0"), ("1", "0"), ("1", "1")],
                             ids=["default", "all_heights", "all_heights_fp32_epilogue"])
    def test_kn_wgmma_in_subprocess(switch, fp32_epilogue):
        """Runs this file's checks in a fresh process with the switches set (they are read once per
        process) and requires every one of them to pass (none skipped)."""
        env = {k: v for k, v in os.environ.items() if k != SWITCH}
        env.update({CHILD: "1", "MOEQUANT_WGMMA_FP32_EPILOGUE": fp32_epilogue})
        if switch is not None:
            env[SWITCH] = switch
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                            "-rs"], cwd=os.path.dirname(tests_dir), env=env, capture_output=True, text=True)
        tail = r.stdout[-6000:] + r.stderr[-2000:]
        assert r.returncode == 0, tail
        summary = re.search(r"(\d+) passed", r.stdout)
        assert summary and int(summary.group(1)) == 16 + 40 + 4, tail
        assert "skipped" not in r.stdout.splitlines()[-1], tail

    # Auto dispatch (MOEQUANT_EXPERTS_FUSED_GEMM unset): the [K, N] products take the fused kernel
    # up to 256 mean rows per active expert where their 128-row tiles run on wgmma, else up to 128;
    # above that, dequant scratch + grouped GEMM. Token t goes to experts 2t mod 4 and 2t + 1 mod
    # 4: every expert gets exactly T / 2 = mean_rows rows.
    @pytest.mark.parametrize("mean_rows", [200, 300])
    def test_kn_fused_row_bound(mean_rows, monkeypatch):
        monkeypatch.delenv("MOEQUANT_EXPERTS_FUSED_GEMM", raising=False)
        monkeypatch.setenv("MOEQUANT_DECODE_MAX_PAIRS", "0")
        E, k, T = 4, 2, 2 * mean_rows
        case = cuda_case(T=T, H=256, I=128, E=E, k=k, dtype=torch.bfloat16, requires_grad=False)
        t = torch.arange(T)
        case.index = torch.stack([2 * t % E, (2 * t + 1) % E], dim=1).to(case.index.device)
        det = [a.detach() for a in case.args()]
        assert torch.bincount(case.index.flatten().cpu(), minlength=E).tolist() == [mean_rows] * E

        def forward_backward():
            out, gate_up_out = ops._experts_forward_train(*det, **case.kwargs)
            return ops.experts_backward(torch.ones_like(out), *det[:3], gate_up_out, *det[3:], **case.kwargs)

        names = cuda_kernel_names(forward_backward)
        if names is None:
            return  # no profiler (compute-sanitizer): nothing to tell the paths apart by
        kn_fused = any("nf4_gemm_kn" in n for n in names)
        bound = 256 if HOPPER and MIN_WGMMA_HEIGHT > 0 else 128
        assert kn_fused == (mean_rows <= bound), sorted(names)

    def test_kn_wgmma_bad_switch():
        """A value that names no row-tile height raises a clear error at the first [K, N] product."""
        code = ("import torch, sys; sys.path.insert(0, 'tests');"
                "from test_experts_cuda import cuda_case, check_case;"
                "case = cuda_case(T=40, H=256, I=128, E=4, k=2, dtype=torch.bfloat16);"
                "check_case(case, torch.bfloat16)")
        env = dict(os.environ, **{SWITCH: "48", "MOEQUANT_DECODE_MAX_PAIRS": "0",
                                  "MOEQUANT_EXPERTS_FUSED_GEMM": "1"})
        env.pop(CHILD, None)
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(tests_dir), env=env,
                           capture_output=True, text=True)
        assert r.returncode != 0
        assert "MOEQUANT_KN_WGMMA must be 0, 1 or a row-tile height (16, 32, 64, 128); got '48'" in r.stderr, \
            r.stderr[-3000:]
