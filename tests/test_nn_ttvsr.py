"""TTVSR layers (vsr_kernels.nn.ttvsr) and the TTVSR-style network (vsr_kernels.models.ttvsr)."""
import math

import pytest
import torch
import torch.nn.functional as F

import vsr_kernels
from vsr_kernels.models import TTVSR, zero_flow
from vsr_kernels.nn import CrossScaleTokenizer, TrajectoryAwareAttention, identity_locations, update_locations

# ------------------------------------------------------------------------------ update_locations


def _update_loop(location, flow, stride):
    """Direct loop: pooled flow per token, clamp, round half to even (Python's round), read."""
    B, T, _, h, w = location.shape
    out = torch.empty(B, T + 1, 2, h, w, dtype=location.dtype)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                block = flow[b, :, i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].double()
                fx, fy = (float(block[c].sum()) / (stride * stride) / stride for c in (0, 1))
                x, y = j + fx, i + fy
                if math.isnan(x) or math.isnan(y):
                    out[b, :T, :, i, j] = float("nan")
                else:
                    col = round(min(max(x, 0.0), w - 1.0))
                    row = round(min(max(y, 0.0), h - 1.0))
                    out[b, :T, :, i, j] = location[b, :, :, row, col]
                out[b, T, 0, i, j] = j
                out[b, T, 1, i, j] = i
    return out


@pytest.mark.parametrize("B,T,h,w,stride", [(1, 1, 3, 4, 4), (2, 3, 5, 2, 4), (1, 0, 2, 2, 4),
                                            (2, 2, 1, 3, 8), (1, 4, 6, 7, 4)])
def test_update_locations_matches_loop(B, T, h, w, stride):
    g = torch.Generator().manual_seed(B * 100 + T * 10 + h + w)
    location = torch.rand(B, T, 2, h, w, generator=g, dtype=torch.float64) * 10 - 2
    flow = torch.randn(B, 2, h * stride, w * stride, generator=g, dtype=torch.float64) * stride * 2
    # token 0: a flow averaging to exactly k + .5 tokens (a tie); token 1: NaN; token 2: far outside
    flow[:, :, :stride, :stride] = 1.5 * stride
    if w > 1:
        flow[0, 1, 0, stride] = float("nan")
    if w > 2:
        flow[:, 0, :stride, 2 * stride:3 * stride] = -100.0 * stride
    got = update_locations(location, flow, stride)
    want = _update_loop(location, flow, stride)
    assert got.shape == (B, T + 1, 2, h, w) and got.dtype == location.dtype
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(-7.0), want.nan_to_num(-7.0))
    moved = update_locations(location, flow, stride, append=False)
    torch.testing.assert_close(moved, got[:, :T], rtol=0, atol=0, equal_nan=True)
    assert got.isnan().any() == (w > 1 and T > 0)


def test_update_locations_agrees_with_ttvsr_grid_sample_off_ties():
    """TTVSR moves the maps with grid_sample(nearest, border) after its own normalisation:
    away from .5 positions (where its round trip drifts by an ulp) the two agree."""
    g = torch.Generator().manual_seed(0)
    B, T, h, w, s = 2, 3, 6, 9, 4
    location = torch.rand(B, T, 2, h, w, generator=g) * 8
    flow = torch.randn(B, 2, h * s, w * s, generator=g) * 8
    token_flow = F.avg_pool2d(flow, s) / s
    ident = identity_locations(1, h, w)[:, 0]
    frac = (ident + token_flow).frac().abs()
    flow = torch.where(((frac - 0.5).abs() < 1e-3).repeat_interleave(s, 2).repeat_interleave(s, 3), 0.0, flow)
    token_flow = F.avg_pool2d(flow, s) / s
    pos = ident + token_flow
    grid = torch.stack((2 * pos[:, 0] / (w - 1) - 1, 2 * pos[:, 1] / (h - 1) - 1), -1)
    ttvsr = F.grid_sample(location.flatten(1, 2), grid, mode="nearest", padding_mode="border",
                          align_corners=True).view(B, T, 2, h, w)
    assert torch.equal(update_locations(location, flow, s, append=False), ttvsr)


