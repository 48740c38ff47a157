"""flow_guided_window_attention on every backend, through the shared harness (tests/_harness.py).

Backends: "reference", "cpu" (C++), "triton" (the interpreter on CPU tensors without a GPU,
real kernels on CUDA tensors) and "cuda" (GPU only), each skipped with the reason when this
installation cannot run it. The reference itself is checked against a per-pixel loop in
tests/test_flow_guided_window_attention_reference.py, whose input generators this file reuses.

- every backend against the float64 reference (out and all five gradients) on the fixed
  sweep (28 shapes: flow outside the frame, exactly integer, half-integer, zero, huge and
  non-finite flow; w = 1..5; several heads; biases None or given; H or W = 1), plain and with
  canary inputs (views into NaN-filled buffers), and on a seeded random sweep;
- gradcheck of all five differentiable inputs, opcheck of every registered op pair,
  torch.compile(fullgraph=True), the layout sweep, NaN flow, batch 0, bad inputs, size
  mismatches in both directions through the public function and the registered ops, low
  precision, autocast, and determinism (bitwise, across runs and thread counts) of a backward
  where many pixels read the same key positions.
"""
import math
import random

import pytest
import torch

import vsr_kernels
from vsr_kernels import reference

import _harness as H
from test_flow_guided_window_attention_reference import SHAPES, make_flow
from test_flow_guided_window_attention_reference import make_inputs as reference_inputs

OP = "flow_guided_window_attention"
BACKENDS = H.backend_params(OP)
KERNEL_BACKENDS = H.backend_params(OP, ("cpu", "triton", "cuda"))
AVAILABLE = {b.name for b in H.available_backends(OP)}
needs_cpu_kernels = pytest.mark.skipif("cpu" not in AVAILABLE, reason=f"backend='cpu': {H.unavailable(OP, 'cpu')}")
needs_cuda = pytest.mark.skipif(not H.HAS_CUDA, reason="needs a CUDA device")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

INPUT_NAMES = ("query", "key", "value", "key_bias", "value_bias")
OUTPUT_NAMES = ("out", "grad_query", "grad_key", "grad_value", "grad_key_bias", "grad_value_bias")
FLOAT64 = dict(rtol=1e-10, atol=1e-10)
TRITON_CASES = 10  # the interpreter is slow: every third fixed case


def inputs_of(case, seed=0, dtype=torch.float64):
    """(q, k, v, flow, key_bias, value_bias) of a SHAPES case."""
    B, C, H_, W, w, _, biases, kind = case
    return reference_inputs(B, C, H_, W, w, biases, kind, seed, dtype)


def op(backend, w, heads, scale=None):
    return lambda q, k, v, f, kb, vb: vsr_kernels.flow_guided_window_attention(
        q, k, v, f, w, heads, kb, vb, scale, backend=str(backend))


def registered_ops(backend):
    if backend == "triton":
        import vsr_kernels.triton.flow_guided_window_attention  # noqa: F401  registers the ops
        return (torch.ops.vsr_kernels.flow_guided_window_attention_triton,
                torch.ops.vsr_kernels.flow_guided_window_attention_triton_backward)
    return (torch.ops.vsr_kernels.flow_guided_window_attention,
            torch.ops.vsr_kernels.flow_guided_window_attention_backward)


