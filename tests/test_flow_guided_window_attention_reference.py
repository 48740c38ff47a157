"""The reference of flow_guided_window_attention against a plain per-pixel loop, its gradients,
and the public op's argument checks."""
import math
import random

import pytest
import torch

import vsr_kernels
from vsr_kernels.reference import flow_guided_window_attention as reference


def loop_oracle(query, key, value, flow, window_size=2, num_heads=1, key_bias=None, value_bias=None,
                scale=None):
    """The op's definition, one pixel, one head and one cell at a time, in Python floats."""
    B, C, H, W = query.shape
    w = window_size
    D = C // num_heads
    scale = D ** -0.5 if scale is None else scale
    lo = -((w - 1) // 2)
    q, k, v, f = (t.double().tolist() for t in (query, key, value, flow))
    kb = key_bias.double().tolist() if key_bias is not None else [[0.0] * C for _ in range(w * w)]
    vb = value_bias.double().tolist() if value_bias is not None else [[0.0] * C for _ in range(w * w)]
    out = [[[[0.0] * W for _ in range(H)] for _ in range(C)] for _ in range(B)]
    for b in range(B):
        for y in range(H):
            for x in range(W):
                dx, dy = f[b][0][y][x], f[b][1][y][x]
                if not (math.isfinite(dx) and math.isfinite(dy)):
                    for c in range(C):
                        out[b][c][y][x] = math.nan
                    continue
                base_y, base_x = math.floor(y + dy), math.floor(x + dx)
                cells = []
                for a in range(lo, lo + w):
                    for bb in range(lo, lo + w):
                        n = (a - lo) * w + (bb - lo)
                        cells.append((n, min(max(base_y + a, 0), H - 1), min(max(base_x + bb, 0), W - 1)))
                for h in range(num_heads):
                    channels = range(h * D, (h + 1) * D)
                    logits = [scale * sum(q[b][c][y][x] * (k[b][c][cy][cx] + kb[n][c]) for c in channels)
                              for n, cy, cx in cells]
                    top = max(logits)
                    weights = [math.exp(logit - top) for logit in logits]
                    total = sum(weights)
                    for c in channels:
                        out[b][c][y][x] = sum(p * (v[b][c][cy][cx] + vb[n][c])
                                              for p, (n, cy, cx) in zip(weights, cells)) / total
    return torch.tensor(out, dtype=torch.float64).reshape(B, C, H, W)


# (B, C, H, W, window_size, num_heads, biases, flow kind)
SHAPES = [
    (1, 1, 1, 1, 1, 1, False, "random"),
    (1, 2, 1, 1, 2, 1, True, "random"),
    (2, 4, 3, 5, 2, 1, False, "random"),
    (2, 4, 3, 5, 2, 2, True, "random"),
    (1, 6, 4, 4, 2, 3, True, "outside"),
    (1, 6, 4, 4, 3, 3, True, "outside"),
    (1, 4, 5, 3, 3, 2, False, "random"),
    (2, 8, 4, 6, 3, 4, True, "random"),
    (1, 4, 1, 7, 2, 2, True, "random"),
    (1, 4, 7, 1, 2, 1, True, "random"),
    (1, 3, 1, 6, 3, 1, False, "outside"),
    (1, 3, 6, 1, 3, 3, True, "outside"),
    (1, 4, 4, 5, 1, 1, False, "random"),
    (2, 4, 4, 5, 1, 2, True, "random"),
    (1, 4, 4, 4, 2, 2, True, "integer"),
    (1, 4, 4, 4, 3, 1, True, "integer"),
    (1, 4, 4, 4, 1, 4, True, "integer"),
    (1, 4, 3, 4, 2, 1, True, "half"),
    (1, 4, 3, 4, 3, 2, False, "zero"),
    (1, 4, 3, 4, 2, 2, True, "zero"),
    (1, 4, 4, 4, 4, 2, True, "random"),
    (1, 2, 3, 3, 5, 1, True, "outside"),
    (2, 6, 3, 4, 2, 6, True, "nonfinite"),
    (1, 4, 4, 3, 3, 2, True, "nonfinite"),
    (1, 4, 4, 4, 2, 1, False, "huge"),
    (1, 5, 2, 3, 2, 5, True, "random"),
    (3, 2, 2, 2, 2, 1, True, "outside"),
    (1, 8, 5, 5, 3, 2, True, "random"),
]


def make_flow(kind, B, H, W, generator, dtype=torch.float64):
    """Flows of each kind the sweep covers."""
    if kind == "random":
        flow = torch.randn(B, 2, H, W, generator=generator, dtype=dtype) * 1.5
    elif kind == "outside":  # many windows wholly or partly past every border
        flow = (torch.rand(B, 2, H, W, generator=generator, dtype=dtype) - 0.5) * 4 * (max(H, W) + 2)
    elif kind == "integer":  # exactly integer: base = target, the floor must not round down
        flow = torch.randint(-3, 4, (B, 2, H, W), generator=generator).to(dtype)
    elif kind == "half":  # exact halves
        flow = torch.randint(-6, 7, (B, 2, H, W), generator=generator).to(dtype) / 2
    elif kind == "zero":
        flow = torch.zeros(B, 2, H, W, dtype=dtype)
    elif kind == "huge":  # past any integer conversion range
        flow = torch.randn(B, 2, H, W, generator=generator, dtype=dtype) * 1e30
        flow[..., 0, 0] = torch.tensor([1e300, -1e300], dtype=dtype) if dtype == torch.float64 else 3e38
    elif kind == "nonfinite":
        flow = torch.randn(B, 2, H, W, generator=generator, dtype=dtype) * 2
        flow[0, 0, 0, 0] = math.nan
        flow[0, 1, min(1, H - 1), min(1, W - 1)] = math.inf
        flow[-1, 0, -1, -1] = -math.inf
        flow[-1, 1, 0, -1] = math.nan
    else:
        raise ValueError(kind)
    return flow


def make_inputs(B, C, H, W, w, biases, kind, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(B, C, H, W, generator=generator, dtype=dtype) for _ in range(3))
    flow = make_flow(kind, B, H, W, generator, dtype)
    key_bias = value_bias = None
    if biases:
        key_bias, value_bias = (torch.randn(w * w, C, generator=generator, dtype=dtype) for _ in range(2))
    return query, key, value, flow, key_bias, value_bias


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_reference_matches_loop(case):
    B, C, H, W, w, heads, biases, kind = SHAPES[case]
    query, key, value, flow, key_bias, value_bias = make_inputs(B, C, H, W, w, biases, kind, seed=case)
    scale = None if case % 3 else 0.7 - case / 10
    expected = loop_oracle(query, key, value, flow, w, heads, key_bias, value_bias, scale)
    got = reference(query, key, value, flow, w, heads, key_bias, value_bias, scale)
    assert got.shape == (B, C, H, W) and got.dtype == torch.float64 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    if kind == "nonfinite":
        bad = ~torch.isfinite(flow).all(dim=1, keepdim=True).expand(B, C, H, W)
        assert got[bad].isnan().all() and got[~bad].isfinite().all()
    else:
        assert got.isfinite().all()


def test_random_sweep_matches_loop():
    """Seeded random configurations beyond the table: sizes, windows, heads, scales, layouts."""
    rng = random.Random(8)
    for trial in range(12):
        heads = rng.choice([1, 2, 3])
        C = heads * rng.choice([1, 2, 3])
        B, H, W, w = rng.randint(1, 2), rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 4)
        kind = rng.choice(["random", "outside", "integer", "half", "nonfinite"])
        inputs = make_inputs(B, C, H, W, w, rng.random() < 0.5, kind, seed=100 + trial)
        query, key, value, flow, key_bias, value_bias = inputs
        if trial % 2:  # non-contiguous views
            key = key.transpose(2, 3).contiguous().transpose(2, 3)
            value = value.contiguous(memory_format=torch.channels_last)
        scale = rng.choice([None, 0.0, -0.5, 2.0])
        expected = loop_oracle(query, key, value, flow, w, heads, key_bias, value_bias, scale)
        got = reference(query, key, value, flow, w, heads, key_bias, value_bias, scale)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_window_cells():
    from vsr_kernels.reference.flow_guided_window_attention import window_cells

    assert list(window_cells(1)) == [0]
    assert list(window_cells(2)) == [0, 1]
    assert list(window_cells(3)) == [-1, 0, 1]
    assert list(window_cells(4)) == [-1, 0, 1, 2]


