"""GPU tests of local argmax attention: the CUDA and Triton backends on CUDA tensors against the
float64 reference, and what only a GPU shows (streams, devices, large tensors).

Scores rounded differently may order a near-tie differently from float64. So each pixel's
selection must score within tolerance of the float64 maximum, most selections must equal the
reference's, out and score are compared where they do, and gradients are compared with the
float64 gradients of the selection the backend made.
"""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import vsr_kernels
from vsr_kernels import reference
from vsr_kernels.ops import _backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SCALE = 0.5  # exact in every dtype
BORDERS = ("exclude", "zeros")

# dtype: (rtol, atol, least fraction of indices equal to the float64 reference's)
TOLERANCES = {
    torch.float64: (1e-10, 1e-10, 1.0),
    torch.float32: (1e-5, 1e-4, 0.999),
    torch.float16: (2e-3, 2e-3, 0.99),
    torch.bfloat16: (1.6e-2, 1.6e-2, 0.99),
}

# (B, T, C, Cv, H, W, kernel_size, dilation)
SHAPES = [
    pytest.param((2, 3, 16, 8, 11, 13, 1, 1), id="kernel1"),
    pytest.param((2, 3, 16, 8, 11, 13, 3, 1), id="kernel3"),
    pytest.param((2, 3, 16, 8, 11, 13, 9, 1), id="kernel9"),
    pytest.param((2, 3, 16, 8, 11, 13, 3, 2), id="dilation2"),
    pytest.param((2, 3, 16, 8, 4, 3, 9, 1), id="frame_smaller_than_window"),
    pytest.param((3, 1, 8, 5, 9, 17, 9, 2), id="one_frame"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=("cuda", "triton"))
def backend(request):
    reason = _backend.unavailable("local_argmax_attention", request.param, torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"backend={request.param!r} cannot run: {reason}")
    return request.param


def _inputs(B, T, C, Cv, H, W, dtype, device="cuda"):
    """query, key, value: standard normal (never zero), requiring grad."""
    shapes = ((B, C, H, W), (B, T, C, H, W), (B, T, Cv, H, W))
    return [torch.randn(s, dtype=torch.float64, device=device).to(dtype).requires_grad_() for s in shapes]


class Result(NamedTuple):
    out: torch.Tensor
    score: torch.Tensor
    index: torch.Tensor
    grad_out: torch.Tensor
    grad_score: torch.Tensor
    grad_query: torch.Tensor
    grad_key: torch.Tensor
    grad_value: torch.Tensor


def _run(backend, query, key, value, kernel_size, dilation, border, grad_out=None, grad_score=None):
    """The op's outputs and the gradients of query, key and value for grad_out and
    grad_score (random where not given)."""
    out, score, index = vsr_kernels.local_argmax_attention(query, key, value, kernel_size, dilation, SCALE,
                                                           border, backend=backend)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    grad_score = torch.randn_like(score) if grad_score is None else grad_score
    grads = torch.autograd.grad((out, score), (query, key, value), (grad_out, grad_score))
    return Result(out, score, index, grad_out, grad_score, *grads)


def _selected(frames, index, kernel_size, dilation):
    """frames[b, t, :, candidate index[b, t, y, x] of (y, x)], zero outside the frame."""
    B, T, C, H, W = frames.shape
    cols = F.unfold(frames.reshape(B * T, C, H, W), kernel_size, dilation=dilation,
                    padding=kernel_size // 2 * dilation).view(B, T, C, kernel_size**2, H, W)
    return cols.gather(3, index[:, :, None, None].expand(B, T, C, 1, H, W)).squeeze(3)


def _selection_score(query, key, index, kernel_size, dilation):
    return SCALE * (query[:, None] * _selected(key, index, kernel_size, dilation)).sum(2)


def _gradients_of_selection(query, key, value, index, stored_score, grad_out, grad_score, kernel_size,
                            dilation):
    """float64 gradients of out and score for the candidates `index` selects: the oracle of
    the backward, whichever way near-ties went in the forward. The value's gradient is
    stored_score * grad_out, with the score the backend stored (rounded to its dtype), as
    autograd computes it in that dtype: terms of opposite sign that several queries send to
    one key would otherwise leave the rounding of the score above float16/bfloat16 atol."""
    q, k, v = (x.detach().double().requires_grad_() for x in (query, key, value))
    score = _selection_score(q, k, index, kernel_size, dilation)
    as_stored = score + (stored_score.double() - score).detach()
    out = as_stored[:, :, None] * _selected(v, index, kernel_size, dilation)
    return torch.autograd.grad((out, score), (q, k, v), (grad_out.double(), grad_score.double()))


def _assert_forward_matches(out, score, index, query, key, value, kernel_size, dilation, border):
    rtol, atol, agreement = TOLERANCES[query.dtype]
    q, k, v = (x.detach().double() for x in (query, key, value))
    ref_out, ref_score, ref_index = reference.local_argmax_attention(q, k, v, kernel_size, dilation, SCALE,
                                                                     border)
    assert (out.dtype, score.dtype, index.dtype) == (query.dtype, query.dtype, torch.int64)
    assert (out.shape, score.shape, index.shape) == (ref_out.shape, ref_score.shape, ref_index.shape)
    assert ((index >= 0) & (index < kernel_size**2)).all(), "index out of range"
    torch.testing.assert_close(_selection_score(q, k, index, kernel_size, dilation), ref_score, rtol=rtol,
                               atol=atol, msg=lambda m: f"a selection is not a maximum: {m}")
    same = index == ref_index
    agreeing = same.double().mean().item()
    assert agreeing >= agreement, f"only {agreeing:.4f} of the indices agree with the reference"
    torch.testing.assert_close(score.double()[same], ref_score[same], rtol=rtol, atol=atol)
    torch.testing.assert_close(out.double().movedim(2, -1)[same], ref_out.movedim(2, -1)[same], rtol=rtol,
                               atol=atol)


def _assert_close_in_dtype(name, got, expected, dtype):
    rtol, atol, _ = TOLERANCES[dtype]
    assert got.dtype == dtype, f"grad of {name} has dtype {got.dtype}"
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_matches_reference(backend, dtype, border, shape):
    *sizes, kernel_size, dilation = shape
    query, key, value = _inputs(*sizes, dtype)
    r = _run(backend, query, key, value, kernel_size, dilation, border)
    _assert_forward_matches(r.out, r.score, r.index, query, key, value, kernel_size, dilation, border)
    expected = _gradients_of_selection(query, key, value, r.index, r.score, r.grad_out, r.grad_score, kernel_size,
                                       dilation)
    for name, got, want in zip(("query", "key", "value"), (r.grad_query, r.grad_key, r.grad_value), expected):
        _assert_close_in_dtype(name, got, want, dtype)


def test_batch_zero(backend):
    query, key, value = _inputs(0, 3, 4, 5, 6, 7, torch.float32)
    r = _run(backend, query, key, value, 3, 1, "exclude")
    assert r.out.shape == (0, 3, 5, 6, 7) and r.score.shape == r.index.shape == (0, 3, 6, 7)
    grads = (r.grad_query, r.grad_key, r.grad_value)
    assert [g.shape for g in grads] == [x.shape for x in (query, key, value)]


def _assert_same_results(got: Result, expected: Result, **tolerances):
    for name, g, e in zip(Result._fields, got, expected):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}", **tolerances)


def _every_other(x, dim):
    """x copied into every other slice of a tensor twice as long along dim: strided, yet its H
    and W still flatten, so the kernels can read it in place."""
    shape = list(x.shape)
    shape[dim] *= 2
    return x.new_empty(shape)[(slice(None),) * dim + (slice(None, None, 2),)].copy_(x)


def test_non_contiguous_inputs(backend):
    B, T, C, Cv, H, W = 2, 3, 16, 8, 11, 13
    query, key, value = _inputs(B, T, C, Cv, H, W, torch.float32)
    expected = _run(backend, query, key, value, 5, 2, "zeros")

    layouts = (
        lambda q: q.contiguous(memory_format=torch.channels_last),
        lambda k: _every_other(k, 2),
        lambda v: v.transpose(-1, -2).contiguous().transpose(-1, -2),
    )
    strided = [layout(x.detach()).requires_grad_() for layout, x in zip(layouts, (query, key, value))]
    assert not any(x.is_contiguous() for x in strided)
    grad_out = _every_other(expected.grad_out, 1)
    grad_score = expected.grad_score.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = _run(backend, *strided, 5, 2, "zeros", grad_out, grad_score)
    _assert_same_results(got, expected)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_autocast_runs_in_the_region_dtype(backend, dtype):
    query, key, value = _inputs(2, 3, 16, 8, 11, 13, torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        got = _run(backend, query, key, value, 3, 1, "exclude")
    low = [x.detach().to(dtype).requires_grad_() for x in (query, key, value)]
    expected = _run(backend, *low, 3, 1, "exclude", got.grad_out, got.grad_score)
    assert got.out.dtype == got.score.dtype == dtype
    assert got.grad_query.dtype == torch.float32  # the cast is differentiable, back to the input dtype
    for name in ("out", "score", "index"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)


@pytest.mark.parametrize("border", BORDERS)
def test_cpu_and_gpu_agree(backend, border):
    reason = _backend.unavailable("local_argmax_attention", "cpu", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend='cpu' cannot run: {reason}")
    query, key, value = _inputs(2, 3, 16, 8, 11, 13, torch.float64)
    gpu = _run(backend, query, key, value, 5, 2, border)
    on_cpu = [x.detach().cpu().requires_grad_() for x in (query, key, value)]
    cpu = _run("cpu", *on_cpu, 5, 2, border, gpu.grad_out.cpu(), gpu.grad_score.cpu())
    _assert_same_results(Result(*(x.cpu() for x in gpu)), cpu, rtol=1e-12, atol=1e-12)


def test_nan_propagates(backend):
    T = 2
    query, key, value = (x.detach() for x in _inputs(1, T, 4, 3, 6, 7, torch.float32))
    query[0, 1, 2, 3] = float("nan")
    out, score, _ = vsr_kernels.local_argmax_attention(query, key, value, 3, backend=backend)
    # Every candidate of that pixel scores NaN and no other pixel's does.
    assert score[0, :, 2, 3].isnan().all() and out[0, :, :, 2, 3].isnan().all()
    assert score.isnan().sum() == T


def test_runs_on_the_current_stream(backend):
    """Inputs written on a side stream kept busy first: a kernel launched on any other stream
    than the current one would run before they are written, and read zeros."""
    query, key, value = _inputs(2, 3, 16, 8, 11, 13, torch.float32)
    expected = _run(backend, query, key, value, 3, 1, "exclude")
    sources = (query, key, value, expected.grad_out, expected.grad_score)
    blanks = [torch.zeros_like(x, requires_grad=False) for x in sources]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for blank, source in zip(blanks, sources):
            blank.copy_(source.detach())
        q, k, v, grad_out, grad_score = blanks
        leaves = (x.requires_grad_() for x in (q, k, v))
        got = _run(backend, *leaves, 3, 1, "exclude", grad_out, grad_score)
    torch.cuda.current_stream().wait_stream(side)
    _assert_same_results(got, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_device_of_the_inputs(backend):
    inputs = _inputs(2, 3, 16, 8, 11, 13, torch.float32)
    expected = _run(backend, *inputs, 3, 1, "exclude")
    with torch.cuda.device(0):
        on_1 = [x.detach().to("cuda:1").requires_grad_() for x in inputs]
        got = _run(backend, *on_1, 3, 1, "exclude", expected.grad_out.to("cuda:1"),
                   expected.grad_score.to("cuda:1"))
    assert all(x.device == torch.device("cuda:1") for x in got)
    _assert_same_results(Result(*(x.to(expected.out.device) for x in got)), expected)


def _assert_frame_matches(r: Result, query, key, value, b, t, kernel_size, dilation, border):
    """Forward and key/value gradients of frame t of batch element b, checked alone (the
    frames are independent); returns that frame's float64 share of the query gradient."""
    at, frame = slice(b, b + 1), slice(t, t + 1)
    q, k, v = query[at], key[at, frame], value[at, frame]
    index = r.index[at, frame]
    _assert_forward_matches(r.out[at, frame], r.score[at, frame], index, q, k, v, kernel_size, dilation,
                            border)
    grad_q, grad_k, grad_v = _gradients_of_selection(q, k, v, index, r.score[at, frame], r.grad_out[at, frame],
                                                     r.grad_score[at, frame], kernel_size, dilation)
    _assert_close_in_dtype("key", r.grad_key[at, frame], grad_k, query.dtype)
    _assert_close_in_dtype("value", r.grad_value[at, frame], grad_v, query.dtype)
    return grad_q


def test_benchmark_shape(backend):
    """The CUDA benchmark shape, checked frame by frame at both ends of the batch: wrong grid
    sizing or offsets show up there first."""
    B, T, C, H, W = 4, 7, 64, 180, 320
    query, key, value = _inputs(B, T, C, C, H, W, torch.float32)
    r = _run(backend, query, key, value, 9, 1, "exclude")
    for b in (0, B - 1):
        grad_query = sum(_assert_frame_matches(r, query, key, value, b, t, 9, 1, "exclude") for t in range(T))
        _assert_close_in_dtype("query", r.grad_query[b:b + 1], grad_query, torch.float32)


@pytest.mark.slow
def test_more_than_2_31_elements(backend):
    """key holds more than 2**31 elements, so its last frame lies past any 32-bit offset."""
    C, H, W = 64, 64, 64
    T = 2**31 // (C * H * W) + 1
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    query = torch.randn(1, C, H, W, dtype=torch.float16, device="cuda", requires_grad=True)
    key = torch.randn(1, T, C, H, W, dtype=torch.float16, device="cuda", requires_grad=True)
    value = torch.randn(1, T, 1, H, W, dtype=torch.float16, device="cuda", requires_grad=True)
    assert key.numel() > 2**31
    r = _run(backend, query, key, value, 3, 1, "zeros")
    _assert_frame_matches(r, query, key, value, 0, T - 1, 3, 1, "zeros")
