"""Every Triton kernel configuration the dispatcher can launch, compiled for sm_80 and sm_90
in every dtype with `triton.compile(ASTSource(...), target=GPUTarget(...))`: no GPU needed.

This catches what the interpreter forgives (dtypes, shapes, register spills). The kernels
must be real JITFunctions, so the compilation runs in a subprocess without
TRITON_INTERPRET, whatever this test session uses.
"""
import pytest
import torch

pytest.importorskip("triton")

from vsr_kernels.triton import _compile  # noqa: E402
from vsr_kernels.triton import local_argmax_attention as triton_module  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_SHARED_SM80 = 163 * 1024  # the least opt-in shared memory per block of the two targets


@pytest.fixture(scope="module")
def reports():
    return _compile.call_without_interpreter(triton_module.__name__, "compile_all", ARCHS, DTYPES)


def test_every_launch_config_compiles_without_spills(reports):
    print(f"\n{'kernel':<20} {'constexprs':<58} {'dtype':<9} {'weight':<6} arch regs spills shared")
    for r in reports:
        print(f"{r['kernel']:<20} {str(r['constexprs']):<58} {r['dtype']:<9} "
              f"{r['pointers'].get('weight_ptr', ''):<6} {r['arch']:>4} {r['n_regs']:>4} {r['n_spills']:>6} "
              f"{r['shared']:>6}")
    compiled = {(r["kernel"], tuple(sorted(r["constexprs"].items())), r["dtype"], r["arch"]) for r in reports}
    expected = {(triton_module.KERNELS[c.kernel].__name__, c.constexprs, dtype, arch)
                for c in triton_module.all_launch_configs() for dtype in DTYPES for arch in ARCHS}
    assert compiled == expected
    assert [r for r in reports if r["n_spills"] > 0 or r["shared"] > MAX_SHARED_SM80] == []


def test_the_ops_launch_only_listed_configs(monkeypatch):
    """Records what the ops would launch (without launching) over many channel counts."""
    launched = set()
    monkeypatch.setattr(triton_module, "launch", lambda config, grid, *args, dtype: launched.add(config))
    for C, Cv in [(1, 1), (3, 17), (16, 33), (31, 64), (64, 65), (65, 200), (129, 2)]:
        q = torch.zeros(1, C, 2, 2)
        k, v = torch.zeros(1, 2, C, 2, 2), torch.zeros(1, 2, Cv, 2, 2)
        out, score, index = triton_module.local_argmax_attention(q, k, v, 3, 1, 1.0, False)
        backward = torch.ops.vsr_kernels.local_argmax_attention_triton_backward
        backward(out, score, q, k, v, score, index, 3, 1, 1.0, False)
    assert launched <= set(triton_module.all_launch_configs())
    assert {c.kernel for c in launched} == set(triton_module.KERNELS)


def test_spills_are_seen_in_stack_and_local_memory():
    # Triton 3.6's ptxas reports a spilling kernel as STACK, 3.9's as LOCAL: both must count.
    assert _compile.parse_resource_usage("Function f:REG:32 STACK:4176 SHARED:0 LOCAL:0 TEXTURE:0") == (32, 4176)
    assert _compile.parse_resource_usage("Function f:REG:255 STACK:0 SHARED:0 LOCAL:48 TEXTURE:0") == (255, 48)
    assert _compile.parse_resource_usage("Function f:REG:64 STACK:0 SHARED:0 LOCAL:0 TEXTURE:0") == (64, 0)