def test_window_two_is_bilinear_neighbours():
    """w = 2, one channel, key = 0: out is the mean of value over the four bilinear neighbours."""
    H, W = 4, 5
    value = torch.arange(H * W, dtype=torch.float64).view(1, 1, H, W)
    zeros = torch.zeros_like(value)
    flow = torch.zeros(1, 2, H, W, dtype=torch.float64)
    flow[0, 0, 1, 1], flow[0, 1, 1, 1] = 1.3, 0.6  # target (1.6, 2.3): cells rows 1, 2, cols 2, 3
    out = reference(zeros, zeros, value, flow, 2)
    assert out[0, 0, 1, 1].item() == pytest.approx((value[0, 0, 1:3, 2:4]).mean().item())
    # the bottom-right pixel: its window is clamped onto the last row and column
    assert out[0, 0, H - 1, W - 1].item() == value[0, 0, H - 1, W - 1].item()


def test_batch_zero():
    query, key, value, flow, key_bias, value_bias = make_inputs(0, 4, 3, 3, 2, True, "zero", 0)
    for t in (query, key, value):
        t.requires_grad_(True)
    out = vsr_kernels.flow_guided_window_attention(query, key, value, flow, 2, 2, key_bias, value_bias)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert query.grad.shape == query.shape


@pytest.mark.parametrize("w,heads,kind",
                         [(2, 1, "random"), (2, 2, "outside"), (3, 2, "integer"), (1, 1, "random")])
