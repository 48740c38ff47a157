"""The deform_conv2d reference (grid of sample points, bilinear gathers, einsum) against a plain
per-output loop of torchvision's contract, and against torchvision itself where it imports;
gradients of all five inputs; NaN, low precision, autocast and the public function's checks."""
import pytest
import torch
import torch.nn.functional as F

import vsr_kernels
from deform_conv2d_cases import SWEEP, case_id, make_case, oracle
from vsr_kernels.reference import deform_conv2d as reference
from vsr_kernels.reference.deform_conv2d import sample_bilinear

try:
    import torchvision.ops
    TORCHVISION_ERROR = None
except Exception as error:  # noqa: BLE001 - any import failure (missing, or built for another torch)
    TORCHVISION_ERROR = f"{type(error).__name__}: {error}"


def test_sweep_is_large_enough():
    assert len(SWEEP) >= 40


@pytest.mark.parametrize("index", range(len(SWEEP)), ids=[case_id(c) for c in SWEEP])
def test_reference_matches_loop_float64(index):
    args = make_case(SWEEP[index], seed=index)
    got = reference(*args)
    want = oracle(*args)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vsr_kernels.deform_conv2d(*args, backend="reference"), got, rtol=0, atol=0)


@pytest.mark.skipif(TORCHVISION_ERROR is not None, reason=f"torchvision does not import here "
                    f"({TORCHVISION_ERROR}); run tools/compare_torchvision.py under a venv where it does")
