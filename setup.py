"""Builds vsr_kernels._C: the C++ CPU kernels always, the CUDA kernels where they can be built.

Package metadata lives in pyproject.toml; this file adds what depends on the build machine:
the extension module, the runtime torch requirement and vsr_kernels/_build_info.py.

CUDA (csrc/cuda/*.cu and their torch glue) is built when all of these hold:
  - the torch being built against is a CUDA build (torch.version.cuda is set);
  - a CUDA toolkit is found where torch looks for it (CUDA_HOME / CUDA_PATH, else the directory
    two levels above the `nvcc` on PATH, else /usr/local/cuda) with bin/nvcc and
    include/cuda_runtime.h;
  - that toolkit's major version equals torch's CUDA major version (torch refuses a mismatch).
VSR_KERNELS_CUDA=0 turns CUDA off; VSR_KERNELS_CUDA=1 requires it (the build fails, saying which
condition is missing); unset (or "auto") builds it exactly when the conditions hold.
Architectures: TORCH_CUDA_ARCH_LIST (default "8.0;9.0").

The C++ standard is not set here: torch.utils.cpp_extension.BuildExtension adds the one the
torch being built against requires, to both the C++ compiler and nvcc, when the extension sets
none. torch 2.13 and 2.14 pass -std=c++20 (the default moved from c++17 to c++20 in
pytorch/pytorch#176659), and torch 2.14's headers `#error` under C++17 (checked here with
`g++ -std=c++17 -fsyntax-only` on <torch/extension.h>); older torch passes -std=c++17. A
hard-coded -std would win over torch's choice and break one side or the other.
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "vsr_kernels"
BUILD_INFO = "_build_info.py"
# The oldest torch whose torch.library API (register_fake, register_autograd, opcheck) the
# package uses: what an sdist (built anywhere, against any torch) asks for.
SDIST_TORCH_REQUIREMENT = "torch>=2.4"


def _sources(*patterns):
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(ROOT, pattern))
    return sorted(os.path.relpath(path, ROOT) for path in found)


def _nvcc_major(nvcc):
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"`{nvcc} --version` failed ({error})"
    match = re.search(r"release (\d+)\.(\d+)", text)
    if match is None:
        return None, f"`{nvcc} --version` printed no release number"
    return int(match.group(1)), None


def _cuda_missing():
    """Why CUDA cannot be built here: a list of reasons, empty when it can."""
    if torch.version.cuda is None:  # torch then does not even look for a toolkit (CUDA_HOME is None)
        return [f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"]
    reasons = []
    home = cpp_extension.CUDA_HOME
    if not home:
        return ["no CUDA toolkit found (set CUDA_HOME to the toolkit's directory)"]
    nvcc = os.path.join(home, "bin", "nvcc")
    header = os.path.join(home, "include", "cuda_runtime.h")
    if not os.access(nvcc, os.X_OK):
        reasons.append(f"CUDA_HOME={home} has no bin/nvcc (set CUDA_HOME to the toolkit's directory)")
    if not os.path.isfile(header):
        reasons.append(f"CUDA_HOME={home} has no include/cuda_runtime.h "
                       "(set CUDA_HOME to the toolkit's directory)")
    if not reasons:
        major, problem = _nvcc_major(nvcc)
        if problem:
            reasons.append(problem)
        elif str(major) != torch.version.cuda.split(".")[0]:
            reasons.append(f"nvcc in {home} is CUDA {major}, torch {torch.__version__} was built "
                           f"with CUDA {torch.version.cuda}: the major versions must match")
    return reasons


def _with_cuda():
    setting = os.environ.get("VSR_KERNELS_CUDA", "auto").strip().lower() or "auto"
    if setting not in ("0", "1", "auto"):
        sys.exit(f"vsr_kernels: VSR_KERNELS_CUDA must be 0, 1 or auto, not {setting!r}")
    if setting == "0":
        return False
    reasons = _cuda_missing()
    if reasons and setting == "1":
        sys.exit("vsr_kernels: VSR_KERNELS_CUDA=1 but the CUDA kernels cannot be built:\n  - "
                 + "\n  - ".join(reasons)
                 + "\nInstall a CUDA build of torch and a matching CUDA toolkit, build with "
                   "`pip install --no-build-isolation .`, or set VSR_KERNELS_CUDA=0.")
    if reasons:
        if torch.version.cuda is not None:  # a CUDA torch without a usable toolkit: say why
            print("vsr_kernels: building the CPU kernels only: " + "; ".join(reasons), file=sys.stderr)
        return False
    return True


WITH_CUDA = _with_cuda()


def _extension():
    sources = _sources("csrc/registration.cpp", "csrc/cpu/*.cpp")
    # -g0: the interpreter's CFLAGS (which setuptools passes first) may carry -g; debug info for
    # the per-ISA, per-dtype kernel instantiations made the build ~1.6x slower (deform_kernel_conv2d's
    # launchers, then one file: 184 -> 117 s on one core) and its object 6x larger.
    cxx_flags = ["-O3", "-g0"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP in torch's Linux builds: without -fopenmp it runs serially.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not WITH_CUDA:
        return cpp_extension.CppExtension(f"{PACKAGE}._C", sources, extra_compile_args={"cxx": cxx_flags},
                                          extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # csrc/cuda_glue/*.cpp is the torch glue of each op's CUDA launchers.
    sources += _sources("csrc/cuda/*.cu", "csrc/cuda_glue/*.cpp")
    return cpp_extension.CUDAExtension(f"{PACKAGE}._C", sources, define_macros=[("VSR_WITH_CUDA", None)],
                                       extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
                                       extra_link_args=link_flags)


def _build_info_text():
    return ("# Written by setup.py when vsr_kernels._C was built; not tracked by git.\n"
            "# vsr_kernels._extension compares it with the torch that imports the package.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CUDA = {WITH_CUDA!r}\n")


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension that also writes vsr_kernels/_build_info.py next to _C: into the
    build tree (so wheels carry it) and, for in-place and editable builds, into the source tree."""

    def run(self):
        super().run()
        text = _build_info_text()
        targets = {os.path.dirname(os.path.abspath(self.get_ext_fullpath(f"{PACKAGE}._C")))}
        if self.inplace or getattr(self, "editable_mode", False):
            targets.add(os.path.join(ROOT, PACKAGE))
        for directory in sorted(targets):
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, BUILD_INFO), "w") as file:
                file.write(text)


def _torch_requirement():
    # An sdist is built against nothing: it asks for any torch the code supports. Everything
    # else (wheel, install, editable, develop) holds a _C compiled against this torch, whose
    # C++ ABI changes with every release: require that release.
    if "sdist" in sys.argv[1:]:
        return SDIST_TORCH_REQUIREMENT
    return f"torch=={torch.__version__.split('+')[0]}"


setup(
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[_torch_requirement()],
)
