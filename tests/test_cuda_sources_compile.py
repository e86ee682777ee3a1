"""Compiles every CUDA source with nvcc where there is no CUDA build of torch (CI), so a compile
error shows before anything reaches a GPU. Objects only: nothing is linked or run. The decode
GEMV's kernels are also held to what ptxas reports for them (spills, registers): their register
counts sit near the budget that fits three CTAs per SM, and ptxas moves them with unrelated code."""

import glob
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# Standalone CUDA benchmarks (no torch), compiled with the same flags.
BENCH_SOURCES = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.cu")))
DECODE_GEMV = os.path.join(ROOT, "csrc", "cuda", "experts_decode_gemv.cu")
# Three CTAs of 256 threads per SM: at most 80 registers a thread (65536 / 768, in steps of 8).
THREE_CTAS_REGISTERS = 80


def ptxas_kernels(stderr):
    """{demangled kernel: (registers, spill store bytes, spill load bytes)} from `ptxas -v` output."""
    found, name, spills = {}, None, (0, 0)
    for line in stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name, spills = m.group(1), (0, 0)
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spills = (int(m.group(1)), int(m.group(2)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            found[name] = (int(m.group(1)), *spills)
            name = None
    mangled = list(found)
    names = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    return {n: found[m] for m, n in zip(mangled, names)}


def gemv_template_flags(name):
    """The bool template arguments of a decode GEMV kernel, in order (kActInput, kDoubleQuant, ...)."""
    args = name[name.index("<") + 1:name.index(">(")]
    return [a.strip() == "true" for a in args.split(",") if a.strip() in ("true", "false")]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.skipif(torch.version.cuda is not None, reason="CUDA torch: the real build compiles these")
def test_cuda_sources_compile(tmp_path):
    includes = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "cuda_stubs")] + cpp_extension.include_paths()
    # The extension's nvcc flags (setup.py, torch's cpp_extension), for sm_90a.
    flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-gencode=arch=compute_90a,code=sm_90a",
             "-DMOEQUANT_WITH_CUDA", "-DMOEQUANT_HAS_SM90A", "-DTORCH_API_INCLUDE_EXTENSION_H",
             *cpp_extension.COMMON_NVCC_FLAGS] + [f"-I{p}" for p in includes]

    def compile_one(src):
        out = tmp_path / (os.path.basename(src) + ".o")
        verbose = ["-Xptxas", "-v"] if src == DECODE_GEMV else []
        r = subprocess.run(["nvcc", *flags, *verbose, "-c", src, "-o", str(out)], capture_output=True, text=True)
        return src, r.returncode, r.stderr

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES + BENCH_SOURCES))
    failures = [f"{src}:\n{err[-3000:]}" for src, rc, err in results if rc != 0]
    assert not failures, "\n\n".join(failures)
    # The decode GEMV: no kernel spills, and the plain 4-bit FFMA kernel (gemv_kernel without
    # double quant or int8) keeps the registers of three CTAs per SM, as gemv_dq_kernel's bound does.
    kernels = ptxas_kernels(next(err for src, _, err in results if src == DECODE_GEMV))
    gemv = {n: v for n, v in kernels.items() if "gemv_kernel<" in n}
    assert gemv and any("gemv_dq_kernel<" in n for n in kernels), sorted(kernels)[:5]
    spilling = {n: v for n, v in kernels.items() if v[1] or v[2]}
    assert not spilling, spilling
    plain = {n: v[0] for n, v in gemv.items() if gemv_template_flags(n)[1:3] == [False, False]}
    assert plain and max(plain.values()) <= THREE_CTAS_REGISTERS, plain
    # The tensor-core GEMV with two-stage rings (gemv_kernel<..., kMma = true, 2>) is chosen for three
    # CTAs per SM, without a launch bound (one made ptxas spill): its registers must fit that budget
    # unbounded, for every format and activation.
    shallow = {n: v[0] for n, v in kernels.items() if re.search(r"gemv_kernel<.*, true, 2>\(", n)}
    assert shallow and max(shallow.values()) <= THREE_CTAS_REGISTERS, shallow
    assert any(re.search(r"gemv_kernel<.*, true, 3>\(", n) for n in kernels), sorted(kernels)[:5]
    # The CUDA registrations compile too (plain C++ that names the CUDA kernels).
    reg = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", "-DMOEQUANT_WITH_CUDA",
                          *[f"-I{p}" for p in includes], os.path.join(ROOT, "ops", "register_cuda.cpp")],
                         capture_output=True, text=True)
    assert reg.returncode == 0, reg.stderr[-3000:]
    assert len(CUDA_SOURCES) >= 2 and BENCH_SOURCES
