"""local_argmax_attention: the reference against a plain loop, the C++ CPU backend against
the reference, gradients, registration, torch.compile and every documented edge.

Triton-specific tests live in test_triton.py, GPU-only ones in test_gpu.py.
"""
import itertools
import random
import re
import zlib

import pytest
import torch

import vsr_kernels
from vsr_kernels import reference
from vsr_kernels.ops import _backend

CPU_BACKENDS = [b for b in ("cpu",)
                if _backend.unavailable("local_argmax_attention", b, torch.device("cpu")) is None]
needs_cpu_kernels = pytest.mark.skipif(not CPU_BACKENDS, reason="vsr_kernels._C is not built")


def make_inputs(B, T, C, Cv, H, W, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    k = torch.randn(B, T, C, H, W, generator=g, dtype=dtype)
    v = torch.randn(B, T, Cv, H, W, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def loop_oracle(q, k, v, kernel_size, dilation, scale, border):
    """The definition in the README, one pixel at a time, independent of unfold and gather."""
    B, T, _, H, W = k.shape
    r = kernel_size // 2
    out = torch.zeros(B, T, v.shape[2], H, W, dtype=q.dtype)
    score = torch.zeros(B, T, H, W, dtype=q.dtype)
    index = torch.zeros(B, T, H, W, dtype=torch.int64)
    for b, t, y, x in itertools.product(range(B), range(T), range(H), range(W)):
        best = None
        for j in range(kernel_size * kernel_size):
            cy, cx = y + (j // kernel_size - r) * dilation, x + (j % kernel_size - r) * dilation
            inside = 0 <= cy < H and 0 <= cx < W
            if not inside and border == "exclude":
                continue
            s = scale * float(q[b, :, y, x] @ k[b, t, :, cy, cx]) if inside else 0.0
            if best is None or s > best[0]:
                best = (s, j, v[b, t, :, cy, cx] if inside else torch.zeros(v.shape[2], dtype=q.dtype))
        score[b, t, y, x], index[b, t, y, x] = best[0], best[1]
        out[b, t, :, y, x] = best[0] * best[2]
    return out, score, index


def assert_same_outputs(got, want, **tol):
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **tol)
    torch.testing.assert_close(got[1], want[1], equal_nan=True, **tol)
    assert torch.equal(got[2], want[2])


def grads(fn, q, k, v, seed=1):
    """Gradients of a random linear function of out and score."""
    out, score, _ = fn(q, k, v)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + \
        (score * torch.randn(score.shape, generator=g, dtype=score.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v))


def check_against_reference(backend, shape, window, scale, border, seed):
    """Outputs and gradients of `backend` equal the reference's in float64."""
    q, k, v = make_inputs(*shape, seed=seed, requires_grad=True)
    call = lambda backend: lambda q, k, v: vsr_kernels.local_argmax_attention(  # noqa: E731
        q, k, v, *window, scale=scale, border=border, backend=backend)
    assert_same_outputs(call(backend)(q, k, v), call("reference")(q, k, v), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(call(backend), q, k, v), grads(call("reference"), q, k, v)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# Shapes that exercise the borders: windows larger than the frame, 1-pixel frames, T = 1.
SHAPES = [  # B, T, C, Cv, H, W
    (2, 3, 4, 5, 6, 7), (1, 1, 3, 2, 5, 5), (1, 2, 2, 3, 1, 9), (2, 2, 5, 1, 3, 2), (1, 3, 1, 4, 8, 4),
    (1, 2, 3, 2, 5, 1),
]
WINDOWS = [(1, 1), (3, 1), (3, 2), (9, 1), (5, 2)]  # kernel_size, dilation


@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (3, 1), (3, 2), (5, 1)])
def test_reference_matches_loop_oracle(border, kernel_size, dilation):
    q, k, v = make_inputs(2, 2, 3, 2, 4, 5, seed=kernel_size * 10 + dilation)
    want = loop_oracle(q, k, v, kernel_size, dilation, 0.5, border)
    assert_same_outputs(reference.local_argmax_attention(q, k, v, kernel_size, dilation, 0.5, border), want)


@needs_cpu_kernels
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", WINDOWS)
def test_matches_reference_float64(backend, border, shape, window):
    seed = zlib.crc32(repr((border, shape, window)).encode())
    check_against_reference(backend, shape, window, random.Random(seed).uniform(-2, 2), border, seed)


def _random_case(seed):
    rng = random.Random(seed)
    shape = (rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 8), rng.randint(1, 8), rng.randint(1, 12),
             rng.randint(1, 12))
    return shape, (rng.choice([1, 3, 5, 7, 9]), rng.randint(1, 3)), rng.choice(["exclude", "zeros"])


@needs_cpu_kernels
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", range(25))
def test_random_sweep_matches_reference(backend, seed):
    shape, window, border = _random_case(seed)
    check_against_reference(backend, shape, window, 0.5, border, seed)


@needs_cpu_kernels
@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_float32_close_to_float64_reference(border):
    q, k, v = make_inputs(2, 3, 16, 8, 12, 10, seed=7)
    want = reference.local_argmax_attention(q, k, v, 5, 1, 0.25, border)
    got = vsr_kernels.local_argmax_attention(q.float(), k.float(), v.float(), 5, 1, 0.25, border, "cpu")
    agree = got[2] == want[2]
    assert agree.float().mean() > 0.99  # float32 rounding may flip near-ties only
    torch.testing.assert_close(got[1][agree].double(), want[1][agree], rtol=1e-5, atol=1e-5)


