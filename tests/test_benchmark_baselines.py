"""The benchmarks' careful-user baseline (benchmarks/workloads/local_argmax_attention.py) computes
the same function as the oracle, so that its speed-ups are against an equal, not a shortcut."""
import pytest
import torch

from benchmarks.workloads.local_argmax_attention import careful_local_argmax_attention
from vsr_kernels import reference

# (B, T, C, Cv, H, W, kernel_size, dilation)
SHAPES = [
    (2, 3, 5, 4, 7, 9, 3, 1),
    (1, 2, 4, 3, 6, 5, 5, 2),
    (1, 2, 3, 2, 4, 4, 5, 1),  # the window is wider than the frame
    (1, 3, 4, 4, 8, 7, 3, 3),
]


def _inputs(B, T, C, Cv, H, W, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
            for shape in ((B, C, H, W), (B, T, C, H, W), (B, T, Cv, H, W))]


@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_careful_baseline_matches_reference(shape, border):
    *sizes, kernel_size, dilation = shape
    inputs = _inputs(*sizes)
    got = careful_local_argmax_attention(*inputs, kernel_size, dilation, 0.7, border)
    want = reference.local_argmax_attention(*inputs, kernel_size, dilation, 0.7, border)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(got[0].shape, generator=generator, dtype=torch.float64)
    grad_score = torch.randn(got[1].shape, generator=generator, dtype=torch.float64)
    got_grads = torch.autograd.grad((got[0], got[1]), inputs, (grad_out, grad_score))
    want_grads = torch.autograd.grad((want[0], want[1]), inputs, (grad_out, grad_score))
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_careful_baseline_tie_and_nan_rules(border):
    """Ties keep the lowest candidate (the lowest in-frame one with "exclude"); NaN ranks highest."""
    K, H, W = 3, 4, 5
    query, key, value = (tensor.detach() for tensor in _inputs(1, 1, 2, 2, H, W))
    _, _, index = careful_local_argmax_attention(torch.zeros_like(query), key, value, K, 1, 1.0, border)
    if border == "zeros":
        assert (index == 0).all()
    else:
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        first = (ys == 0).long() * K + (xs == 0).long()  # skip the row above / the column left of the frame
        assert torch.equal(index[0, 0], first)
    key[0, 0, :, 2, 2] = float("nan")  # candidate j = 0 of (3, 3), 8 of (1, 1), 4 of (2, 2)
    _, score, index = careful_local_argmax_attention(query, key, value, K, 1, 1.0, border)
    assert index[0, 0, 3, 3] == 0 and index[0, 0, 1, 1] == 8 and index[0, 0, 2, 2] == 4
    assert score[0, 0, 2, 2].isnan()


# flow_guided_window_attention: (B, C, H, W, window_size, num_heads, biases, flow kind)
FGWA_SHAPES = [
    (2, 4, 3, 5, 2, 2, True, "random"),
    (1, 6, 4, 4, 3, 3, True, "outside"),
    (1, 4, 4, 4, 2, 1, False, "integer"),
    (2, 6, 3, 4, 2, 3, True, "nonfinite"),
    (1, 3, 6, 1, 3, 3, False, "huge"),
]


@pytest.mark.parametrize("shape", FGWA_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_careful_flow_guided_window_attention_matches_reference(shape):
    from benchmarks.workloads.flow_guided_window_attention import careful_flow_guided_window_attention
    from test_flow_guided_window_attention_reference import make_inputs

    B, C, H, W, w, heads, biases, kind = shape
    q, k, v, f, kb, vb = make_inputs(B, C, H, W, w, biases, kind, 3)
    leaves = [t for t in (q, k, v, kb, vb) if t is not None]
    for t in leaves:
        t.requires_grad_()
    got = careful_flow_guided_window_attention(q, k, v, f, w, heads, kb, vb)
    want = reference.flow_guided_window_attention(q, k, v, f, w, heads, kb, vb)
    torch.testing.assert_close(got, want, equal_nan=True)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = torch.where(want.isnan(), 0, grad)
    got_grads = torch.autograd.grad(got.nan_to_num(), leaves, grad)
    want_grads = torch.autograd.grad(want.nan_to_num(), leaves, grad)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad)


# ---------------------------------------------------------------------------------------
# trajectory_attention's careful baseline (benchmarks/workloads/trajectory_attention.py).

from benchmarks.workloads.trajectory_attention import careful_trajectory_attention  # noqa: E402
from test_trajectory_attention_reference import SWEEP as TRAJECTORY_SWEEP  # noqa: E402
from test_trajectory_attention_reference import _case as trajectory_case  # noqa: E402


