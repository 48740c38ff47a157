"""What only the Triton backend of deform_kernel_conv2d has (the op's properties on every backend
are in tests/test_deform_kernel_conv2d.py):

- every config the ops launch is one that compile_all compiles (tests/test_gpu_build.py), over
  channel counts, offset / kernel groups (segments of every length), scopes and dtypes;
- the input gradient's gather by sorted sample cells: many samples in one cell (every tap of
  every pixel reading the same point) and the no-offset path, against the float64 reference.
"""
import importlib.util

import pytest
import torch

import vsr_kernels
from vsr_kernels import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _module():
    from vsr_kernels.triton import deform_kernel_conv2d
    return deform_kernel_conv2d


def test_launches_only_listed_configs(monkeypatch):
    T = _module()
    launched = set()
    monkeypatch.setattr(T, "launch", lambda config, grid, *args, dtype: launched.add(config))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for C, G, Gk in ((1, 1, 1), (2, 2, 1), (6, 2, 3), (8, 1, 2), (12, 3, 1), (64, 1, 1), (64, 8, 8)):
            for scope, has_offset in (((3, 3), True), ((5, 5), False), ((8, 8), True), ((1, 1), False)):
                kh = min(scope[0], 3)
                x = torch.zeros(1, C, 4, 4, dtype=dtype)
                w = torch.zeros(C, 1, *scope, dtype=dtype)
                ko = torch.zeros(1, 2 * Gk * kh * kh, 4, 4, dtype=dtype)
                off = torch.zeros(1, 2 * G * kh * kh, 4, 4, dtype=dtype) if has_offset else None
                m = torch.zeros(1, G * kh * kh, 4, 4, dtype=dtype)
                geometry = ([kh, kh], [1, 1], [kh // 2, kh // 2], [1, 1])
                out = T.deform_kernel_conv2d(x, w, ko, off, m, None, *geometry)
                T.deform_kernel_conv2d_backward(out, x, w, ko, off, m, None, *geometry)
    assert launched <= set(T.all_launch_configs())
    assert {c.kernel for c in launched} == set(T.KERNELS)


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    return [out, *torch.autograd.grad(out, present, grad_out)]


@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "grid"])
def test_colliding_samples_gather_in_sorted_order(with_offset):
    """Every tap of every pixel samples the input at (1.25, 2.5) (one cell, 3 * 3 * 9 samples), or
    the regular grid: the input gradient gathers them all, as the reference scatters them."""
    gen = torch.Generator().manual_seed(0)
    B, C, H, W, k = 1, 2, 3, 3, 3
    opts = dict(dtype=torch.float64)
    x = torch.randn(B, C, H, W, generator=gen, **opts)
    w = torch.randn(C, 1, 5, 5, generator=gen, **opts)
    ko = 0.5 * torch.randn(B, 2 * k * k, H, W, generator=gen, **opts)
    m = torch.rand(B, k * k, H, W, generator=gen, **opts)
    off = None
    if with_offset:
        oy = torch.arange(H, **opts).view(H, 1) - 1 + torch.arange(k, **opts).view(k, 1, 1).repeat_interleave(k, 0)
        ox = torch.arange(W, **opts).view(1, W) - 1 + torch.arange(k, **opts).repeat(k).view(k * k, 1, 1)
        off = torch.stack((1.25 - oy.expand(k * k, H, W), 2.5 - ox.expand(k * k, H, W)), 1).reshape(1, -1, H, W)
    tensors = [x, w, ko, off, m, torch.randn(C, generator=gen, **opts)]
    grad_out = torch.randn(B, C, H, W, generator=gen, **opts)

    def triton_fn(*t):
        return vsr_kernels.deform_kernel_conv2d(t[0], t[1], t[2], k, t[3], t[4], t[5], 1, 1, 1, backend="triton")

    def reference_fn(*t):
        return reference.deform_kernel_conv2d(t[0], t[1], t[2], k, t[3], t[4], t[5], 1, 1, 1)

    got = _grads(triton_fn, [t.to(DEVICE) if t is not None else None for t in tensors], grad_out.to(DEVICE))
    want = _grads(reference_fn, tensors, grad_out)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-11, atol=1e-11)