@needs_cpu_kernels
@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_planted_ties_pick_the_lowest_candidate(border):
    # Integer-valued inputs make many candidates score exactly the same.
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (2, 2, 6, 6), generator=g).double()
    k = torch.randint(-1, 2, (2, 3, 2, 6, 6), generator=g).double()
    v = torch.randn(2, 3, 3, 6, 6, generator=g, dtype=torch.float64)
    want = loop_oracle(q, k, v, 3, 1, 1.0, border)
    got = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, border, backend="cpu")
    assert_same_outputs(got, want)
    assert_same_outputs(reference.local_argmax_attention(q, k, v, 3, 1, 1.0, border), want)
    # scale 0 ties every candidate: the first one inside the window wins.
    _, _, index = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 0.0, border, backend="cpu")
    first = reference.local_argmax_attention(q, k, v, 3, 1, 0.0, border)[2]
    assert torch.equal(index, first)
    assert index[0, 0, 0, 0] == (0 if border == "zeros" else 4)


@needs_cpu_kernels
@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("window", [(3, 1), (3, 2)])
def test_gradcheck(border, window):
    q, k, v = make_inputs(2, 2, 3, 2, 4, 5, seed=11, requires_grad=True)
    fn = lambda q, k, v: vsr_kernels.local_argmax_attention(  # noqa: E731
        q, k, v, *window, scale=0.7, border=border, backend="cpu")[:2]
    assert torch.autograd.gradcheck(fn, (q, k, v))


@needs_cpu_kernels
def test_index_is_not_differentiable():
    q, k, v = make_inputs(1, 2, 3, 2, 4, 4, requires_grad=True)
    out, score, index = vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu")
    assert out.requires_grad and score.requires_grad and not index.requires_grad
    assert index.dtype == torch.int64


@needs_cpu_kernels
@pytest.mark.parametrize("border", [False, True])
def test_opcheck(border):
    q, k, v = make_inputs(2, 2, 3, 4, 5, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.vsr_kernels.local_argmax_attention, (q, k, v, 3, 2, 0.5, border))
    out, score, index = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 2, 0.5, border)
    go, gs = torch.randn_like(out), torch.randn_like(score)
    torch.library.opcheck(torch.ops.vsr_kernels.local_argmax_attention_backward,
                          (go, gs, q.detach(), k.detach(), v.detach(), score.detach(), index, 3, 2, 0.5, border))


@needs_cpu_kernels
def test_torch_compile_fullgraph_matches_eager():
    def step(q, k, v):
        out, score, _ = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 0.5, "zeros", backend="cpu")
        return (out.sin().sum() + score.square().sum())

    q, k, v = make_inputs(1, 2, 4, 3, 6, 5, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True)
    eager_loss, compiled_loss = step(q, k, v), compiled(q, k, v)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(torch.autograd.grad(compiled_loss, (q, k, v)), torch.autograd.grad(eager_loss, (q, k, v))):
        torch.testing.assert_close(got, want)


@needs_cpu_kernels
def test_torch_compile_with_channels_last_query():
    # Inductor checks the real gradients' strides against the fake ones: they must agree
    # whatever the inputs' layout.
    def step(q, k, v):
        out, score, _ = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 0.5, backend="cpu")
        return out.sum() + score.sum()

    q, k, v = make_inputs(2, 2, 6, 3, 5, 4)
    q = q.contiguous(memory_format=torch.channels_last).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)),
                         torch.autograd.grad(step(q, k, v), (q, k, v))):
        torch.testing.assert_close(got, want)


@needs_cpu_kernels
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_batch_zero(backend):
    q, k, v = make_inputs(0, 3, 4, 5, 6, 7, requires_grad=True)
    out, score, index = vsr_kernels.local_argmax_attention(q, k, v, 3, backend=backend)
    assert out.shape == (0, 3, 5, 6, 7) and score.shape == (0, 3, 6, 7) and index.shape == (0, 3, 6, 7)
    gq, gk, gv = torch.autograd.grad(out.sum() + score.sum(), (q, k, v))
    assert gq.shape == q.shape and gk.shape == k.shape and gv.shape == v.shape


@needs_cpu_kernels
def test_non_contiguous_inputs_match_contiguous():
    q, k, v = make_inputs(2, 3, 4, 5, 7, 6, seed=5)
    # The same values behind transposed, strided and permuted layouts.
    qn = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    kn = torch.empty(2, 3, 8, 7, 6, dtype=k.dtype)[:, :, ::2].copy_(k)
    vn = v.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    fn = lambda q, k, v: vsr_kernels.local_argmax_attention(q, k, v, 3, 2, 0.3, backend="cpu")  # noqa: E731
    strided = [t.requires_grad_() for t in (qn, kn, vn)]
    dense = [t.requires_grad_() for t in (q, k, v)]
    assert_same_outputs(fn(*strided), fn(*dense), rtol=0, atol=0)
    for got, want in zip(grads(fn, *strided), grads(fn, *dense)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpu_kernels
@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_nan_propagates(border):
    q, k, v = make_inputs(1, 2, 3, 2, 6, 6, seed=9)
    q[0, 1, 2, 2] = float("nan")  # one query pixel
    k[0, 1, 0, 4, 4] = float("nan")  # one key pixel of frame 1
    v[0, 0, 1, 0, 0] = float("nan")  # one value pixel of frame 0
    got = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, border, backend="cpu")
    want = reference.local_argmax_attention(q, k, v, 3, 1, 1.0, border)
    assert_same_outputs(got, want)
    assert got[1][0, :, 2, 2].isnan().all()  # the NaN query poisons its scores in every frame
    assert got[1][0, 1, 3:6, 3:6].isnan().all()  # every window holding the NaN key selects it
    if border == "zeros":  # with zero padding a NaN query poisons even the zero candidates
        q[0, 0, 0, 0] = float("nan")
        got = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, border, backend="cpu")
        assert_same_outputs(got, reference.local_argmax_attention(q, k, v, 3, 1, 1.0, border))


