"""Build moequant._C: the torch.ops.moequant operators (CPU always; CUDA when a CUDA toolkit and a
CUDA build of torch are both present, or MOEQUANT_FORCE_CUDA=1 to compile the CUDA sources even
without a GPU torch, e.g. in CI to catch compile errors early)."""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# transformers releases the integration is tested on: the pinned one (tests/requirements.txt) and
# the newest (tests/run_newest_transformers.sh). Flags of a newer release that change the experts
# math are refused at quantization time rather than ignored.
SUPPORTED_TRANSFORMERS = "transformers>=5.20,<5.26"


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    if os.environ.get("MOEQUANT_FORCE_CPU") == "1":
        return False
    if os.environ.get("MOEQUANT_FORCE_CUDA") == "1":
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


with_cuda = want_cuda()
sources = rel("ops/*.cpp") + rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
if with_cuda:
    sources += rel("csrc/cuda/*.cu")
else:
    sources.remove(os.path.join("ops", "register_cuda.cpp"))

debug = os.environ.get("MOEQUANT_DEBUG") == "1"
# -ffp-contract=off: no fused multiply-add contraction (builds with -march=native would otherwise
# fuse the decode's a * b + c and break bit-exactness with bitsandbytes).
cxx_flags = ["-O3" if not debug else "-O0", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
extra_compile_args = {"cxx": cxx_flags}
define_macros = [("Py_LIMITED_API", "0x030A0000")]
if with_cuda:
    define_macros.append(("MOEQUANT_WITH_CUDA", None))
    # sm_90a for Hopper-only instructions, sm_80/sm_86 for Ampere, PTX for newer chips.
    # No --use_fast_math: NF4 encode/decode must be bit-exact with the CPU kernels.
    archs = os.environ.get("MOEQUANT_CUDA_ARCHS", "80;86;90a").split(";")
    if "90a" in archs:  # the wgmma kernels exist in this build (host code checks before launching)
        define_macros.append(("MOEQUANT_HAS_SM90A", None))
    gencode = []
    for a in archs:
        gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    last = archs[-1].rstrip("a")
    gencode += [f"-gencode=arch=compute_{last},code=compute_{last}"]
    extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + gencode

Extension = CUDAExtension if with_cuda else CppExtension
print(f"moequant: building moequant._C with {'CUDA' if with_cuda else 'CPU only'} kernels")

setup(
    name="moequant",
    version="0.1.0",
    description="NF4-quantized Mixture-of-Experts experts for LoRA/QLoRA fine-tuning (PyTorch custom ops)",
    packages=find_packages(include=["moequant", "moequant.*"]),
    ext_modules=[
        Extension(
            name="moequant._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.9"],
    extras_require={"transformers": [SUPPORTED_TRANSFORMERS]},
)