def test_gradcheck(w, heads, kind):
    inputs = make_inputs(1, 4, 3, 4, w, True, kind, seed=7)
    query, key, value, flow, key_bias, value_bias = inputs

    def fn(query, key, value, key_bias, value_bias):
        return reference(query, key, value, flow, w, heads, key_bias, value_bias, 0.8)

    differentiable = [t.clone().requires_grad_(True) for t in (query, key, value, key_bias, value_bias)]
    assert torch.autograd.gradcheck(fn, differentiable)


def test_nonfinite_flow_pixel_passes_no_gradient():
    query, key, value, flow, key_bias, value_bias = make_inputs(1, 4, 3, 4, 2, True, "random", seed=3)
    grad_out = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def grads(flow, grad_out):
        leaves = [t.clone().requires_grad_(True) for t in (query, key, value, key_bias, value_bias)]
        out = reference(*leaves[:3], flow, 2, 2, *leaves[3:])
        return torch.autograd.grad(out, leaves, grad_out)

    bad_flow = flow.clone()
    bad_flow[0, 1, 2, 1] = math.nan
    masked = grad_out.clone()
    masked[0, :, 2, 1] = 0
    for got, expected in zip(grads(bad_flow, grad_out), grads(flow, masked)):
        assert got.isfinite().all()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_flow_is_not_differentiated():
    query, key, value, flow, _, _ = make_inputs(1, 2, 3, 3, 2, False, "random", seed=1)
    flow.requires_grad_(True)
    query.requires_grad_(True)
    out = vsr_kernels.flow_guided_window_attention(query, key, value, flow)
    out.sum().backward()
    assert flow.grad is None and query.grad is not None


def test_float32_coordinates_for_low_precision_flow():
    """Flow of any floating dtype: coordinates in float32, so half flow gives the float32 answer."""
    query, key, value, flow, key_bias, value_bias = make_inputs(1, 4, 4, 5, 2, True, "random", seed=2,
                                                                dtype=torch.float32)
    flow = flow.half()
    got = vsr_kernels.flow_guided_window_attention(query, key, value, flow, 2, 2, key_bias, value_bias)
    expected = reference(query, key, value, flow.float(), 2, 2, key_bias, value_bias)
    torch.testing.assert_close(got, expected)  # "auto" is the fused CPU kernel: float32 rounding differs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_runs(dtype):
    query, key, value, flow, key_bias, value_bias = make_inputs(1, 4, 4, 5, 2, True, "random", seed=4)
    expected = reference(query, key, value, flow, 2, 2, key_bias, value_bias)
    cast = [t.to(dtype) for t in (query, key, value, key_bias, value_bias)]
    got = vsr_kernels.flow_guided_window_attention(*cast[:3], flow.float(), 2, 2, *cast[3:])
    assert got.dtype == dtype
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_op_matches_reference_and_accepts_non_contiguous():
    query, key, value, flow, key_bias, value_bias = make_inputs(2, 6, 4, 5, 3, True, "outside", seed=6)
    expected = reference(query, key, value, flow, 3, 3, key_bias, value_bias, 0.5)
    views = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (query, key, value, flow)]
    for backend in ("auto", "reference"):
        got = vsr_kernels.flow_guided_window_attention(*views, window_size=3, num_heads=3,
                                                       key_bias=key_bias.t().contiguous().t(),
                                                       value_bias=value_bias, scale=0.5, backend=backend)
        exact = dict(rtol=0, atol=0) if backend == "reference" else {}  # "auto": the fused CPU kernel
        torch.testing.assert_close(got, expected, **exact)


