"""Layers of vsr_kernels.nn: shapes, zero-initialised identities, the memory loss, gradients,
backends agreeing, argument checks."""
import pytest
import torch
from torch import nn

from vsr_kernels.nn import CrossFrameNonLocalAttention, MemoryAugmentedAttention

B, T, C, H, W = 2, 3, 32, 7, 9
CENTER = T // 2


def _frames(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, C, H, W, generator=generator, dtype=dtype)


def _cross_frame(backend="cpu", **kwargs):
    torch.manual_seed(0)
    return CrossFrameNonLocalAttention(C, T, kernel_size=5, backend=backend, **kwargs)


def _memory():
    torch.manual_seed(0)
    return MemoryAugmentedAttention(C, memory_size=16)


def _wake(conv: nn.Conv2d) -> None:
    """Gives a zero-initialised conv random weights, so that gradients flow through it."""
    torch.manual_seed(1)
    nn.init.normal_(conv.weight, std=0.1)
    nn.init.normal_(conv.bias, std=0.1)


def _assert_every_parameter_learns(module: nn.Module) -> None:
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_cross_frame_shape():
    frames = _frames()
    assert _cross_frame()(frames, CENTER).shape == (B, C, H, W)


@pytest.mark.parametrize("center", [0, CENTER, T - 1])
def test_fresh_cross_frame_is_identity_on_center(center):
    frames = _frames()
    assert torch.equal(_cross_frame()(frames, center), frames[:, center])


def test_cross_frame_backward_reaches_every_parameter():
    layer = _cross_frame()
    _wake(layer.fuse)
    frames = _frames().requires_grad_()
    layer(frames, CENTER).square().sum().backward()
    _assert_every_parameter_learns(layer)
    assert frames.grad.abs().sum() > 0


@pytest.mark.parametrize("dilation", [1, 2])
def test_cross_frame_cpu_matches_reference_float64(dilation):
    layers = {backend: _cross_frame(backend, dilation=dilation).double() for backend in ("reference", "cpu")}
    results = {}
    for backend, layer in layers.items():
        _wake(layer.fuse)
        frames = _frames(torch.float64).requires_grad_()
        out = layer(frames, CENTER)
        torch.manual_seed(2)
        out.backward(torch.randn_like(out))
        results[backend] = (out, frames.grad, {n: p.grad for n, p in layer.named_parameters()})
    (out_ref, dframes_ref, grads_ref), (out_cpu, dframes_cpu, grads_cpu) = results.values()
    torch.testing.assert_close(out_cpu, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dframes_cpu, dframes_ref, rtol=1e-10, atol=1e-10)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_cpu[name], grad, rtol=1e-10, atol=1e-10, msg=name)


def test_memory_shape_and_fresh_identity():
    x = _frames()[:, CENTER]
    y, loss = _memory()(x)
    assert torch.equal(y, x)
    assert loss.shape == ()


def test_memory_loss_is_l1_between_queries_and_their_reconstruction():
    layer = _memory().double()
    x = _frames(torch.float64)[:, CENTER]
    _, loss = layer(x)
    query = layer.query(x).flatten(2).transpose(1, 2)  # (B, HW, C/2)
    bank = layer.memory  # (C/2, N)
    weights = torch.softmax(query @ bank / (C // 2) ** 0.5, dim=-1)
    expected = (query - weights @ bank.t()).abs().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_memory_backward_reaches_every_parameter():
    layer = _memory()
    _wake(layer.project)
    x = _frames()[:, CENTER].requires_grad_()
    y, loss = layer(x)
    (y.square().mean() + loss).backward()
    _assert_every_parameter_learns(layer)
    assert x.grad.abs().sum() > 0


def test_memory_loss_alone_trains_the_bank_through_the_fresh_layer():
    layer = _memory()
    _, loss = layer(_frames()[:, CENTER])
    loss.backward()
    assert layer.memory.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, error", [
    (dict(channels=48, num_frames=3), ValueError),
    (dict(channels=16, num_frames=3), ValueError),
    (dict(channels=32.0, num_frames=3), TypeError),
    (dict(channels=32, num_frames=0), ValueError),
    (dict(channels=32, num_frames=3, kernel_size=4), ValueError),
    (dict(channels=32, num_frames=3, dilation=0), ValueError),
    (dict(channels=32, num_frames=3, backend="gpu"), ValueError),
])
def test_cross_frame_rejects_bad_construction(kwargs, error):
    with pytest.raises(error):
        CrossFrameNonLocalAttention(**kwargs)


@pytest.mark.parametrize("frames, center, error, match", [
    (torch.randn(B, T + 1, C, H, W), CENTER, ValueError, "num_frames"),
    (torch.randn(B, T, C + 32, H, W), CENTER, ValueError, "channels"),
    (torch.randn(B, C, H, W), CENTER, ValueError, "5-D"),
    ([[0.0]], CENTER, TypeError, "torch.Tensor"),
    (torch.randn(B, T, C, H, W), T, ValueError, "center"),
    (torch.randn(B, T, C, H, W), -1, ValueError, "center"),
    (torch.randn(B, T, C, H, W), 1.0, TypeError, "center"),
])
def test_cross_frame_rejects_bad_input(frames, center, error, match):
    with pytest.raises(error, match=match):
        _cross_frame()(frames, center)


@pytest.mark.parametrize("kwargs, error", [
    (dict(channels=33), ValueError),
    (dict(channels=0), ValueError),
    (dict(channels=32, memory_size=0), ValueError),
    (dict(channels=32, memory_size=2.5), TypeError),
])
def test_memory_rejects_bad_construction(kwargs, error):
    with pytest.raises(error):
        MemoryAugmentedAttention(**kwargs)


@pytest.mark.parametrize("x, error", [
    (torch.randn(B, C + 2, H, W), ValueError),
    (torch.randn(B, T, C, H, W), ValueError),
    (torch.randint(0, 9, (B, C, H, W)), TypeError),
])
def test_memory_rejects_bad_input(x, error):
    with pytest.raises(error):
        _memory()(x)
