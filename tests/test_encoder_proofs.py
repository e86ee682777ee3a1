"""The CUDA quantize kernels encode with table and rounding tricks instead of the CPU kernels' compares;
these host programs prove each trick equal to the reference encoder for every fp32 input in range
(exhaustive, ~2.1e9 values each), so the proof runs on every CI machine, GPU or not."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROOFS = ["nf4_encode_lut_check.cpp", "fp4_encode_lut_check.cpp", "int8_encode_check.cpp"]


@pytest.mark.parametrize("source", PROOFS)
def test_cuda_encoder_equals_reference_on_every_input(source, tmp_path):
    if shutil.which("g++") is None:
        pytest.fail("g++ is required for the encoder proofs")
    binary = str(tmp_path / source.removesuffix(".cpp"))
    build = subprocess.run(["g++", "-O2", "-std=c++20", "-fopenmp", "-I", os.path.join(ROOT, "csrc"),
                            os.path.join(ROOT, "tests", "cpp", source), "-o", binary], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([binary], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mismatches" in run.stdout and "FAIL" not in run.stdout, run.stdout
