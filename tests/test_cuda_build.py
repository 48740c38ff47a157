"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90, and no kernel spills.

Runs without a GPU: only nvcc is needed (see DESIGN.md, "Verification without a GPU").
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import check_gpu_build  # noqa: E402  (tools/ is not a package)

CASES = [(str(source.relative_to(check_gpu_build.ROOT)), arch)
         for source in check_gpu_build.CUDA_SOURCES for arch in check_gpu_build.ARCHES]


@pytest.fixture(scope="module")
def reports():
    if check_gpu_build.find_nvcc() is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin: "
                    "the CUDA sources cannot be compiled here")
    return check_gpu_build.compile_cuda_sources()


def test_there_are_cuda_sources():
    assert CASES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("source, arch", CASES)
def test_compiles_without_spills(reports, source, arch):
    kernels = reports[source, arch]
    assert kernels, f"ptxas reported no kernel for {source} on sm_{arch}"
    spilled = [k for k in kernels if k.spills]
    assert not spilled, f"kernels of {source} spill on sm_{arch}: {spilled}"


def test_torch_glue_compiles():
    """csrc/cuda_ops.cpp is built only where PyTorch has CUDA; this type-checks it everywhere."""
    if check_gpu_build.find_cuda_include() is None:
        pytest.skip("no CUDA toolkit headers to check csrc/cuda_ops.cpp against")
    check_gpu_build.check_cuda_glue()


def test_torch_glue_check_sees_errors(tmp_path):
    broken = tmp_path / "broken_glue.cpp"
    broken.write_text(check_gpu_build.CUDA_GLUE.read_text().replace("check_launch(", "check_launhc(", 1))
    if check_gpu_build.find_cuda_include() is None:
        pytest.skip("no CUDA toolkit headers")
    with pytest.raises(check_gpu_build.CompileError, match="check_launhc"):
        check_gpu_build.check_cuda_glue(broken)


def test_ptxas_report_is_parsed():
    # The log format of CUDA 13's ptxas, with spills: the check above must see them.
    log = ("ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z6kernelPf\n"
           "    24 bytes stack frame, 28 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 48 registers, used 0 barriers, 596 bytes cmem[0]\n")
    [kernel] = check_gpu_build.parse_ptxas(log)
    assert (kernel.registers, kernel.stack_frame, kernel.spill_stores, kernel.spill_loads) == (48, 24, 28, 40)
    assert kernel.spills
