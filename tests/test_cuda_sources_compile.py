"""Compiles every CUDA source with nvcc where there is no CUDA build of torch (CI), so a compile
error shows before anything reaches a GPU. Objects only: nothing is linked or run."""

import glob
import os
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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.skipif(torch.version.cuda is not None, reason="CUDA torch: the real build compiles these")
def test_cuda_sources_compile(tmp_path):
    includes = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "cuda_stubs")] + cpp_extension.include_paths()
    flags = ["-std=c++20", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
             "-DMOEQUANT_WITH_CUDA", "-DMOEQUANT_HAS_SM90A", "-DTORCH_API_INCLUDE_EXTENSION_H"] + [f"-I{p}" for p in includes]

    def compile_one(src):
        out = tmp_path / (os.path.basename(src) + ".o")
        r = subprocess.run(["nvcc", *flags, "-c", src, "-o", str(out)], capture_output=True, text=True)
        return src, r.returncode, r.stderr[-3000:]

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES + BENCH_SOURCES))
    failures = [f"{src}:\n{err}" for src, rc, err in results if rc != 0]
    assert not failures, "\n\n".join(failures)
    # The CUDA registrations compile too (plain C++ that names the CUDA kernels).
    reg = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", "-DMOEQUANT_WITH_CUDA",
                          *[f"-I{p}" for p in includes], os.path.join(ROOT, "ops", "register_cuda.cpp")],
                         capture_output=True, text=True)
    assert reg.returncode == 0, reg.stderr[-3000:]
    assert len(CUDA_SOURCES) >= 2 and BENCH_SOURCES