def run(fn, q, k, v, f, kb, vb, grad=None):
    """(out, grads of the five inputs, None for absent biases) of sum <out, grad> (NaN pixels
    of out excluded from the loss)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, kb, vb)]
    out = fn(leaves[0], leaves[1], leaves[2], f, leaves[3], leaves[4])
    if grad is None:
        grad = H.upstream_grads([out])[0]
    grad = torch.where(torch.isnan(out), torch.zeros_like(grad), grad)
    out.backward(grad)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def assert_matches(got, want, **tol):
    (out, grads), (want_out, want_grads) = got, want
    H.assert_same(torch.nan_to_num(out, nan=1234.5), torch.nan_to_num(want_out, nan=1234.5), ["out"], **tol)
    assert torch.equal(torch.isnan(out), torch.isnan(want_out))
    for name, g, wg in zip(INPUT_NAMES, grads, want_grads):
        if wg is None:
            assert g is None, name
        else:
            H.assert_same(g.cpu(), wg, [f"grad_{name}"], **tol)


def check_case(backend, case, seed=0, canary=None):
    q, k, v, f, kb, vb = inputs_of(case, seed)
    w, heads = case[4], case[5]
    want = run(lambda *a: reference.flow_guided_window_attention(*a[:4], w, heads, *a[4:]), q, k, v, f, kb, vb)
    grad = H.upstream_grads([want[0]])[0]
    tensors = [None if t is None else t.to(backend.device) for t in (q, k, v, f, kb, vb)]
    g = grad.to(backend.device)
    if canary is not None:
        kw = H.CANARY_VARIANTS[canary]
        tensors = [None if t is None else (H.canary(t, **kw) if t.dim() == 4 else H.canary(t, fill=float("nan")))
                   for t in tensors]
        g = H.canary(g, **kw)
    got = run(op(backend, w, heads), *tensors, grad=g)
    got = (got[0].cpu(), [None if x is None else x.cpu() for x in got[1]])
    assert_matches(got, want, **FLOAT64)


# ---------------------------------------------------------------------------------------
# Agreement with the reference.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_fixed_sweep(backend, index):
    if backend.name == "triton" and backend.device.type == "cpu" and index % 3:
        pytest.skip("interpreter: every third case")
    check_case(backend, SHAPES[index])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("index", range(0, len(SHAPES), 2))
def test_fixed_sweep_canaries(backend, index):
    if backend.name == "triton" and backend.device.type == "cpu" and index % 6:
        pytest.skip("interpreter: every sixth case")
    check_case(backend, SHAPES[index], canary=list(H.CANARY_VARIANTS)[index % 3])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_random_sweep(backend):
    rng = random.Random(8)
    count = 4 if backend.device.type == "cpu" and backend.name == "triton" else 25
    for i in range(count):
        heads = rng.choice([1, 2, 3])
        case = (rng.randint(1, 2), heads * rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 6),
                rng.randint(1, 4), heads, rng.random() < 0.5, rng.choice(["random", "outside", "integer", "huge"]))
        check_case(backend, case, seed=i)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_explicit_scale_and_head_dims_over_chunk(backend):
    """scale given (0 included) and head_dim larger than the kernels' channel chunks (CPU 64,
    CUDA 16, Triton 64)."""
    big = backend.device.type != "cpu" or backend.name == "cpu"
    C = 140 if big else 20
    q, k, v, f, kb, vb = reference_inputs(1, C, 2, 3, 2, True, "random", 3)
    for scale in (0.0, 0.37):
        want = run(lambda *a: reference.flow_guided_window_attention(*a[:4], 2, 1, *a[4:], scale=scale),
                   q, k, v, f, kb, vb)
        got = run(op(backend, 2, 1, scale), *(t.to(backend.device) for t in (q, k, v, f, kb, vb)),
                  grad=H.upstream_grads([want[0]])[0].to(backend.device))
        assert_matches((got[0].cpu(), [g.cpu() for g in got[1]]), want, **FLOAT64)


# ---------------------------------------------------------------------------------------
# Gradients, registration, compile.

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("w,heads,kind", [(2, 2, "random"), (3, 1, "outside"), (2, 1, "nonfinite")])
def test_gradcheck(backend, w, heads, kind):
    q, k, v, f, kb, vb = reference_inputs(1, 4, 3, 3, w, True, kind, 5)
    fast = backend.name == "triton" and backend.device.type == "cpu"
    leaves = [t.to(backend.device).requires_grad_() for t in (q, k, v, kb, vb)]
    f = f.to(backend.device)
    fn = op(backend, w, heads)
    torch.autograd.gradcheck(lambda q, k, v, kb, vb: fn(q, k, v, f, kb, vb).nan_to_num(), leaves, fast_mode=fast)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    forward, backward = registered_ops(str(backend))
    vsr_kernels.flow_guided_window_attention(*(t.to(backend.device) for t in inputs_of(SHAPES[3])[:4]), 2, 2,
                                             backend=str(backend))  # loads and registers the ops
    for biases in ((True,) if backend.name == "triton" and backend.device.type == "cpu" else (True, False)):
        q, k, v, f, kb, vb = (None if t is None else t.to(backend.device)
                              for t in reference_inputs(1, 4, 3, 4, 2, biases, "random", 1))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        args = (q, k, v, f, 2, 2, kb, vb, 0.5)
        torch.library.opcheck(forward, args)
        out, lse = forward(*args)
        torch.library.opcheck(backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), f, lse, 2, 2,
                                         kb, vb, 0.5))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph(backend):
    q, k, v, f, kb, vb = (t.to(backend.device) for t in reference_inputs(1, 4, 3, 4, 2, True, "outside", 2))
    fn = op(backend, 2, 2)
    want = run(fn, q, k, v, f, kb, vb)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = run(compiled, q, k, v, f, kb, vb)
    assert_matches(got, want, **FLOAT64)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(backend):
    q, k, v, f, kb, vb = (t.to(backend.device) for t in reference_inputs(1, 2, 2, 2, 2, True, "random", 0))
    q.requires_grad_()
    out = op(backend, 2, 1)(q, k, v, f, kb, vb)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ---------------------------------------------------------------------------------------
# Layouts, edges, NaN.

LAYOUT_NAMES = ("query", "key", "value", "flow")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case_id,assign", H.layout_assignments(LAYOUT_NAMES),
                         ids=[c for c, _ in H.layout_assignments(LAYOUT_NAMES)])
def test_layout_sweep(backend, case_id, assign):
    if backend.name == "triton" and backend.device.type == "cpu" and not case_id.startswith("mixed"):
        pytest.skip("interpreter: the mixed cases only")
    q, k, v, f, kb, vb = reference_inputs(2, 4, 3, 4, 2, True, "outside", 7)
    laid = [H.apply_layout(t, assign[name]) for name, t in zip(LAYOUT_NAMES, (q, k, v, f))]
    want = run(lambda *a: reference.flow_guided_window_attention(*a[:4], 2, 2, *a[4:]),
               *(t.contiguous() for t in laid), kb, vb)
    got = run(op(backend, 2, 2), *(t.to(backend.device) for t in laid), kb.to(backend.device),
              vb.to(backend.device), grad=H.upstream_grads([want[0]])[0].to(backend.device))
    assert_matches((got[0].cpu(), [g.cpu() for g in got[1]]), want, **FLOAT64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_flow(backend):
    q, k, v, f, kb, vb = (t.to(backend.device) for t in reference_inputs(1, 4, 3, 4, 2, True, "random", 4))
    f = f.clone()
    f[0, 0, 1, 2] = float("nan")
    f[0, 1, 2, 3] = float("inf")
    f[0, 0, 0, 0] = -float("inf")
    out, grads = run(op(backend, 2, 2), q, k, v, f, kb, vb)
    bad = ~torch.isfinite(f).all(1)
    assert torch.isnan(out).all(1).eq(bad).all() and not torch.isnan(out[:, :, ~bad[0]]).any()
    assert (grads[0][:, :, bad[0]] == 0).all()  # no gradient through those pixels
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_key_propagates(backend):
    q, k, v, f, kb, vb = (None if t is None else t.to(backend.device) for t in reference_inputs(1, 2, 3, 3, 1, False, "zero", 4))
    k = k.clone()
    k[0, 0, 1, 1] = float("nan")
    out = op(backend, 1, 1)(q, k, v, f, kb, vb)
    assert torch.isnan(out[0, :, 1, 1]).all() and torch.isfinite(out[0, :, 0, 0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (2, 4, 3, 0)])
def test_empty(backend, shape):
    B, C, H_, W = shape
    q, k, v = (torch.randn(shape, dtype=torch.float64, device=backend.device, requires_grad=True) for _ in range(3))
    kb = torch.randn(4, C, dtype=torch.float64, device=backend.device, requires_grad=True)
    f = torch.zeros(B, 2, H_, W, dtype=torch.float64, device=backend.device)
    out = op(backend, 2, 2)(q, k, v, f, kb, None)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape and k.grad.shape == shape and (kb.grad == 0).all()


# ---------------------------------------------------------------------------------------
# Precision, autocast, determinism.

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision(backend, dtype):
    q, k, v, f, kb, vb = reference_inputs(1, 8, 4, 5, 2, True, "random", 6)
    want = run(lambda *a: reference.flow_guided_window_attention(*a[:4], 2, 2, *a[4:]),
               *(t.to(dtype).double() if t is not f else t.float().double() for t in (q, k, v, f)),
               kb.to(dtype).double(), vb.to(dtype).double())
    low = [t.to(backend.device, dtype) if t is not f else t.float().to(backend.device) for t in (q, k, v, f, kb, vb)]
    got = run(op(backend, 2, 2), *low, grad=H.upstream_grads([want[0]])[0].to(backend.device, dtype))
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    tol = dict(rtol=2e-2, atol=3e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    assert_matches((got[0].double().cpu(), [g.double().cpu() for g in got[1]]), want, **tol)


@needs_cpu_kernels
def test_autocast_cpu_runs_float32():
    q, k, v, f, kb, vb = reference_inputs(1, 4, 3, 3, 2, True, "random", 1, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vsr_kernels.flow_guided_window_attention(q, k, v, f.float(), 2, 2, kb, vb, backend="cpu")
    assert out.dtype == torch.float32


def _crowded_inputs(seed=0, small=False):
    """Every pixel's window lands on a few key positions (flow to one corner, plus noise), so
    each key position receives from many pixels."""
    g = torch.Generator().manual_seed(seed)
    B, C, H_, W = (1, 6, 5, 6) if small else (2, 12, 17, 19)
    q, k, v = (torch.randn(B, C, H_, W, generator=g) for _ in range(3))
    ys, xs = torch.meshgrid(torch.arange(H_), torch.arange(W), indexing="ij")
    f = torch.stack([3.5 - xs, 2.5 - ys]).float().expand(B, 2, H_, W) + 0.3 * torch.rand(B, 2, H_, W, generator=g)
    kb, vb = torch.randn(4, C, generator=g), torch.randn(4, C, generator=g)
    return q, k, v, f.contiguous(), kb, vb


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_deterministic(backend):
    interpreter = backend.name == "triton" and backend.device.type == "cpu"
    tensors = [t.to(backend.device) for t in _crowded_inputs(small=interpreter)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in ([1, 2] if interpreter else [1, 2, 3] if backend.device.type == "cpu" else [threads, threads]):
            torch.set_num_threads(n)
            results.append(run(op(backend, 2, 3 if tensors[0].shape[1] % 3 == 0 else 2), *tensors, grad=torch.ones_like(tensors[0])))
    finally:
        torch.set_num_threads(threads)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


@needs_cuda
def test_cuda_deterministic_mode():
    tensors = [t.cuda() for t in _crowded_inputs()]
    torch.use_deterministic_algorithms(True)
    try:
        a = run(op("cuda", 2, 3), *tensors, grad=torch.ones_like(tensors[0]))
        b = run(op("cuda", 2, 3), *tensors, grad=torch.ones_like(tensors[0]))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


# ---------------------------------------------------------------------------------------
# Bad inputs and size mismatches.

def _good(device="cpu", dtype=torch.float32):
    q, k, v, f, kb, vb = reference_inputs(2, 6, 3, 4, 2, True, "random", 0, dtype)
    return {"query": q.to(device), "key": k.to(device), "value": v.to(device), "flow": f.to(device),
            "key_bias": kb.to(device), "value_bias": vb.to(device)}


AGREE = {
    "B": [("query", 0), ("key", 0), ("value", 0), ("flow", 0)],
    "C": [("query", 1), ("key", 1), ("value", 1), ("key_bias", 1), ("value_bias", 1)],
    "H": [("query", 2), ("key", 2), ("value", 2), ("flow", 2)],
    "W": [("query", 3), ("key", 3), ("value", 3), ("flow", 3)],
    "cells": [("key_bias", 0), ("value_bias", 0)],
    "flow channels": [("flow", 1)],
}
MISMATCHES = list(H.size_mismatches(_good(), AGREE))


@pytest.mark.parametrize("mismatch", MISMATCHES, ids=[m.id for m in MISMATCHES])
def test_size_mismatch_public(mismatch):
    i = mismatch.inputs
    with pytest.raises(ValueError, match=mismatch.name if mismatch.name != "query" else None):
        vsr_kernels.flow_guided_window_attention(i["query"], i["key"], i["value"], i["flow"], 2, 2, i["key_bias"],
                                                 i["value_bias"], backend="reference")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_size_mismatch_registered_ops(backend):
    """Every mismatch, forward and backward, through the registered ops called directly: an
    error, never a crash or a result."""
    forward, backward = registered_ops(str(backend))
    good = _good(backend.device)
    out, lse = forward(good["query"], good["key"], good["value"], good["flow"], 2, 2, good["key_bias"],
                       good["value_bias"], 0.5)
    for m in H.size_mismatches(good, AGREE):
        i = m.inputs
        args = (i["query"], i["key"], i["value"], i["flow"], 2, 2, i["key_bias"], i["value_bias"], 0.5)
        with pytest.raises((RuntimeError, ValueError)):
            forward(*args)
        with pytest.raises((RuntimeError, ValueError)):
            backward(torch.ones_like(good["query"]), *args[:4], lse, *args[4:])
    # The backward's own tensors: grad_out and lse.
    args = [good[n] for n in ("query", "key", "value", "flow")]
    for grad_out, bad_lse in ((H.resize_dim(out, 3, 1), lse), (out, H.resize_dim(lse, 1, 1)),
                              (out, H.resize_dim(lse, 2, -1)), (out, lse.double())):
        with pytest.raises((RuntimeError, ValueError)):
            backward(grad_out, *args, bad_lse, 2, 2, good["key_bias"], good["value_bias"], 0.5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bad_scalars_registered_ops(backend):
    forward, _ = registered_ops(str(backend))
    g = _good(backend.device)
    base = [g["query"], g["key"], g["value"], g["flow"]]
    for w, heads in ((0, 2), (1025, 2), (2, 0), (2, 4), (2, -1)):
        with pytest.raises((RuntimeError, ValueError)):
            forward(*base, w, heads, None, None, 0.5)
    with pytest.raises((RuntimeError, ValueError)):
        forward(g["query"], g["key"], g["value"], g["flow"].long(), 2, 2, None, None, 0.5)
    with pytest.raises((RuntimeError, ValueError)):
        forward(g["query"], g["key"].double(), g["value"], g["flow"], 2, 2, None, None, 0.5)


BAD = [
    (dict(window_size=0), ValueError, "window_size"),
    (dict(window_size=2000), ValueError, "window_size"),
    (dict(window_size=2.0), TypeError, "window_size"),
    (dict(num_heads=4), ValueError, "num_heads"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(scale="a"), TypeError, "scale"),
    (dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("overrides,error,message", BAD)
def test_bad_arguments(overrides, error, message):
    g = _good()
    kw = dict(window_size=2, num_heads=2, key_bias=g["key_bias"], value_bias=g["value_bias"], scale=None,
              backend="auto") | overrides
    with pytest.raises(error, match=message):
        vsr_kernels.flow_guided_window_attention(g["query"], g["key"], g["value"], g["flow"], **kw)


@needs_cpu_kernels
def test_cpu_backend_refuses_cuda_style_misuse():
    g = _good()
    with pytest.raises(TypeError, match="dtype"):
        vsr_kernels.flow_guided_window_attention(g["query"].int(), g["key"], g["value"], g["flow"], 2, 2,
                                                 backend="cpu")


def test_make_flow_kinds_cover_sweep():
    kinds = {case[-1] for case in SHAPES}
    assert {"outside", "integer", "nonfinite", "huge", "zero", "half", "random"} <= kinds
    assert len(SHAPES) >= 25 and make_flow is not None


# ---------------------------------------------------------------------------------------
# The CPU forward's per-instruction-set kernels (csrc/cpu/flow_guided_window_attention_simd.h,
# float32 and float64): VSR_KERNELS_CPU_ISA forces one; each that this CPU runs is checked
# against the reference on the edges of its layout: head_dim below, at and above a multiple
# of the 32-byte granule (4 doubles, 8 floats), one and several heads, w = 1, 2, 3 (two-pass
# softmax) and 4 (online softmax), biases absent, both or one, non-finite flow, canaries.

CPU_ISAS = H.CPU_ISAS
ISA_CASES = [  # (B, C, H, W, w, heads, biases, flow)
    (1, 3, 4, 5, 2, 1, True, "random"), (2, 8, 3, 6, 1, 2, False, "outside"),
    (1, 12, 5, 4, 3, 2, True, "integer"), (1, 15, 4, 7, 4, 3, True, "huge"),
    (1, 40, 3, 5, 2, 2, False, "random"), (1, 18, 6, 3, 3, 1, True, "outside"),
]


@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("index", range(len(ISA_CASES)))
def test_cpu_isa_matches_reference(isa, index, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    cpu = next(p.values[0] for p in BACKENDS if p.values[0].name == "cpu")
    case = ISA_CASES[index]
    check_case(cpu, case, seed=index, canary=list(H.CANARY_VARIANTS)[index % 3] if index % 2 else None)


@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["key", "value"])
def test_cpu_isa_one_bias_and_nan_flow(isa, dtype, which, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    q, k, v, f, kb, vb = inputs_of((1, 30, 5, 9, 2, 3, True, "random"), seed=3)
    f[0, 0, 1, 2] = float("nan")
    f[0, 1, 3, 4] = float("inf")
    kb, vb = (kb, None) if which == "key" else (None, vb)
    want, want_lse = (t.to(dtype) for t in
                      torch.ops.vsr_kernels.flow_guided_window_attention(q, k, v, f, 2, 3, kb, vb, 10 ** -0.5))
    ref = reference.flow_guided_window_attention(q, k, v, f, 2, 3, kb, vb)
    args = [None if t is None else t.to(dtype) for t in (q, k, v, f, kb, vb)]
    out, lse = torch.ops.vsr_kernels.flow_guided_window_attention(*args[:4], 2, 3, *args[4:], 10 ** -0.5)
    tol = FLOAT64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    H.assert_same(torch.nan_to_num(out.double(), nan=7.5), torch.nan_to_num(ref, nan=7.5), ["out"], **tol)
    H.assert_same(torch.nan_to_num(lse, nan=7.5), torch.nan_to_num(want_lse, nan=7.5), ["lse"], **tol)
    assert torch.isnan(out[0, :, 1, 2]).all() and torch.isnan(out[0, :, 3, 4]).all()
    assert torch.isnan(lse[0, :, 1, 2]).all() and torch.equal(torch.isnan(out), torch.isnan(ref))


def test_cpu_isa_switch_rejects_unknown(monkeypatch):
    if "cpu" not in AVAILABLE:
        pytest.skip("no cpu backend")
    q, k, v, f, kb, vb = inputs_of((1, 4, 3, 3, 2, 1, False, "random"))
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="VSR_KERNELS_CPU_ISA must be base, avx2 or avx512"):
        torch.ops.vsr_kernels.flow_guided_window_attention(q, k, v, f, 2, 1, None, None, 0.5)


# The channels-first forward (PlaneArgs: float32 and float64, w <= 3), per instruction set:
# vectors of 4 / 8 / 16 float32 pixels (base / AVX2 / AVX-512; half as many float64), cell
# values gathered per lane or as runs of lanes with a common integer offset (smooth flow:
# few runs; random flow: more runs than the limit, one load per lane; windows clamped at the
# borders). Edges: W below, at and above a vector width, one pixel wide; head_dim not a
# multiple of 8; w = 1, 2, 3; biases absent, one or both; non-finite flow; channel-sliced
# (non-unit channel stride) inputs; float32 against the float64 reference.

def _smooth_flow(B, H, W, generator, dtype):
    """A flow whose integer part changes by at most one between neighbouring pixels (the
    benchmark's kind), plus exact integers in one row and border-clamping in another."""
    ys = torch.linspace(-1, 1, H, dtype=dtype).view(1, 1, H, 1)
    xs = torch.linspace(-1, 1, W, dtype=dtype).view(1, 1, 1, W)
    flow = torch.cat([3 * torch.sin(3 * ys + xs).expand(B, 1, H, W), 2 * torch.cos(2 * xs - ys).expand(B, 1, H, W)], 1)
    flow = flow + torch.rand(B, 2, H, W, generator=generator, dtype=dtype)
    flow[:, :, 0] = torch.round(flow[:, :, 0])
    if H > 2:
        flow[:, 0, 1] += W  # past the right border: every cell clamped
    return flow


def _lse_oracle(q, k, flow, w, heads, kb, scale):
    """log sum_n exp(logit_n) per (b, head, y, x) in float64 plain PyTorch; NaN where the flow is
    not finite."""
    B, C, H_, W = q.shape
    lo = -((w - 1) // 2)
    finite = torch.isfinite(flow).all(1)
    f = torch.where(finite[:, None], flow, torch.zeros((), dtype=flow.dtype))
    by = (torch.arange(H_, dtype=f.dtype).view(1, H_, 1) + f[:, 1]).clamp(-(w + 1), H_ + w).floor().long()
    bx = (torch.arange(W, dtype=f.dtype).view(1, 1, W) + f[:, 0]).clamp(-(w + 1), W + w).floor().long()
    logits = []
    for a in range(w):
        for b in range(w):
            index = ((by + lo + a).clamp(0, H_ - 1) * W + (bx + lo + b).clamp(0, W - 1)).view(B, 1, -1)
            kn = torch.gather(k.flatten(2), 2, index.expand(B, C, -1)).view(B, C, H_, W)
            if kb is not None:
                kn = kn + kb[a * w + b].view(1, C, 1, 1)
            logits.append((q * kn).view(B, heads, C // heads, H_, W).sum(2) * scale)
    lse = torch.logsumexp(torch.stack(logits), 0)
    return torch.where(finite[:, None], lse, torch.full((), float("nan"), dtype=lse.dtype))


PLANE_CASES = [  # (B, C, H, W, w, heads, biases ("both", "key", "value", None), flow)
    (1, 16, 5, 17, 2, 2, "both", "smooth"), (1, 12, 4, 33, 2, 1, None, "smooth"),
    (2, 30, 3, 16, 3, 3, "both", "smooth"), (1, 9, 6, 1, 2, 1, "key", "random"),
    (1, 20, 3, 40, 1, 4, "value", "random"), (1, 40, 4, 23, 3, 5, None, "outside"),
    (1, 24, 7, 8, 2, 2, "both", "nonfinite"), (1, 14, 5, 31, 2, 2, "both", "integer"),
    (1, 6, 2, 3, 3, 3, "both", "smooth"), (1, 48, 3, 64, 2, 6, "both", "random"),
    # more heads than a block's head group (kHeadGroup = 8 in the kernels): groups of 8 and 2, 8 and 1
    (1, 30, 4, 35, 2, 10, "both", "smooth"), (1, 18, 3, 17, 3, 9, "key", "random"),
]


@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(len(PLANE_CASES)))
def test_cpu_planes_forward(isa, dtype, index, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    B, C, H_, W, w, heads, biases, kind = PLANE_CASES[index]
    generator = torch.Generator().manual_seed(index)
    q, k, v = (torch.randn(B, C, H_, W, generator=generator, dtype=torch.float64) for _ in range(3))
    flow = (_smooth_flow(B, H_, W, generator, torch.float64) if kind == "smooth"
            else make_flow(kind, B, H_, W, generator))
    kb, vb = (torch.randn(w * w, C, generator=generator, dtype=torch.float64) for _ in range(2))
    kb = kb if biases in ("both", "key") else None
    vb = vb if biases in ("both", "value") else None
    scale = (C // heads) ** -0.5
    want = reference.flow_guided_window_attention(q, k, v, flow, w, heads, kb, vb)
    want_lse = _lse_oracle(q, k, flow, w, heads, kb, scale)
    if index % 2:  # channel-sliced views: a channel stride other than H * W
        q, k, v = (torch.stack([t, torch.full_like(t, float("nan"))], 2).flatten(1, 2)[:, ::2] if i != 1 else
                   torch.cat([torch.full_like(t, float("nan")), t], 1)[:, C:] for i, t in enumerate((q, k, v)))
    args = [None if t is None else t.to(dtype) for t in (q, k, v, flow, kb, vb)]
    out, lse = torch.ops.vsr_kernels.flow_guided_window_attention(*args[:4], w, heads, *args[4:], scale)
    tol = FLOAT64 if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    H.assert_same(torch.nan_to_num(out.double(), nan=7.5), torch.nan_to_num(want, nan=7.5), ["out"], **tol)
    H.assert_same(torch.nan_to_num(lse.double(), nan=7.5), torch.nan_to_num(want_lse, nan=7.5), ["lse"], **tol)
    assert torch.equal(torch.isnan(out), torch.isnan(want))


# The channels-first backward (PlaneBackwardArgs, float32/float64, w <= 3): step 1 per ISA
# kernel, the key/value gather through the ring of transposed source rows (or the planes when
# a row of key positions draws from more rows than the ring holds: "outside" flow on a tall
# frame), bias gradients; float32 against the float64 reference.

PLANE_BACKWARD_CASES = PLANE_CASES[:6] + [(1, 12, 40, 9, 2, 2, "both", "outside"), (2, 10, 21, 5, 3, 2, None, "smooth")]


@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(len(PLANE_BACKWARD_CASES)))
def test_cpu_planes_backward(isa, dtype, index, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    B, C, H_, W, w, heads, biases, kind = PLANE_BACKWARD_CASES[index]
    generator = torch.Generator().manual_seed(100 + index)
    q, k, v = (torch.randn(B, C, H_, W, generator=generator, dtype=torch.float64) for _ in range(3))
    flow = (_smooth_flow(B, H_, W, generator, torch.float64) if kind == "smooth"
            else make_flow(kind, B, H_, W, generator))
    kb, vb = (torch.randn(w * w, C, generator=generator, dtype=torch.float64) for _ in range(2))
    kb = kb if biases in ("both", "key") else None
    vb = vb if biases in ("both", "value") else None
    grad = torch.randn(B, C, H_, W, generator=generator, dtype=torch.float64)
    want = run(op("reference", w, heads), q, k, v, flow, kb, vb, grad=grad)
    cast = [None if t is None else t.to(dtype) for t in (q, k, v, flow, kb, vb, grad)]
    got = run(op("cpu", w, heads), *cast[:6], grad=cast[6])
    tol = FLOAT64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_matches((got[0].double(), [None if g is None else g.double() for g in got[1]]), want, **tol)


@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_planes_backward_deterministic(isa, monkeypatch):
    """Same bits for 1, 2 and 3 threads (float32, crowded key positions, both biases)."""
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    tensors = [None if t is None else t.float() for t in _crowded_inputs(small=False)]
    heads = 3 if tensors[0].shape[1] % 3 == 0 else 2
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(op("cpu", 2, heads), *tensors, grad=torch.ones_like(tensors[0])))
    finally:
        torch.set_num_threads(threads)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


# The cell loads of the channels-first kernels, exactly: with a zero query every logit is 0, so
# P_n = 1/4 (w = 2) and out = sum_n v(cell n) / 4 with integer-valued values: exact in float32
# and float64, whichever way the kernel loads the cells (AVX-512: the 2x2 window built from row
# segments by permutes, where the block's rows and columns allow; shared runs; generic runs;
# one load per lane). Shapes around the vector widths (W = 1 .. 65: segments of 2 vectors that
# must stay inside the row, or inside the plane for narrow frames, partial blocks), flows with
# one, two or three row bases per block, clamped at every border, columns spanning more than
# two vectors, and non-finite flow.
GATHER_WIDTHS = (1, 3, 8, 15, 16, 17, 31, 32, 33, 40, 47, 48, 65)
GATHER_FLOWS = ("smooth", "steep", "rows", "outside", "random", "integer", "nonfinite")


def _gather_flow(kind, H, W, generator, dtype):
    if kind == "smooth":
        return _smooth_flow(1, H, W, generator, dtype)
    if kind == "steep":  # the column offset changes by ~1 every 3 pixels: wide column spans
        xs = torch.arange(W, dtype=dtype).view(1, 1, 1, W)
        return torch.cat([(xs / 3 - 2).expand(1, 1, H, W), torch.rand(1, 1, H, W, generator=generator, dtype=dtype) * 2.5 - 1.25], 1)
    if kind == "rows":  # dy in [-1.5, 1.5): up to four row bases per block, top and bottom clamping
        return torch.cat([torch.rand(1, 1, H, W, generator=generator, dtype=dtype) - 0.5,
                          torch.rand(1, 1, H, W, generator=generator, dtype=dtype) * 3 - 1.5], 1)
    return make_flow(kind, 1, H, W, generator, dtype)


@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", GATHER_FLOWS)
def test_cpu_planes_cell_loads_exact(isa, dtype, kind, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    generator = torch.Generator().manual_seed(GATHER_FLOWS.index(kind))
    for H_ in (1, 2, 3, 6):
        for W in GATHER_WIDTHS:
            C = 3
            value = (torch.arange(H_ * W, dtype=dtype).view(1, 1, H_, W) * 4
                     + torch.arange(C, dtype=dtype).view(1, C, 1, 1) * 100000)
            query = torch.zeros(1, C, H_, W, dtype=dtype)
            key = torch.randn(1, C, H_, W, generator=generator, dtype=dtype)
            flow = _gather_flow(kind, H_, W, generator, dtype)
            out, lse = torch.ops.vsr_kernels.flow_guided_window_attention(query, key, value, flow, 2, 1, None, None,
                                                                          1.0)
            want = reference.flow_guided_window_attention(query.double(), key.double(), value.double(),
                                                          flow.double(), 2, 1)
            assert torch.equal(torch.isnan(out), torch.isnan(want)), (H_, W)
            assert torch.equal(out.double().nan_to_num(-1), want.nan_to_num(-1)), (H_, W)
            finite = ~torch.isnan(want[:, :1])
            assert torch.equal(lse[finite], torch.full_like(lse[finite], math.log(4))), (H_, W)


# lse's logarithm (float32: a vector log in float64, rounded once): with a zero query every
# logit is 0, so lse = log(w * w) exactly, the correctly rounded float32 of log 1, 4 and 9 (the
# polynomial's path for 9), at full and partial vectors.
@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_planes_lse_exact(isa, dtype, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    generator = torch.Generator().manual_seed(0)
    for w in (1, 2, 3):
        for W in (5, 16, 37):
            query = torch.zeros(1, 4, 3, W, dtype=dtype)
            key, value = (torch.randn(1, 4, 3, W, generator=generator, dtype=dtype) for _ in range(2))
            flow = _smooth_flow(1, 3, W, generator, dtype)
            out, lse = torch.ops.vsr_kernels.flow_guided_window_attention(query, key, value, flow, w, 2, None, None,
                                                                          1.0)
            assert torch.equal(lse, torch.full_like(lse, math.log(w * w))), (w, W)
