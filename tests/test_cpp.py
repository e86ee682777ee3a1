"""Builds and runs the GoogleTest suite in tests/cpp (LibTorch from the installed torch)."""

import os
import shutil
import subprocess

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "cpp")
BUILD = os.path.join(SRC, "build")


@pytest.mark.skipif(os.environ.get("MOEQUANT_SKIP_CPP_TESTS") == "1", reason="MOEQUANT_SKIP_CPP_TESTS=1")
def test_googletest_suite():
    if shutil.which("cmake") is None:
        pytest.fail("cmake is required for the C++ tests (apt-get install cmake)")
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    configure = ["cmake", "-S", SRC, "-B", BUILD, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for cmd in (configure, ["cmake", "--build", BUILD, "-j", jobs]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    r = subprocess.run([os.path.join(BUILD, "moequant_cpp_tests")], capture_output=True, text=True)
    print(r.stdout[-3000:])
    assert r.returncode == 0, f"GoogleTest failures:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    assert "[  PASSED  ]" in r.stdout