@needs_cpu_kernels
def test_auto_backend_on_cpu_is_the_cpu_kernel():
    q, k, v = make_inputs(1, 2, 3, 4, 5, 6)
    assert_same_outputs(vsr_kernels.local_argmax_attention(q, k, v, 3),
                        vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu"), rtol=0, atol=0)


def _bad_input_cases():
    q, k, v = make_inputs(2, 3, 4, 5, 6, 7, dtype=torch.float32)
    ok = dict(query=q, key=k, value=v)
    yield "query rank", dict(ok, query=q[0]), ValueError, "query must be 4-D"
    yield "key rank", dict(ok, key=k[0]), ValueError, "key must be 5-D"
    yield "value rank", dict(ok, value=v[:, 0]), ValueError, "value must be 5-D"
    yield "query not a tensor", dict(ok, query=q.numpy()), TypeError, "query must be a torch.Tensor"
    yield "B mismatch", dict(ok, key=k[:1]), ValueError, "key must have B = 2"
    yield "C mismatch", dict(ok, key=k[:, :, :3]), ValueError, "key must have C = 4"
    yield "H mismatch", dict(ok, key=k[:, :, :, :5]), ValueError, "key must have H = 6"
    yield "W mismatch", dict(ok, value=v[..., :6]), ValueError, "value must have W = 7"
    yield "T mismatch", dict(ok, value=v[:, :2]), ValueError, "value must have T = 3"
    yield "even kernel", dict(ok, kernel_size=4), ValueError, "kernel_size must be an odd integer >= 1, got 4"
    yield "zero kernel", dict(ok, kernel_size=0), ValueError, "kernel_size must be an odd integer >= 1"
    yield "float kernel", dict(ok, kernel_size=3.0), TypeError, "kernel_size must be an int"
    yield "dilation", dict(ok, dilation=0), ValueError, "dilation must be an integer >= 1, got 0"
    yield "border", dict(ok, border="reflect"), ValueError, "border must be one of 'exclude', 'zeros'"
    yield "backend", dict(ok, backend="opencl"), ValueError, "backend must be one of"
    yield "scale", dict(ok, scale="1"), TypeError, "scale must be a real number"
    yield "dtype mismatch", dict(ok, key=k.double()), TypeError, "key must have the dtype of query (torch.float32)"
    yield "integer dtype", dict(ok, value=v.long()), TypeError, "value must have a floating-point dtype"
    yield "device mismatch", dict(ok, value=v.to("meta")), ValueError, "value must be on the device of query"
    yield "cuda backend on cpu", dict(ok, backend="cuda"), ValueError, "backend='cuda' cannot run"


@pytest.mark.parametrize("case", list(_bad_input_cases()), ids=lambda c: c[0])
def test_bad_input_raises_before_any_kernel(case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        vsr_kernels.local_argmax_attention(**kwargs)


@needs_cpu_kernels
def test_cpu_autocast_runs_mixed_half_precision_inputs_in_float32():
    q, k, v = (t.bfloat16().requires_grad_() for t in make_inputs(1, 2, 4, 3, 5, 6, dtype=torch.float32))
    kf = k.detach().float().requires_grad_()  # an input from a float32 part of the network
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vsr_kernels.local_argmax_attention(q, kf, v, 3, backend="cpu")
    want = vsr_kernels.local_argmax_attention(q.float(), k.float(), v.float(), 3, backend="cpu")
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_same_outputs(got, want, rtol=0, atol=0)
    gq, gk, gv = torch.autograd.grad(got[0].sum() + got[1].sum(), (q, kf, v))
    assert (gq.dtype, gk.dtype, gv.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    with pytest.raises(TypeError, match="key must have the dtype of query"):  # no autocast: no casts
        vsr_kernels.local_argmax_attention(q, kf, v, 3, backend="cpu")


@needs_cpu_kernels
def test_cpu_autocast_leaves_float64_alone():
    q, k, v = make_inputs(1, 2, 4, 3, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, score, _ = vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu")
    assert out.dtype == score.dtype == torch.float64


# --- issue 5 regression tests (Python) ---

import doctest  # noqa: E402
import inspect  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402

from vsr_kernels import _extension  # noqa: E402

OP = "local_argmax_attention"
ALL_BACKENDS = ["reference", "cpu", "triton"]


def _skip_unless_available(backend):
    reason = _backend.unavailable(OP, backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend={backend!r} cannot run: {reason}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_double_backward_raises_naming_the_op(backend):
    _skip_unless_available(backend)
    q, k, v = make_inputs(1, 2, 3, 2, 4, 4, requires_grad=True)
    out, score, _ = vsr_kernels.local_argmax_attention(q, k, v, 3, scale=0.5, backend=backend)
    first = torch.autograd.grad(out.square().sum() + score.square().sum(), (q, k, v), create_graph=True)
    second_loss = sum(g.square().sum() for g in first)
    if backend == "reference":  # plain autograd: second-order gradients exist
        assert all(g is not None for g in torch.autograd.grad(second_loss, (q, k, v), allow_unused=True))
        return
    with pytest.raises(RuntimeError, match=f"vsr_kernels.{OP}: double backward is not supported"):
        torch.autograd.grad(second_loss, (q, k, v))


def test_meta_tensors_give_shapes_on_every_path():
    q, k, v = (t.to("meta") for t in make_inputs(2, 3, 4, 5, 6, 7, dtype=torch.float32))
    shapes = [(2, 3, 5, 6, 7), (2, 3, 6, 7), (2, 3, 6, 7)]
    _backend.op_for(OP, "triton")  # registers the Triton ops' fake implementations
    calls = [lambda: vsr_kernels.local_argmax_attention(q, k, v, 3),  # "auto" is the reference on meta
             lambda: vsr_kernels.local_argmax_attention(q, k, v, 3, backend="reference"),
             lambda: torch.ops.vsr_kernels.local_argmax_attention_triton(q, k, v, 3, 1, 1.0, False)]
    if _extension.LOAD_ERROR is None:
        calls.append(lambda: torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, True))
    for call in calls:
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                outputs = call()
            assert [tuple(t.shape) for t in outputs] == shapes
            assert all(t.device.type == "meta" for t in outputs) and outputs[2].dtype == torch.int64


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_every_in_frame_score_minus_inf_picks_the_first_in_frame_candidate(backend, border):
    _skip_unless_available(backend)
    q, k, v = make_inputs(1, 2, 1, 2, 5, 6, seed=4)
    q = torch.full_like(q, float("-inf"))
    k = k.abs() + 0.5  # every in-frame score is -inf; zero-padded ones are NaN (-inf * 0)
    # The loop oracle scores zero-padded candidates 0, not NaN: with zeros, compare to the reference.
    want = (lambda q: loop_oracle(q, k, v, 3, 1, 1.0, border)) if border == "exclude" else \
        (lambda q: reference.local_argmax_attention(q, k, v, 3, 1, 1.0, border))
    got = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, border, backend=backend)
    assert_same_outputs(got, want(q))
    # Top-left and bottom-right corners: the first in-frame candidate, or the first (NaN) padded one.
    assert (got[2][0, 0, 0, 0], got[2][0, 0, -1, -1]) == ((4, 0) if border == "exclude" else (0, 2))
    # A mix: -inf scores in some pixels only, finite elsewhere, the same rule throughout.
    q2 = torch.where(torch.rand(q.shape, generator=torch.Generator().manual_seed(1)) < 0.5, q, 1.0)
    got = vsr_kernels.local_argmax_attention(q2, k, v, 3, 1, 1.0, border, backend=backend)
    assert_same_outputs(got, want(q2))


@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("shape", [(2, 3, 0, 2, 4, 5), (2, 3, 3, 0, 4, 5), (2, 3, 3, 2, 0, 5),
                                   (2, 3, 3, 2, 4, 0), (2, 0, 3, 2, 4, 5)],
                         ids=["C=0", "Cv=0", "H=0", "W=0", "T=0"])
def test_reference_takes_empty_dimensions(border, shape):
    q, k, v = make_inputs(*shape, requires_grad=True)
    got = vsr_kernels.local_argmax_attention(q, k, v, 3, 2, 0.5, border, backend="reference")
    assert_same_outputs(got, loop_oracle(q.detach(), k.detach(), v.detach(), 3, 2, 0.5, border))
    grads = torch.autograd.grad(got[0].sum() + got[1].sum(), (q, k, v), allow_unused=True)
    for g, x in zip(grads, (q, k, v)):
        assert g is None or (g.shape == x.shape and (x.numel() == 0 or g.isfinite().all()))


def test_auto_on_cpu_falls_back_to_the_reference_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(_extension, "LOAD_ERROR", ImportError("vsr_kernels._C is not built (a test)"))
    monkeypatch.setattr(_backend, "_WARNED", set())
    q, k, v = make_inputs(1, 2, 3, 2, 5, 5)
    with pytest.warns(RuntimeWarning, match=r"falls back to the slow reference.*_C is not built \(a test\)"):
        got = vsr_kernels.local_argmax_attention(q, k, v, 3)
    assert_same_outputs(got, reference.local_argmax_attention(q, k, v, 3))
    with warnings.catch_warnings():  # once only
        warnings.simplefilter("error")
        vsr_kernels.local_argmax_attention(q, k, v, 3)
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run: .*_C is not built \(a test\)"):
        vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu")


def _run_python(code: str) -> str:
    """Runs `code` in a fresh interpreter importing this checkout's vsr_kernels; returns stdout."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_build_compatibility_compares_releases_and_cuda():
    from vsr_kernels._extension import version_mismatch

    assert version_mismatch("2.13.0+cpu", "2.13.0+cu128") is None  # one release: one C++ ABI
    assert version_mismatch("2.13.0+cu128", "2.13.0") is None
    assert "built against torch 2.13.0" in version_mismatch("2.13.0", "2.14.1+cpu")
    assert "has no CUDA" in version_mismatch("2.13.0+cu128", "2.13.0+cpu", built_with_cuda=True,
                                             installed_has_cuda=False)


def test_a_build_for_another_torch_is_refused_with_how_to_rebuild():
    out = _run_python("""
        import sys, types, warnings
        info = types.ModuleType("vsr_kernels._build_info")
        info.TORCH_VERSION, info.CUDA = "1.0.0+test", False
        sys.modules["vsr_kernels._build_info"] = info
        import torch, vsr_kernels
        from vsr_kernels import _extension
        assert isinstance(_extension.LOAD_ERROR, ImportError)
        print("LOAD_ERROR:", _extension.LOAD_ERROR)
        assert not hasattr(torch.ops.vsr_kernels, "local_argmax_attention_backward"), "_C was loaded"
        q, k, v = torch.randn(1, 2, 4, 4), torch.randn(1, 1, 2, 4, 4), torch.randn(1, 1, 2, 4, 4)
        try:
            vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu")
        except ValueError as error:
            print("cpu:", error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vsr_kernels.local_argmax_attention(q, k, v, 3)
        print("auto:", caught[0].message)
    """)
    expected = (f"vsr_kernels was built against torch 1.0.0+test but torch {torch.__version__} is installed; "
                "rebuild with: pip install --no-build-isolation --force-reinstall")
    for prefix in ("LOAD_ERROR:", "cpu:", "auto:"):
        assert any(line.startswith(prefix) and expected in line for line in out.splitlines()), out


def test_an_extension_that_fails_to_load_gets_the_rebuild_advice():
    out = _run_python("""
        import importlib.abc, importlib.util, sys

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                raise ImportError("_C.so: undefined symbol: _ZN3c1015SmallVectorBaseIjE8grow_podEPKvmm")

            def exec_module(self, module):
                pass

        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "vsr_kernels._C":
                    return importlib.util.spec_from_loader(name, Loader())

        sys.meta_path.insert(0, Finder())
        from vsr_kernels import _extension
        print(_extension.LOAD_ERROR)
    """)
    assert "undefined symbol" in out
    assert "rebuild with: pip install --no-build-isolation --force-reinstall" in out
    assert f"torch {torch.__version__} is installed" in out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_backend_takes_half_precision_outside_autocast(dtype):
    _skip_unless_available("cpu")
    q, k, v = (t.to(dtype) for t in make_inputs(1, 2, 8, 3, 6, 7, dtype=torch.float32, seed=2))
    got = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 0.25, backend="cpu")
    want = reference.local_argmax_attention(q.double(), k.double(), v.double(), 3, 1, 0.25)
    assert got[0].dtype == got[1].dtype == dtype
    agree = got[2] == want[2]
    assert agree.float().mean() > 0.95  # float32 accumulation of the same rounded inputs: near-ties only
    torch.testing.assert_close(got[1][agree].double(), want[1][agree], rtol=1e-2, atol=1e-2)


def test_window_parameters_take_pairs_and_are_bounded():
    q, k, v = make_inputs(1, 2, 3, 2, 5, 6, dtype=torch.float32)
    call = lambda **kw: vsr_kernels.local_argmax_attention(q, k, v, **kw, backend="reference")  # noqa: E731
    assert_same_outputs(call(kernel_size=(3, 3), dilation=[2, 2]), call(kernel_size=3, dilation=2))
    for kwargs, error, message in [
        (dict(kernel_size=(3, 5)), ValueError, r"kernel_size must be an int or a pair of equal ints.*(3, 5)"),
        (dict(dilation=(1, 2)), ValueError, r"dilation must be an int or a pair of equal ints"),
        (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a pair"),
        (dict(kernel_size=(3, 3.0)), TypeError, r"kernel_size must be an int"),
        (dict(kernel_size=32769), ValueError, r"kernel_size must be an odd integer <= 32767 .*got 32769"),
        (dict(dilation=2**31), ValueError, r"dilation must be an integer <= 2147483647 .*got 2147483648"),
        (dict(dilation=2**32 + 1), ValueError, r"dilation must be an integer <= 2147483647"),
    ]:
        with pytest.raises(error, match=message):
            call(**kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_the_largest_dilation_is_exact(backend, border):
    # (j // K - r) * dilation passes 2**31 for K = 5: in int32 the step -2 * (2**31 - 1) wraps to 2.
    _skip_unless_available(backend)
    q, k, v = make_inputs(1, 2, 3, 2, 4, 5, seed=6, requires_grad=True)
    window = (5, 2**31 - 1)
    got = vsr_kernels.local_argmax_attention(q, k, v, *window, 0.5, border, backend=backend)
    assert_same_outputs(got, loop_oracle(q.detach(), k.detach(), v.detach(), *window, 0.5, border))
    call = lambda backend: lambda q, k, v: vsr_kernels.local_argmax_attention(  # noqa: E731
        q, k, v, *window, 0.5, border, backend=backend)
    for a, b in zip(grads(call(backend), q, k, v), grads(call("reference"), q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _public_callables():
    from vsr_kernels.nn import CrossFrameNonLocalAttention, MemoryAugmentedAttention

    return [vsr_kernels.local_argmax_attention, reference.local_argmax_attention,
            CrossFrameNonLocalAttention.__init__, CrossFrameNonLocalAttention.forward,
            MemoryAugmentedAttention.__init__, MemoryAugmentedAttention.forward]


@pytest.mark.parametrize("function", _public_callables(), ids=lambda f: f.__qualname__)
def test_public_functions_are_typed(function):
    signature = inspect.signature(function)
    untyped = [name for name, p in signature.parameters.items()
               if name != "self" and p.annotation is inspect.Parameter.empty]
    assert untyped == [] and signature.return_annotation is not inspect.Signature.empty


@pytest.mark.parametrize("module", ["vsr_kernels.ops.local_argmax_attention",
                                    "vsr_kernels.reference.local_argmax_attention", "vsr_kernels.nn.mana"])
def test_docstring_examples_run(module):
    import importlib

    module = importlib.import_module(module)
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
    from vsr_kernels.nn import CrossFrameNonLocalAttention, MemoryAugmentedAttention

    for obj in (vsr_kernels.local_argmax_attention, reference.local_argmax_attention,
                CrossFrameNonLocalAttention, MemoryAugmentedAttention):
        assert "Examples:" in obj.__doc__


def test_layers_reject_empty_frames_and_non_positive_channels():
    from vsr_kernels.nn import CrossFrameNonLocalAttention, MemoryAugmentedAttention

    cross, memory = CrossFrameNonLocalAttention(32, 3, 3), MemoryAugmentedAttention(4, 8)
    for frames in (torch.randn(1, 3, 32, 0, 5), torch.randn(1, 3, 32, 5, 0)):
        with pytest.raises(ValueError, match=r"frames must have frames of at least one pixel"):
            cross(frames, 1)
    with pytest.raises(ValueError, match=r"frames must have T = num_frames = 3"):
        cross(torch.randn(1, 0, 32, 5, 5), 0)
    with pytest.raises(ValueError, match=r"x must have frames of at least one pixel"):
        memory(torch.randn(1, 4, 0, 3))
    for channels in (0, -32):
        with pytest.raises(ValueError, match=r"channels must be an integer >= 1"):
            CrossFrameNonLocalAttention(channels, 3)
        with pytest.raises(ValueError, match=r"channels must be an integer >= 1"):
            MemoryAugmentedAttention(channels)
    assert CrossFrameNonLocalAttention(32, 3, kernel_size=(5, 5), dilation=(2, 2)).kernel_size == 5


def test_torch_compile_traces_the_first_call_of_a_lazily_imported_backend():
    # op_for imports the Triton module and registers its ops on first use, even inside a trace.
    out = _run_python("""
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
        import sys, torch, vsr_kernels
        from vsr_kernels.ops import _backend
        if _backend.unavailable("local_argmax_attention", "triton", torch.device("cpu")) is not None:
            print("skip"); sys.exit()
        assert "vsr_kernels.triton.local_argmax_attention" not in sys.modules

        def step(q, k, v):
            out, score, _ = vsr_kernels.local_argmax_attention(q, k, v, 3, backend="triton")
            return out.sum() + score.sum()

        q, k, v = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 4, 4), torch.randn(1, 2, 2, 4, 4)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
        torch.testing.assert_close(compiled, step(q, k, v))
        print("ok")
    """)
    if out.strip().endswith("skip"):
        pytest.skip("Triton cannot run on CPU tensors here")
    assert out.strip().endswith("ok")


# --- issue 5 regression tests (C++ entry points) ---
# Direct torch.ops calls bypass the Python checks: the C++ entry points must refuse whatever
# would read or write out of bounds, and take the empty and half-precision inputs the Python
# function documents.

def _has_kernel(dispatch_key):
    try:
        name = torch.ops.vsr_kernels.local_argmax_attention.default.name()
    except (AttributeError, RuntimeError):  # vsr_kernels._C is not loaded
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)


# The C++ entry points share their checks and per-pixel code: on a GPU machine the CUDA ones
# run the checks and index tests too.
_DIRECT_DEVICES = [d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                   if _has_kernel(key) and (d == "cpu" or torch.cuda.is_available())]
_SIZES = dict(B=2, T=3, C=4, Cv=5, H=6, W=7)
# The dimension names of every tensor argument of the forward and the backward.
_FORWARD_DIMS = dict(query="B C H W", key="B T C H W", value="B T Cv H W")
_BACKWARD_DIMS = dict(grad_out="B T Cv H W", grad_score="B T H W", query="B C H W", key="B T C H W",
                      value="B T Cv H W", score="B T H W", index="B T H W")


def _direct_args(dims, perturbed=None, dim=None, delta=0, dtype=torch.float64, device="cpu"):
    """The tensor arguments named in `dims`, random, with dimension `dim` of `perturbed` made
    `delta` larger."""
    g = torch.Generator().manual_seed(0)
    args = {}
    for name, names in dims.items():
        shape = [_SIZES[n] for n in names.split()]
        if name == perturbed:
            shape[dim] += delta
        if name == "index":
            args[name] = torch.randint(0, 9, shape, generator=g)
        else:
            args[name] = torch.randn(shape, generator=g, dtype=dtype)
    return {name: t.to(device) for name, t in args.items()}


def _size_cases(dims, skip=()):
    return [(name, dim, delta) for name, names in dims.items() for dim, size in enumerate(names.split())
            if (name, size) not in skip for delta in (1, -1)]


def _raises_naming(name, call):
    with pytest.raises(RuntimeError) as info:
        call()
    assert re.search(rf"\b{name}\b", str(info.value)), f"the error does not name {name}: {info.value}"
    return str(info.value)


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
@pytest.mark.parametrize("name, dim, delta", _size_cases(_FORWARD_DIMS, skip={("value", "Cv")}),
                         ids=lambda x: str(x))
def test_direct_forward_rejects_every_size_mismatch(name, dim, delta, device):
    args = _direct_args(_FORWARD_DIMS, name, dim, delta, device=device)
    message = _raises_naming(name, lambda: torch.ops.vsr_kernels.local_argmax_attention(
        args["query"], args["key"], args["value"], 3, 1, 0.5, False))
    assert "vsr_kernels.local_argmax_attention" in message and "got" in message


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
@pytest.mark.parametrize("name, dim, delta", _size_cases(_BACKWARD_DIMS), ids=lambda x: str(x))
def test_direct_backward_rejects_every_size_mismatch(name, dim, delta, device):
    a = _direct_args(_BACKWARD_DIMS, name, dim, delta, device=device)
    message = _raises_naming(name, lambda: torch.ops.vsr_kernels.local_argmax_attention_backward(
        a["grad_out"], a["grad_score"], a["query"], a["key"], a["value"], a["score"], a["index"], 3, 1, 0.5,
        False))
    assert "vsr_kernels.local_argmax_attention_backward" in message and "got" in message


def _backward_with(device, **changes):
    a = dict(_direct_args(_BACKWARD_DIMS, device=device), **changes)
    return lambda: torch.ops.vsr_kernels.local_argmax_attention_backward(
        a["grad_out"], a["grad_score"], a["query"], a["key"], a["value"], a["score"], a["index"], 3, 1, 0.5,
        False)


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
def test_direct_ops_reject_bad_ranks_dtypes_and_index(device):
    f = _direct_args(_FORWARD_DIMS, device=device)
    forward = torch.ops.vsr_kernels.local_argmax_attention
    _raises_naming("query", lambda: forward(f["key"], f["key"], f["value"], 3, 1, 0.5, False))
    _raises_naming("key", lambda: forward(f["query"], f["query"], f["value"], 3, 1, 0.5, False))
    _raises_naming("value", lambda: forward(f["query"], f["key"], f["value"][:, 0], 3, 1, 0.5, False))
    _raises_naming("key", lambda: forward(f["query"], f["key"].float(), f["value"], 3, 1, 0.5, False))
    integers = [f[name].long() for name in ("query", "key", "value")]
    _raises_naming("query", lambda: forward(*integers, 3, 1, 0.5, False))
    b = _direct_args(_BACKWARD_DIMS, device=device)
    _raises_naming("index", _backward_with(device, index=b["index"].int()))
    _raises_naming("index", _backward_with(device, index=b["index"][..., None]))
    _raises_naming("score", _backward_with(device, score=b["score"].float()))
    _raises_naming("grad_out", _backward_with(device, grad_out=b["grad_out"].float()))
    if device == "cuda":  # a CPU tensor among CUDA ones dispatches to the CUDA kernel
        _raises_naming("value", lambda: forward(f["query"], f["key"], f["value"].cpu(), 3, 1, 0.5, False))
        _raises_naming("index", _backward_with(device, index=b["index"].cpu()))


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
@pytest.mark.parametrize("kernel_size, dilation, bad", [
    (0, 1, "kernel_size"), (-1, 1, "kernel_size"), (2, 1, "kernel_size"), (32769, 1, "kernel_size"),
    (2**31 + 1, 1, "kernel_size"), (2**32 + 3, 1, "kernel_size"),  # was truncated to 3 silently
    (3, 0, "dilation"), (3, -1, "dilation"), (3, 2**31, "dilation"), (3, 2**32 + 1, "dilation"),  # was 1
])
def test_direct_ops_bound_kernel_size_and_dilation(kernel_size, dilation, bad, device):
    f = _direct_args(_FORWARD_DIMS, device=device)
    _raises_naming(bad, lambda: torch.ops.vsr_kernels.local_argmax_attention(
        f["query"], f["key"], f["value"], kernel_size, dilation, 0.5, False))
    b = _direct_args(_BACKWARD_DIMS, device=device)
    _raises_naming(bad, lambda: torch.ops.vsr_kernels.local_argmax_attention_backward(
        b["grad_out"], b["grad_score"], b["query"], b["key"], b["value"], b["score"], b["index"], kernel_size,
        dilation, 0.5, False))


@needs_cpu_kernels
def test_direct_ops_take_the_largest_dilation():
    q, k, v = make_inputs(1, 2, 3, 2, 4, 5)
    out, score, index = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 2**31 - 1, 0.5, False)
    assert (index == 4).all()  # every other candidate lies outside the frame
    torch.testing.assert_close(out, score[:, :, None] * v, rtol=0, atol=0)


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
@pytest.mark.parametrize("border", [False, True])
def test_direct_backward_ignores_indices_outside_the_window(border, device):
    # An index no forward produces (only a direct call can pass one) selects nothing, in every
    # gradient alike; it used to be truncated to int for the query gradient (2**32 + 4 -> 4)
    # and wrapped into the window for negative ones.
    q, k, v = (t.to(device) for t in make_inputs(1, 2, 3, 2, 4, 5))
    out, score, _ = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 0.5, border)
    go, gs = torch.randn_like(out), torch.randn_like(score)
    for bad in (2**32 + 4, -1, 9, -(2**40)):
        index = torch.full(score.shape, bad, dtype=torch.int64, device=device)
        grads = torch.ops.vsr_kernels.local_argmax_attention_backward(
            go, gs, q, k, v, score, index, 3, 1, 0.5, border)
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad)), bad


_EMPTY_SHAPES = {"C": (2, 3, 0, 2, 4, 5), "T": (2, 0, 3, 2, 4, 5), "Cv": (2, 3, 3, 0, 4, 5),
                 "H": (2, 3, 3, 2, 0, 5), "W": (2, 3, 3, 2, 4, 0)}


@needs_cpu_kernels
@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("empty", list(_EMPTY_SHAPES))
def test_cpu_empty_dimensions(empty, border):
    """Empty C, T, Cv, H or W: empty or zero results, never "expected adjacent channels".
    With C = 0 every score is scale * 0 = 0 and the first admissible candidate wins."""
    B, T, C, Cv, H, W = _EMPTY_SHAPES[empty]
    q, k, v = make_inputs(B, T, C, Cv, H, W, seed=3)
    zero_border = border == "zeros"
    forward = torch.ops.vsr_kernels.local_argmax_attention
    backward = torch.ops.vsr_kernels.local_argmax_attention_backward
    out, score, index = forward(q, k, v, 3, 1, 0.5, zero_border)
    assert_same_outputs((out, score, index), loop_oracle(q, k, v, 3, 1, 0.5, border), rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(4)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gs = torch.randn(score.shape, generator=g, dtype=score.dtype)
    grads = backward(go, gs, q, k, v, score, index, 3, 1, 0.5, zero_border)
    for grad, x in zip(grads, (q, k, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype and grad.is_contiguous()
    # What the empty dimension leaves, computed by the same op on a non-empty equivalent:
    # C = 0 is C = 1 with zero query and key; Cv = 0 is Cv = 1 with a zero grad_out.
    if empty == "C":
        q1, k1 = torch.zeros(B, 1, H, W, dtype=q.dtype), torch.zeros(B, T, 1, H, W, dtype=q.dtype)
        assert_same_outputs(forward(q1, k1, v, 3, 1, 0.5, zero_border), (out, score, index), rtol=0, atol=0)
        want = backward(go, gs, q1, k1, v, score, index, 3, 1, 0.5, zero_border)[2]
        torch.testing.assert_close(grads[2], want, rtol=0, atol=0)
    elif empty == "Cv":
        v1 = torch.randn(B, T, 1, H, W, generator=g, dtype=v.dtype)
        go1 = torch.zeros(B, T, 1, H, W, dtype=v.dtype)
        want = backward(go1, gs, q, k, v1, score, index, 3, 1, 0.5, zero_border)
        torch.testing.assert_close(grads[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[1], want[1], rtol=0, atol=0)
    else:  # T, H or W = 0: nothing selects anything
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad))


@needs_cpu_kernels
@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_matches_float64_reference(dtype, border):
    """float16 and bfloat16 on the cpu kernels accumulate in float32 and round once: with
    small integer inputs every float32 sum is exact, so each result is the float64
    reference's rounded once to dtype (ties included: exact scores tie exactly)."""
    g = torch.Generator().manual_seed(5)
    B, T, C, Cv, H, W = 2, 3, 6, 5, 7, 6
    q = torch.randint(-2, 3, (B, C, H, W), generator=g).double()
    k = torch.randint(-2, 3, (B, T, C, H, W), generator=g).double()
    v = torch.randint(-3, 4, (B, T, Cv, H, W), generator=g).double()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, score, index = vsr_kernels.local_argmax_attention(q, k, v, 3, 2, 0.5, border, backend="reference")
    go = torch.randint(-2, 3, out.shape, generator=g).double()
    gs = torch.randint(-2, 3, score.shape, generator=g).double()
    want_grads = torch.autograd.grad((out * go).sum() + (score * gs).sum(), (q, k, v))

    zero_border = border == "zeros"
    half = [t.detach().to(dtype) for t in (q, k, v)]
    got = torch.ops.vsr_kernels.local_argmax_attention(*half, 3, 2, 0.5, zero_border)
    assert got[0].dtype == got[1].dtype == dtype
    assert_same_outputs(got, (out.detach().to(dtype), score.detach().to(dtype), index), rtol=0, atol=0)
    got_grads = torch.ops.vsr_kernels.local_argmax_attention_backward(
        go.to(dtype), gs.to(dtype), *half, got[1], got[2], 3, 2, 0.5, zero_border)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert got_grad.dtype == dtype and got_grad.is_contiguous()
        torch.testing.assert_close(got_grad, want_grad.to(dtype), rtol=0, atol=0)