@pytest.mark.parametrize("index", range(len(SWEEP)), ids=[case_id(c) for c in SWEEP])
def test_reference_matches_torchvision_float64(index):
    input, offset, weight, bias, stride, padding, dilation, mask = make_case(SWEEP[index], seed=index)
    results = []
    for fn in (torchvision.ops.deform_conv2d, reference):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None
                  for t in (input, offset, weight, bias, mask)]
        out = fn(leaves[0], leaves[1], leaves[2], leaves[3], stride, padding, dilation, leaves[4])
        if out.numel():
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        results.append((out, [leaf.grad if leaf is not None else None for leaf in leaves]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(("input", "offset", "weight", "bias", "mask"), got_grads, want_grads):
        if g is not None or w is not None:  # torchvision leaves no grad on empty inputs
            g = g if g is not None else torch.zeros_like(w)
            w = w if w is not None else torch.zeros_like(g)
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"d{name}: {m}")


def test_zero_offsets_are_a_convolution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 9, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    for stride, padding, dilation in ((1, 1, 1), (2, (2, 1), (1, 2)), ((1, 2), 0, 2)):
        want = F.conv2d(x, w, b, stride, padding, dilation, groups=2)
        off = torch.zeros(2, 2 * 3 * 9, *want.shape[2:], dtype=torch.float64)
        mask = torch.ones(2, 3 * 9, *want.shape[2:], dtype=torch.float64)
        torch.testing.assert_close(reference(x, off, w, b, stride, padding, dilation), want)
        torch.testing.assert_close(reference(x, off, w, b, stride, padding, dilation, mask), want)


def test_integer_offsets_shift_the_image():
    # A 1x1 kernel with offset (dy, dx) = (1, -2) reads input[y + 1, x - 2], zero outside.
    x = torch.arange(20, dtype=torch.float64).view(1, 1, 4, 5)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    off = torch.tensor([1.0, -2.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 4, 5)
    want = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    want[0, 0, :3, 2:] = x[0, 0, 1:, :3]
    torch.testing.assert_close(reference(x, off, w), want, rtol=0, atol=0)


def test_boundary_rule():
    # One pixel of value 1 at (0, 0) of a 2x2 image: samples along y at x = 0.
    img = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    img[0, 0, 0, 0] = 1.0
    img[0, 0, 1, 0] = 3.0
    ys = torch.tensor([-1.0, -0.999, -0.5, 0.0, 0.5, 1.0, 1.5, 1.999, 2.0, float("nan")], dtype=torch.float64)
    y = ys.view(1, 1, -1)
    x = torch.zeros_like(y)
    got = sample_bilinear(img, y, x)[0, 0]
    want = torch.tensor([0.0, 0.001, 0.5, 1.0, 2.0, 3.0, 1.5, 0.003, 0.0, float("nan")], dtype=torch.float64)
    torch.testing.assert_close(got, want, equal_nan=True)
    # Offset-group channel split: group g's coordinates move only channels of group g.
    two = torch.stack([img[0, 0], img[0, 0] * 10]).unsqueeze(0)  # (1, 2, 2, 2)
    yy = torch.tensor([[[0.0]], [[1.0]]], dtype=torch.float64).view(1, 2, 1)
    got = sample_bilinear(two, yy, torch.zeros_like(yy))
    torch.testing.assert_close(got.view(2), torch.tensor([1.0, 30.0], dtype=torch.float64))


def test_nan_offset_gives_nan_output_and_nan_input_propagates():
    args = list(make_case(SWEEP[1], seed=3))
    args[1] = args[1].clone()
    args[1][0, 0, 1, 1] = float("nan")
    out = reference(*args)
    assert torch.isnan(out[0, :, 1, 1]).all()
    assert not torch.isnan(out[1]).any()
    args = list(make_case(SWEEP[0], seed=4))
    args[1] = torch.zeros_like(args[1])
    args[0] = args[0].clone()
    args[0][0, 0, 2, 2] = float("nan")
    out = reference(*args)
    # Zero offsets: the sample at an integer point (y, x) reads its neighbours (y..y+1, x..x+1),
    # the ones with weight 0 included (torchvision's rule): pixel (2, 2) reaches outputs 0..3.
    assert torch.isnan(out[0, :, :4, :4]).all()
    assert not torch.isnan(out[0, :, 4]).any() and not torch.isnan(out[0, :, :, 4]).any()
    assert not torch.isnan(out[1:]).any()


GRAD_CASES = [
    # (B, C_in, C_out, H, W, kernel, groups, offset_groups, stride, padding, dilation)
    (1, 2, 2, 4, 4, (3, 3), 1, 1, 1, 1, 1),
    (2, 4, 4, 5, 4, (3, 3), 2, 2, 2, (1, 2), (1, 2)),
    (1, 2, 3, 4, 5, (1, 3), 1, 2, 1, (0, 1), 1),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_all_five_inputs(case):
    B, C, Co, H, W, k, groups, G, stride, padding, dilation = case
    args = make_case((B, C, Co, H, W, k, groups, G, stride, padding, dilation, True, "random"), seed=7)
    input, offset, weight, _, stride, padding, dilation, mask = args
    # Offsets away from integer coordinates and the -1 / H borders (bilinear kinks there).
    offset = torch.floor(offset) + 0.25 + 0.5 * torch.rand(offset.shape, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(2))
    bias = torch.randn(Co, dtype=torch.float64)
    tensors = [t.detach().clone().requires_grad_() for t in (input, offset, weight, bias, mask)]

    def fn(x, o, w, b, m):
        return reference(x, o, w, b, stride, padding, dilation, m)

    fast = case is not GRAD_CASES[-1]  # the smallest case runs the full Jacobian, the others fast mode
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda x, o, w, b: vsr_kernels.deform_conv2d(x, o, w, b, stride, padding, dilation), tensors[:4],
        fast_mode=True)


def test_gradgradcheck_small():
    args = make_case((1, 2, 2, 3, 3, (3, 3), 1, 1, 1, 1, 1, True, "random"), seed=11)
    input, offset, weight, bias, stride, padding, dilation, mask = args
    offset = torch.floor(offset) + 0.375
    tensors = [t.detach().clone().requires_grad_() for t in (input, offset, weight, mask)]
    assert torch.autograd.gradgradcheck(
        lambda x, o, w, m: reference(x, o, w, None, 1, 1, 1, m), tensors, atol=1e-6)


def test_offset_gradient_at_integer_points_is_one_sided_like_torchvision():
    # At an integer coordinate the derivative is the one towards +1: d/dy of the sample at y=0
    # of the column [1, 3] is 3 - 1 = 2; along x (W = 1) the right neighbour is outside and
    # reads 0, so d/dx = 0 - 1 = -1.
    img = torch.tensor([[1.0], [3.0]], dtype=torch.float64).view(1, 1, 2, 1)
    off = torch.zeros(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = reference(img, off.expand(1, 2, 2, 1), w)
    out[0, 0, 0, 0].backward()
    assert off.grad[0, 0, 0, 0].item() == 2.0 and off.grad[0, 1, 0, 0].item() == -1.0


def test_offset_gradient_on_the_minus_one_edge_is_one_sided():
    # At y == -1 the sample is 0 but grows towards the image: d/dy = the row-0 value (here at
    # x = 0.25 on the row [2, 6]: 3); at y == H it is 0 both ways; just below -1 also 0.
    img = torch.tensor([[2.0, 6.0], [1.0, 1.0]], dtype=torch.float64).view(1, 1, 2, 2)
    for y, want_value, want_dy in ((-1.0, 0.0, 3.0), (2.0, 0.0, 0.0), (-1.5, 0.0, 0.0), (-0.5, 1.5, 3.0)):
        yy = torch.tensor([[[y]]], dtype=torch.float64, requires_grad=True)
        xx = torch.tensor([[[0.25]]], dtype=torch.float64, requires_grad=True)
        out = sample_bilinear(img, yy, xx)
        out.sum().backward()
        assert out.item() == want_value and yy.grad.item() == want_dy, (y, out.item(), yy.grad.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_is_float32_accumulated(dtype):
    args = make_case(SWEEP[3], seed=5)
    want = reference(*args)
    low = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
    got = vsr_kernels.deform_conv2d(*low)
    assert got.dtype == dtype
    upcast = reference(*[a.double() if isinstance(a, torch.Tensor) else a for a in low])
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got.double(), upcast, rtol=tol, atol=tol)
    torch.testing.assert_close(got.double(), want, rtol=tol * 10, atol=tol * 10)


def test_autocast_on_cpu_runs_in_float32():
    args = make_case(SWEEP[2], seed=6, dtype=torch.float32)
    input, offset, weight, bias, stride, padding, dilation, mask = args
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vsr_kernels.deform_conv2d(input.bfloat16(), offset, weight.bfloat16(), bias, stride, padding,
                                        dilation, mask)
    assert out.dtype == torch.float32
    want = reference(input.bfloat16().float(), offset, weight.bfloat16().float(), bias, stride, padding,
                     dilation, mask)
    torch.testing.assert_close(out, want)


def test_non_contiguous_and_channels_last():
    args = make_case(SWEEP[5], seed=8)
    want = reference(*args)
    input, offset, weight, bias, stride, padding, dilation, mask = args
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (input, offset, weight, mask)]
    torch.testing.assert_close(vsr_kernels.deform_conv2d(cl[0], cl[1], cl[2], bias, stride, padding,
                                                         dilation, cl[3]), want, rtol=1e-12, atol=1e-12)
    wide = [torch.stack([t, t + 1], -1)[..., 0] for t in (input, offset, mask)]
    weight_t = weight.transpose(2, 3).contiguous().transpose(2, 3)
    got = vsr_kernels.deform_conv2d(wide[0], wide[1], weight_t, bias, stride, padding, dilation, wide[2])
    assert not wide[0].is_contiguous() and not weight_t.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 4, 9, 8, device="meta")
    off = torch.empty(2, 2 * 2 * 9, 5, 4, device="meta")
    w = torch.empty(6, 2, 3, 3, device="meta")
    out = vsr_kernels.deform_conv2d(x, off, w, None, 2, 1, 1, torch.empty(2, 18, 5, 4, device="meta"))
    assert out.shape == (2, 6, 5, 4) and out.device.type == "meta"


def _good():
    x = torch.randn(1, 4, 6, 6)
    return dict(input=x, offset=torch.randn(1, 2 * 2 * 9, 6, 6), weight=torch.randn(6, 2, 3, 3),
                bias=torch.randn(6), stride=1, padding=1, dilation=1, mask=torch.rand(1, 2 * 9, 6, 6))


BAD = [
    ({"input": [1.0]}, TypeError, "input"),
    ({"input": torch.randn(4, 6, 6)}, ValueError, "input"),
    ({"input": torch.randn(1, 4, 6, 6).long()}, TypeError, "input"),
    ({"offset": torch.randn(1, 36, 6)}, ValueError, "offset"),
    ({"weight": torch.randn(6, 2, 3)}, ValueError, "weight"),
    ({"weight": torch.randn(6, 3, 3, 3)}, ValueError, "weight.shape[1]"),  # 4 channels not divisible by 3
    ({"weight": torch.randn(5, 2, 3, 3)}, ValueError, "groups"),  # 5 outputs over 2 groups
    ({"offset": torch.randn(1, 35, 6, 6)}, ValueError, "offset"),
    ({"offset": torch.randn(1, 2 * 3 * 9, 6, 6), "mask": None}, ValueError, "offset groups"),
    ({"offset": torch.randn(1, 36, 5, 6)}, ValueError, "offset"),
    ({"offset": torch.randn(2, 36, 6, 6)}, ValueError, "offset"),
    ({"mask": torch.rand(1, 9, 6, 6)}, ValueError, "mask"),
    ({"mask": torch.rand(1, 18, 6, 7)}, ValueError, "mask"),
    ({"mask": torch.rand(2, 18, 6, 6)}, ValueError, "mask"),
    ({"mask": torch.rand(1, 18, 6, 6).double()}, TypeError, "mask"),
    ({"bias": torch.randn(5)}, ValueError, "bias"),
    ({"bias": torch.randn(6, 1)}, ValueError, "bias"),
    ({"bias": torch.randn(6).double()}, TypeError, "bias"),
    ({"weight": torch.randn(6, 2, 3, 3).double()}, TypeError, "weight"),
    ({"offset": torch.randn(1, 36, 6, 6, device="meta")}, ValueError, "offset"),
    ({"stride": 0}, ValueError, "stride"),
    ({"stride": (1, 2, 3)}, ValueError, "stride"),
    ({"stride": 1.5}, TypeError, "stride"),
    ({"padding": -1}, ValueError, "padding"),
    ({"dilation": (1, 0)}, ValueError, "dilation"),
    ({"dilation": True}, TypeError, "dilation"),
    ({"padding": 0, "input": torch.randn(1, 4, 2, 2), "offset": torch.randn(1, 36, 1, 1),
      "mask": None}, ValueError, "empty"),
    ({"weight": torch.randn(6, 2, 0, 3)}, ValueError, "kernel"),
    ({"input": torch.randn(1, 0, 6, 6)}, ValueError, "channel"),
]


@pytest.mark.parametrize("change,error,words", BAD, ids=[f"{i}-{w}" for i, (_, _, w) in enumerate(BAD)])
def test_bad_inputs(change, error, words):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        vsr_kernels.deform_conv2d(**kwargs)


def test_backends():
    kwargs = _good()
    want = vsr_kernels.deform_conv2d(**kwargs, backend="reference")
    torch.testing.assert_close(vsr_kernels.deform_conv2d(**kwargs, backend="auto"), want)
    # The fused backends are tested in tests/test_deform_conv2d.py; cuda needs CUDA tensors.
    with pytest.raises(ValueError, match="cuda"):
        vsr_kernels.deform_conv2d(**kwargs, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        vsr_kernels.deform_conv2d(**kwargs, backend="fast")


def test_infinite_offsets_sample_zero_with_finite_gradients():
    args = list(make_case(SWEEP[0], seed=9))
    offset = args[1].clone()
    offset[0, 0, 0, 0] = float("inf")
    offset[0, 3, 1, 1] = -float("inf")
    args[1] = offset.requires_grad_()
    out = reference(*args)
    torch.testing.assert_close(out.detach(), oracle(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                      for a in args]), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(offset.grad).all()


def test_dynamo_traces_the_public_function_without_graph_breaks():
    args = make_case(SWEEP[2], seed=12, dtype=torch.float32)

    def fn(*tensors):
        input, offset, weight, bias, mask = tensors
        return vsr_kernels.deform_conv2d(input, offset, weight, bias, 1, 1, 1, mask)

    tensors = (args[0], args[1], args[2], args[3], args[7])
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*tensors), fn(*tensors))