@pytest.mark.parametrize("i", range(len(TRAJECTORY_SWEEP)))
def test_careful_trajectory_baseline_matches_reference(i):
    shape, options = TRAJECTORY_SWEEP[i]
    q, k, vs, loc = trajectory_case(300 + i, *shape, **options)
    leaves = [t.clone().requires_grad_() for t in (q, k, *vs)]
    got = careful_trajectory_attention(leaves[0], leaves[1], leaves[2:], loc)
    want = reference.trajectory_attention(q, k, vs, loc)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], equal_nan=True, rtol=1e-12, atol=1e-12)
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    if not options.get("nan"):
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, *vs)]
        ref = reference.trajectory_attention(ref_leaves[0], ref_leaves[1], ref_leaves[2:], loc)
        g = torch.Generator().manual_seed(i)
        weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (*want[0], want[1])]

        def loss(outs, score):
            return sum((o * wt).sum() for o, wt in zip((*outs, score), weights))

        got_grads = torch.autograd.grad(loss(*got[:2]), leaves)
        for a, b in zip(got_grads, torch.autograd.grad(loss(*ref[:2]), ref_leaves)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# deform_conv2d's careful baseline (F.grid_sample + einsum) against the reference, on the
# sweep's shapes and offset kinds (outside, integer, boundary), gradients included.
@pytest.mark.parametrize("index", [0, 1, 2, 5, 6, 9, 12, 13, 17, 19, 22, 24, 29, 34, 37, 41, 42])
def test_careful_deform_conv2d_matches_reference(index):
    from benchmarks.workloads.deform_conv2d import careful_deform_conv2d
    from deform_conv2d_cases import SWEEP, make_case

    args = make_case(SWEEP[index], seed=index)
    tensors = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    input, offset, weight, bias, stride, padding, dilation, mask = tensors
    got = careful_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    want = reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    torch.testing.assert_close(got, want)
    wrt = [t for t in (input, offset, weight, bias, mask) if t is not None]
    if got.numel() == 0:
        return
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
    # grid_sample's normalised coordinates round-trip through (2 x + 1) / W - 1, so a point
    # exactly on an integer may land an ulp below it, where the one-sided offset derivative is
    # the other side's: the offset gradient is compared only where points are not on integers.
    on_integers = SWEEP[index][-1] in ("integer", "boundary", "mixed")
    for t, g, w in zip(wrt, torch.autograd.grad(got, wrt, grad, allow_unused=True),
                       torch.autograd.grad(want, wrt, grad, allow_unused=True)):
        if not (on_integers and t is offset):
            torch.testing.assert_close(g, w)


# deform_kernel_conv2d's careful baseline (two F.grid_sample calls, taps innermost) against the
# reference: (B, C, H, W, kernel_size, scope, stride, padding, dilation, offset groups (0: no
# offset), mask, kernel groups, kernel-offset scale (0: zero offsets, the centre crop)).
DKC_CASES = [
    (2, 4, 6, 7, 3, 5, 1, 1, 1, 1, True, 1, 1.0),
    (1, 6, 7, 6, 3, 5, 2, 1, 1, 3, True, 2, 2.0),     # stride 2, offsets pointing outside the scope
    (1, 4, 8, 8, 3, 7, 1, 2, 2, 2, False, 4, 1.0),    # dilation 2, offsets without mask
    (1, 4, 5, 6, (3, 1), (4, 3), 1, (1, 0), 1, 0, False, 1, 0.7),  # rectangular, half-integer centre
    (2, 4, 5, 5, 3, 3, 1, 1, 1, 0, True, 2, 0.5),     # scope = kernel, mask without offset
    (1, 4, 5, 5, 3, 5, 1, 1, 1, 0, False, 1, 0.0),    # zero kernel offsets: a depthwise conv
]


@pytest.mark.parametrize("case", DKC_CASES, ids=lambda case: "x".join(map(str, case)))
def test_careful_deform_kernel_conv2d_matches_reference(case):
    from benchmarks.workloads.deform_kernel_conv2d import careful_deform_kernel_conv2d
    from vsr_kernels.reference.deform_conv2d import output_size

    B, C, H, W, k, S, stride, padding, dilation, G, with_mask, Gk, scale = case
    (kh, kw), (Sh, Sw) = [v if isinstance(v, tuple) else (v, v) for v in (k, S)]
    pair = (lambda v: v if isinstance(v, tuple) else (v, v))
    Ho, Wo = output_size(H, W, (kh, kw), pair(stride), pair(padding), pair(dilation))
    generator = torch.Generator().manual_seed(len(DKC_CASES) + C + H)

    def randn(*shape, s=1.0):
        return (s * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()

    K = kh * kw
    input, weight, bias = randn(B, C, H, W), randn(C, 1, Sh, Sw), randn(C)
    kernel_offset = randn(B, 2 * Gk * K, Ho, Wo, s=scale)
    offset = randn(B, 2 * G * K, Ho, Wo, s=2.0) if G else None
    mask = torch.rand((B, max(G, 1) * K, Ho, Wo), generator=generator, dtype=torch.float64).requires_grad_() \
        if with_mask else None
    args = (input, weight, kernel_offset, k, offset, mask, bias, stride, padding, dilation)
    got = careful_deform_kernel_conv2d(*args)
    want = reference.deform_kernel_conv2d(*args)
    torch.testing.assert_close(got, want)
    grad = torch.randn(got.shape, generator=generator, dtype=got.dtype)
    wrt = [t for t in (input, weight, kernel_offset, offset, mask, bias) if t is not None]
    # Zero kernel offsets put the kernel points on integers, which grid_sample's normalised
    # coordinates may move by an ulp (to the other one-sided derivative): compare that gradient
    # only for random offsets.
    for t, g, w in zip(wrt, torch.autograd.grad(got, wrt, grad), torch.autograd.grad(want, wrt, grad)):
        if not (scale == 0 and t is kernel_offset):
            torch.testing.assert_close(g, w)