def test_autocast_cpu_runs_float32():
    query, key, value, flow, key_bias, value_bias = make_inputs(1, 4, 3, 3, 2, True, "random", 0,
                                                                dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vsr_kernels.flow_guided_window_attention(query.bfloat16(), key, value, flow, 2, 2, key_bias,
                                                       value_bias)
    assert out.dtype == torch.float32


def _good(**overrides):
    query, key, value, flow, key_bias, value_bias = make_inputs(2, 4, 3, 5, 2, True, "random", 0,
                                                                dtype=torch.float32)
    kwargs = dict(query=query, key=key, value=value, flow=flow, window_size=2, num_heads=2, key_bias=key_bias,
                  value_bias=value_bias, scale=None, backend="auto")
    kwargs.update(overrides)
    return kwargs


def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


BAD = [
    (dict(query=_x(4, 3, 5)), ValueError, "query must be 4-D"),
    (dict(query=[1.0]), TypeError, "query must be a torch.Tensor"),
    (dict(key=_x(2, 4, 3, 5, dtype=torch.int64)), TypeError, "key must have a floating-point dtype"),
    (dict(key=_x(2, 4, 3, 6)), ValueError, "key must have the shape of query"),
    (dict(value=_x(2, 2, 3, 5)), ValueError, "value must have the shape of query"),
    (dict(value=_x(2, 4, 3, 5, dtype=torch.float64)), TypeError, "value must have the dtype of query"),
    (dict(flow=_x(2, 3, 3, 5)), ValueError, r"flow must have shape \(B, 2, H, W\)"),
    (dict(flow=_x(2, 2, 5, 3)), ValueError, r"flow must have shape \(B, 2, H, W\)"),
    (dict(flow=_x(2, 2, 3)), ValueError, "flow must be 4-D"),
    (dict(flow=_x(2, 2, 3, 5, dtype=torch.int32)), TypeError, "flow must have a floating-point dtype"),
    (dict(flow=_x(2, 2, 3, 5).to("meta")), ValueError, "flow must be on the device of query"),
    (dict(window_size=0), ValueError, "window_size must be an integer >= 1"),
    (dict(window_size=2.0), TypeError, "window_size must be an int"),
    (dict(num_heads=3), ValueError, "multiple of num_heads = 3"),
    (dict(num_heads=0), ValueError, "num_heads must be an integer >= 1"),
    (dict(key_bias=_x(4, 3)), ValueError, r"key_bias must have shape \(window_size\*\*2, C\) = \(4, 4\)"),
    (dict(value_bias=_x(9, 4)), ValueError, r"value_bias must have shape \(window_size\*\*2, C\)"),
    (dict(value_bias=_x(4)), ValueError, "value_bias must be 2-D"),
    (dict(key_bias=_x(4, 4, dtype=torch.float64)), TypeError, "key_bias must have the dtype of query"),
    (dict(scale="1"), TypeError, "scale must be a real number"),
    (dict(backend="cuda"), ValueError, "backend='cuda' cannot run"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("overrides,error,message", BAD)
def test_bad_arguments(overrides, error, message):
    with pytest.raises(error, match=message):
        vsr_kernels.flow_guided_window_attention(**_good(**overrides))


def test_zero_channels_rejected():
    empty = _x(2, 0, 3, 5)
    kwargs = _good(query=empty, key=empty, value=empty, key_bias=None, value_bias=None, num_heads=1)
    with pytest.raises(ValueError, match="positive multiple of num_heads"):
        vsr_kernels.flow_guided_window_attention(**kwargs)


def test_no_device_is_hard_coded():
    """Meta tensors stand in for any other device: every tensor the op creates follows its inputs."""
    query = torch.empty(2, 6, 4, 5, device="meta")
    flow = torch.empty(2, 2, 4, 5, device="meta")
    bias = torch.empty(9, 6, device="meta")
    out = vsr_kernels.flow_guided_window_attention(query, query, query, flow, 3, 2, bias, bias)
    assert out.device.type == "meta" and out.shape == (2, 6, 4, 5)
