"""The GPU code builds for real targets, without a GPU (see DESIGN.md, "Verification without a
GPU"), for every op:

- every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90, and no kernel spills;
- every csrc/cuda_glue/*.cpp (built only where PyTorch has CUDA) type-checks against the
  PyTorch and CUDA headers;
- every Triton op module (vsr_kernels/triton/*.py not starting with "_") compiles each launch
  configuration it lists, for sm_80 and sm_90 in every dtype, with
  `triton.compile(ASTSource(...), target=GPUTarget(...))`: this catches what the interpreter
  forgives (dtypes, shapes, register spills, shared memory). The kernels must be real
  JITFunctions, so the compilation runs in a subprocess without TRITON_INTERPRET, whatever
  this test session uses.
"""
import importlib
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import check_gpu_build  # noqa: E402  (tools/ is not a package)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
MAX_SHARED_SM80 = 163 * 1024  # the least opt-in shared memory per block of the two targets


def _relative(path):
    return str(path.relative_to(check_gpu_build.ROOT))


CUDA_CASES = [(_relative(source), arch)
              for source in check_gpu_build.CUDA_SOURCES for arch in check_gpu_build.ARCHES]
GLUE_SOURCES = [_relative(source) for source in check_gpu_build.CUDA_GLUE_SOURCES]
TRITON_MODULES = list(check_gpu_build.TRITON_MODULES)


# ---------------------------------------------------------------------------------------
# CUDA kernels and their torch glue.

@pytest.fixture(scope="module")
def cuda_reports():
    if check_gpu_build.find_nvcc() is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin: "
                    "the CUDA sources cannot be compiled here")
    return check_gpu_build.compile_cuda_sources()


def test_there_are_gpu_sources():
    assert CUDA_CASES, "no csrc/cuda/*.cu found"
    assert GLUE_SOURCES, "no csrc/cuda_glue/*.cpp found"
    assert TRITON_MODULES, "no Triton op module found"


@pytest.mark.parametrize("source, arch", CUDA_CASES)
def test_cuda_compiles_without_spills(cuda_reports, source, arch):
    kernels = cuda_reports[source, arch]
    assert kernels, f"ptxas reported no kernel for {source} on sm_{arch}"
    spilled = [k for k in kernels if k.spills]
    assert not spilled, f"kernels of {source} spill on sm_{arch}: {spilled}"


def _needs_cuda_headers():
    if check_gpu_build.find_cuda_include() is None:
        pytest.skip("no CUDA toolkit headers to check the CUDA glue against")


@pytest.mark.parametrize("glue", GLUE_SOURCES)
def test_torch_glue_compiles(glue):
    """The glue is built only where PyTorch has CUDA; this type-checks it everywhere."""
    _needs_cuda_headers()
    check_gpu_build.check_cuda_glue(check_gpu_build.ROOT / glue)


@pytest.mark.parametrize("glue", GLUE_SOURCES)
def test_torch_glue_check_sees_errors(tmp_path, glue):
    # Every glue checks its launches with check_launch: a misspelt call must fail the check.
    text = (check_gpu_build.ROOT / glue).read_text()
    assert "check_launch(" in text, f"{glue} never calls check_launch"
    broken = tmp_path / Path(glue).name
    broken.write_text(text.replace("check_launch(", "check_launhc(", 1))
    _needs_cuda_headers()
    with pytest.raises(check_gpu_build.CompileError, match="check_launhc"):
        check_gpu_build.check_cuda_glue(broken, include_from=(check_gpu_build.ROOT / glue).parent)


def test_ptxas_report_is_parsed():
    # The log format of CUDA 13's ptxas, with spills: the check above must see them.
    log = ("ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z6kernelPf\n"
           "    24 bytes stack frame, 28 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 48 registers, used 0 barriers, 596 bytes cmem[0]\n")
    [kernel] = check_gpu_build.parse_ptxas(log)
    assert (kernel.registers, kernel.stack_frame, kernel.spill_stores, kernel.spill_loads) == (48, 24, 28, 40)
    assert kernel.spills


# ---------------------------------------------------------------------------------------
# Triton kernels: every op module exposes KERNELS, all_launch_configs() and compile_all().

_TRITON_REPORTS = {}


def triton_reports(module):
    """compile_all's reports of `module`, compiled once per session."""
    if module not in _TRITON_REPORTS:
        _TRITON_REPORTS[module] = check_gpu_build.compile_triton_module(module)
    return _TRITON_REPORTS[module]