def test_update_locations_takes_no_gradient_and_rejects_bad_input():
    location = identity_locations(1, 2, 3).clone().requires_grad_()
    flow = torch.zeros(1, 2, 8, 12, requires_grad=True)
    out = update_locations(location, flow, 4)
    assert not out.requires_grad
    assert torch.equal(out[:, 0], location[:, 0].detach())
    with pytest.raises(ValueError, match="flow"):
        update_locations(location, torch.zeros(1, 2, 8, 8), 4)
    with pytest.raises(ValueError, match="flow"):
        update_locations(location, torch.zeros(1, 3, 8, 12), 4)
    with pytest.raises(ValueError, match="location"):
        update_locations(location[:, :, :1], flow, 4)
    with pytest.raises(TypeError, match="location"):
        update_locations(location.long(), flow, 4)
    with pytest.raises(ValueError, match="stride"):
        update_locations(location, flow, 0)


# ------------------------------------------------------------------------------ tokenizer


def _window_token_loop(x, stride, window):
    """Token (i, j): the window x window patch around its block (zero padding), resized to
    stride x stride by adaptive average pooling."""
    B, C, H, W = x.shape
    pad = (window - stride) // 2
    xp = F.pad(x, (pad, pad, pad, pad))
    h, w = H // stride, W // stride
    out = torch.empty(B, C, stride, stride, h, w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            patch = xp[:, :, i * stride:i * stride + window, j * stride:j * stride + window]
            for r in range(stride):
                r0, r1 = (r * window) // stride, -((-(r + 1) * window) // stride)
                for c in range(stride):
                    c0, c1 = (c * window) // stride, -((-(c + 1) * window) // stride)
                    out[:, :, r, c, i, j] = patch[:, :, r0:r1, c0:c1].mean((2, 3))
    return out.reshape(B, C * stride * stride, h, w)


@pytest.mark.parametrize("stride,shape", [(4, (2, 3, 8, 12)), (4, (1, 2, 4, 4)), (8, (1, 2, 16, 8))])
def test_tokenizer_scales_match_loops(stride, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokenizer = CrossScaleTokenizer(stride)
    s1, s2, s3 = tokenizer(x)
    h, w = shape[2] // stride, shape[3] // stride
    # scale 1 is TTVSR's F.unfold layout, and fold inverts it exactly
    assert torch.equal(s1, F.unfold(x, stride, stride=stride).view(shape[0], -1, h, w))
    assert torch.equal(tokenizer.fold(s1), x)
    assert torch.equal(tokenizer.fold(tokenizer.unfold(x)), x)
    torch.testing.assert_close(s2, _window_token_loop(x, stride, 3 * stride // 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s3, _window_token_loop(x, stride, 2 * stride), rtol=1e-12, atol=1e-12)


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="stride"):
        CrossScaleTokenizer(6)
    tokenizer = CrossScaleTokenizer(4)
    with pytest.raises(ValueError, match="x"):
        tokenizer(torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="x"):
        tokenizer(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="tokens"):
        tokenizer.fold(torch.randn(1, 15, 2, 2))


# ------------------------------------------------------------------------------ attention layer


def _memory(layer, B, T, C, H, W, generator, dtype=torch.float64):
    keys, values = [], ([], [], [])
    for _ in range(T):
        feature = torch.randn(B, C, H, W, generator=generator, dtype=dtype)
        propagated = torch.randn(B, C, H, W, generator=generator, dtype=dtype)
        key, scales = layer.tokens(feature, propagated)
        keys.append(key)
        for memory, tokens in zip(values, scales):
            memory.append(tokens)
    return torch.stack(keys, 1), [torch.stack(v, 1) for v in values]


def test_layer_matches_its_definition():
    g = torch.Generator().manual_seed(2)
    B, T, C, H, W, s = 2, 3, 4, 8, 12, 4
    layer = TrajectoryAwareAttention(C).double()
    keys, values = _memory(layer, B, T, C, H, W, g)
    feature = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    anchor = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    location = torch.rand(B, T, 2, H // s, W // s, generator=g, dtype=torch.float64) * 5 - 1
    got = layer(feature, anchor, keys, values, location)
    assert got.shape == (B, C, H, W)
    query = F.unfold(feature, s, stride=s).view(B, C * s * s, H // s, W // s)
    outs, score, _ = vsr_kernels.reference.trajectory_attention(query, keys, values, location)
    folded = torch.cat([F.fold(o.flatten(2), (H, W), s, stride=s) for o in outs], 1)
    # TTVSR's corr_soft
    soft = F.fold(score.flatten(1)[:, None].expand(B, C * s * s, -1), (H, W), s, stride=s)
    want = layer.fusion(folded) * soft + anchor
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_layer_returns_anchor_when_every_trajectory_leaves_the_frame():
    g = torch.Generator().manual_seed(3)
    B, T, C, H, W = 1, 2, 3, 8, 8
    layer = TrajectoryAwareAttention(C).double()
    keys, values = _memory(layer, B, T, C, H, W, g)
    feature = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    anchor = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    location = torch.full((B, T, 2, 2, 2), -3.0, dtype=torch.float64)
    assert torch.equal(layer(feature, anchor, keys, values, location), anchor)


def test_layer_gradients_reach_every_input():
    g = torch.Generator().manual_seed(4)
    B, T, C, H, W = 1, 2, 2, 4, 8
    layer = TrajectoryAwareAttention(C).double()
    keys, values = _memory(layer, B, T, C, H, W, g)
    feature = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    anchor = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    keys.requires_grad_()
    for v in values:
        v.requires_grad_()
    location = identity_locations(B, 1, 2, torch.float64).expand(B, T, 2, 1, 2)

    def f(feature, anchor, keys, v1, v2, v3):
        return layer(feature, anchor, keys, [v1, v2, v3], location)

    assert torch.autograd.gradcheck(f, (feature, anchor, keys, *values), fast_mode=True)


def test_layer_rejects_bad_input():
    C = 2
    layer = TrajectoryAwareAttention(C)
    g = torch.Generator().manual_seed(0)
    keys, values = _memory(layer, 1, 2, C, 8, 8, g, torch.float32)
    feature = torch.randn(1, C, 8, 8)
    location = identity_locations(1, 2, 2).expand(1, 2, 2, 2, 2)
    layer(feature, feature, keys, values, location)
    cases = [
        (ValueError, "feature", (torch.randn(1, 3, 8, 8), feature, keys, values, location)),
        (ValueError, "feature", (torch.randn(1, C, 8, 6), torch.randn(1, C, 8, 6), keys, values, location)),
        (ValueError, "anchor", (feature, torch.randn(2, C, 8, 8), keys, values, location)),
        (ValueError, "keys", (feature, feature, keys[:, :, :16], values, location)),
        (ValueError, "keys", (feature, feature, keys[..., :1], values, location)),
        (TypeError, "values", (feature, feature, keys, values[:2], location)),
        (TypeError, "values", (feature, feature, keys, values[0], location)),
        (ValueError, "location", (feature, feature, keys, values, location[:, :1])),
        (ValueError, r"value\[1\]", (feature, feature, keys, [values[0], values[1][:, :1], values[2]],
                                     location)),
        (TypeError, "location", (feature, feature, keys, values, location.long())),
        (TypeError, r"value\[2\]", (feature, feature, keys, [values[0], values[1], values[2].double()],
                                    location)),
    ]
    for error, name, args in cases:
        with pytest.raises(error, match=name):
            layer(*args)
    with pytest.raises(ValueError, match="stride"):
        TrajectoryAwareAttention(C, stride=2)
    with pytest.raises(ValueError, match="backend"):
        TrajectoryAwareAttention(C, backend="fast")(feature, feature, keys, values, location)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_layer_on_fused_backends_matches_reference(backend):
    """The layer runs the fused op through its backend: outputs and gradients equal the
    reference backend's (float64)."""
    from vsr_kernels.ops import _backend

    reason = _backend.unavailable("trajectory_attention", backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(6)
    B, T, C, H, W = 1, 3, 2, 8, 12
    fused = TrajectoryAwareAttention(C, backend=backend).double()
    ref = TrajectoryAwareAttention(C, backend="reference").double()
    ref.load_state_dict(fused.state_dict())
    keys, values = _memory(fused, B, T, C, H, W, g)
    feature = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    anchor = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    location = torch.rand(B, T, 2, H // 4, W // 4, generator=g, dtype=torch.float64) * 5 - 1
    results = []
    for layer in (fused, ref):
        inputs = [t.clone().requires_grad_() for t in (feature, anchor, keys, *values)]
        out = layer(inputs[0], inputs[1], inputs[2], inputs[3:], location)
        results.append((out, torch.autograd.grad(out.square().sum(), inputs)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ network

CLIP = (1, 4, 3, 16, 16)


def _clip(shape=CLIP, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_small_training_step():
    torch.manual_seed(0)
    model = TTVSR.small(flow_estimator=zero_flow)
    frames = _clip()
    sr = model(frames)
    assert sr.shape == (1, 4, 3, 64, 64)
    target = F.interpolate(frames.flatten(0, 1), scale_factor=4, mode="bicubic", align_corners=False)
    loss = (sr.flatten(0, 1) - target).abs().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("extractor.0.weight", "attention.fusion.weight", "propagation.0.weight", "conv_last.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("T,keyframe_stride", [(1, 2), (2, 1), (5, 3), (6, 1)])
def test_clip_lengths_and_keyframe_strides_with_given_flows(T, keyframe_stride):
    torch.manual_seed(0)
    model = TTVSR.small(keyframe_stride=keyframe_stride)
    g = torch.Generator().manual_seed(1)
    frames = _clip((2, T, 3, 8, 12))
    flows = tuple(torch.randn(2, T - 1, 2, 8, 12, generator=g) * 3 for _ in range(2))
    sr = model(frames, flows)
    assert sr.shape == (2, T, 3, 32, 48) and torch.isfinite(sr).all()


def test_flow_estimator_is_used_and_zero_flow_equals_given_zero_flows():
    torch.manual_seed(0)
    calls = []

    def estimator(reference, supporting):
        calls.append(reference.shape)
        return zero_flow(reference, supporting)

    model = TTVSR.small(flow_estimator=estimator).double()
    frames = _clip((1, 3, 3, 8, 8), torch.float64)
    zeros = torch.zeros(1, 2, 2, 8, 8, dtype=torch.float64)
    assert torch.equal(model(frames), model(frames, (zeros, zeros)))
    assert calls == [(2, 3, 8, 8), (2, 3, 8, 8)]


def test_bfloat16_network_and_cpu_autocast():
    torch.manual_seed(0)
    model = TTVSR.small(flow_estimator=zero_flow)
    frames = _clip((1, 3, 3, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sr = model(frames)
    sr.float().mean().backward()
    assert torch.isfinite(sr).all() and model.extractor[0].weight.grad.abs().sum() > 0
    sr = model.bfloat16()(frames.bfloat16())
    assert sr.dtype == torch.bfloat16 and torch.isfinite(sr).all()


def test_network_rejects_bad_input():
    model = TTVSR.small()
    with pytest.raises(ValueError, match="flows"):
        model(_clip())
    with pytest.raises(ValueError, match="frames"):
        model(_clip((1, 3, 3, 16, 10)))
    with pytest.raises(ValueError, match="frames"):
        model(_clip((1, 3, 1, 16, 16)))
    with pytest.raises(ValueError, match="forward_flows"):
        model(_clip(), (torch.zeros(1, 4, 2, 16, 16), torch.zeros(1, 3, 2, 16, 16)))
    with pytest.raises(TypeError, match="flows"):
        model(_clip(), torch.zeros(1, 3, 2, 16, 16))
    with pytest.raises(TypeError, match="flow_estimator"):
        TTVSR.small(flow_estimator=3)
