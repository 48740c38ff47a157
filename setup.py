"""Builds vsr_kernels._C: the C++ CPU kernels always, the CUDA kernels where PyTorch has CUDA.

CUDA is built when the installed PyTorch has CUDA or FORCE_CUDA=1, for the architectures in
TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    with_cuda = torch.version.cuda is not None or os.environ.get("FORCE_CUDA", "0") == "1"
    sources = ["csrc/registration.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if not with_cuda:
        return CppExtension("vsr_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += _sources("csrc/cuda_glue/*.cpp") + _sources("csrc/cuda/*.cu")
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
    return CUDAExtension("vsr_kernels._C", sources, define_macros=[("VSR_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                         extra_link_args=["-fopenmp"])


setup(
    name="vsr_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for video super-resolution networks",
    packages=find_packages(include=["vsr_kernels", "vsr_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton"]},
)