@needs_triton
@pytest.mark.parametrize("module", TRITON_MODULES)
def test_every_triton_launch_config_compiles_without_spills(module):
    reports = triton_reports(module)
    triton_module = importlib.import_module(module)
    print(f"\n{module}\n{'kernel':<44} {'constexprs':<58} {'dtype':<9} arch regs spills shared mma pointers")
    for r in reports:
        pointers = " ".join(f"{name}={kind}" for name, kind in sorted(r.get("pointers", {}).items()))
        mma = ",".join(i.split(".")[0] for i in r.get("mma", [])) or "-"
        print(f"{r['kernel']:<44} {str(r['constexprs']):<58} {r['dtype']:<9} {r['arch']:>4} {r['n_regs']:>4} "
              f"{r['n_spills']:>6} {r['shared']:>6} {mma} {pointers}")
    compiled = {(r["kernel"], tuple(sorted(r["constexprs"].items())), r["dtype"], r["arch"]) for r in reports}
    # A module may launch some configs in fewer dtypes (config_dtype_names(config)).
    dtypes_of = getattr(triton_module, "config_dtype_names", lambda config: check_gpu_build.TRITON_DTYPES)
    expected = {(triton_module.KERNELS[c.kernel].__name__, c.constexprs, dtype, arch)
                for c in triton_module.all_launch_configs()
                for dtype in check_gpu_build.TRITON_DTYPES if dtype in dtypes_of(c)
                for arch in check_gpu_build.TRITON_ARCHS}
    assert compiled == expected
    assert [r for r in reports if r["n_spills"] > 0 or r["shared"] > MAX_SHARED_SM80] == []


@needs_triton
def test_local_argmax_attention_tiles_run_on_tensor_cores():
    """The tile forward's scores are tensor-core products: mma.sync on sm_80, wgmma on sm_90, in
    every dtype the dispatcher tiles (float32 as tf32); the direct forward uses none."""
    reports = triton_reports("vsr_kernels.triton.local_argmax_attention")
    tiles = [r for r in reports if r["kernel"] == "local_argmax_attention_tile_forward_kernel"]
    assert {r["dtype"] for r in tiles} == {"float16", "bfloat16", "float32"}
    for r in tiles:
        expected = {"float16": "f16", "bfloat16": "bf16", "float32": "tf32"}[r["dtype"]]
        instruction = "wgmma.mma_async" if r["arch"] == 90 else "mma.sync"
        assert any(i.startswith(instruction) and f".{expected}." in i + "." for i in r["mma"]), r
    direct = [r for r in reports if r["kernel"] == "local_argmax_attention_forward_kernel"]
    assert direct and not any(r["mma"] for r in direct)


def test_tensor_core_instructions_are_found_in_ptx():
    pytest.importorskip("triton")
    from vsr_kernels.triton import _compile

    ptx = ("    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1, %r2}, {%r3}, {%r4};\n"
           "    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r5}, %rd1, %rd2;\n"
           "    fma.rn.f32 %f1, %f2, %f3, %f4;\n")
    assert _compile.tensor_core_instructions(ptx) == ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                                                      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"]
    assert _compile.tensor_core_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == []


def test_spills_are_seen_in_stack_and_local_memory():
    pytest.importorskip("triton")
    from vsr_kernels.triton import _compile

    # Triton 3.6's ptxas reports a spilling kernel as STACK, 3.9's as LOCAL: both must count.
    parse = _compile.parse_resource_usage
    assert parse("Function f:REG:32 STACK:4176 SHARED:0 LOCAL:0 TEXTURE:0") == (32, 4176)
    assert parse("Function f:REG:255 STACK:0 SHARED:0 LOCAL:48 TEXTURE:0") == (255, 48)
    assert parse("Function f:REG:64 STACK:0 SHARED:0 LOCAL:0 TEXTURE:0") == (64, 0)


# What each op launches depends on its arguments, so this check drives one op with inputs of
# its own: per op, not generic.

@needs_triton
def test_local_argmax_attention_launches_only_listed_configs(monkeypatch):
    """Records what the ops would launch (without launching) over many channel counts, kernel
    sizes and dtypes, with and without tf32 tiles and forced formulations."""
    triton_module = importlib.import_module("vsr_kernels.triton.local_argmax_attention")
    launched = set()
    monkeypatch.setattr(triton_module, "launch", lambda config, grid, *args, dtype: launched.add(config))
    for allow_tf32, forced, dtype, kernel_size in itertools.product(
            (False, True), (None, "direct", "tile"), (torch.float32, torch.bfloat16, torch.float16), (3, 9)):
        monkeypatch.setattr(triton_module, "allow_tf32", allow_tf32)
        monkeypatch.setattr(triton_module, "forced_formulation", forced)
        for C, Cv in [(1, 1), (3, 17), (16, 33), (31, 64), (64, 65), (65, 200), (129, 2)]:
            q = torch.zeros(1, C, 2, 2, dtype=dtype)
            k, v = torch.zeros(1, 2, C, 2, 2, dtype=dtype), torch.zeros(1, 2, Cv, 2, 2, dtype=dtype)
            out, score, index = triton_module.local_argmax_attention(q, k, v, kernel_size, 1, 1.0, False)
            backward = torch.ops.vsr_kernels.local_argmax_attention_triton_backward
            backward(out, score, q, k, v, score, index, kernel_size, 1, 1.0, False)
    assert launched <= set(triton_module.all_launch_configs())
    assert {c.kernel for c in launched} == set(triton_module.KERNELS)
