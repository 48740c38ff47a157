"""DKSAN's layers (vsr_kernels.nn.dksan): a fresh DeformKernelConv2d is a depthwise convolution
with the centre crop of its scope; the layers are the functional ops they claim; shapes,
gradients to every parameter, dtypes (bfloat16 on CPU), devices (meta), backend passthrough.
Tiny shapes."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from vsr_kernels import nn as vnn
from vsr_kernels import reference


@pytest.fixture(autouse=True)
def _quiet():
    # Tiny convolutions on a shared 2-core machine: one thread avoids oversubscription stalls.
    # backend="auto" falls back to the reference (with a warning) where the C++ kernel is missing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "vsr_kernels.* falls back to the slow reference", RuntimeWarning)
        yield
    torch.set_num_threads(threads)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _wake(module, std=0.1, seed=1):
    """Non-zero kernel-offset / offset predictors, so the sampling is not at the regular grid."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, vnn.DeformKernelConv2d):
            torch.nn.init.normal_(m.conv_kernel_offset.weight, std=std)
            torch.nn.init.normal_(m.conv_kernel_offset.bias, std=std)
        elif isinstance(m, vnn.DCNv2Pack):
            torch.nn.init.normal_(m.conv_offset.weight, std=std)
    return module


@pytest.mark.parametrize("C,kernel_size,scope_size,stride,padding,dilation,groups,bias", [
    (4, 3, 5, 1, None, 1, 1, True),
    (4, 3, 3, 1, 1, 1, 2, False),          # scope = kernel
    (6, 3, 7, 2, 1, 1, 3, True),           # stride 2, larger scope, 3 kernel groups
    (4, (3, 1), (5, 3), 1, None, 2, 4, True),  # rectangular, dilation 2
])
def test_fresh_deform_kernel_conv2d_is_a_depthwise_conv_of_the_centre_crop(C, kernel_size, scope_size, stride,
                                                                           padding, dilation, groups, bias):
    layer = vnn.DeformKernelConv2d(C, kernel_size, scope_size, stride, padding, dilation,
                                   kernel_groups=groups, bias=bias).double()
    assert not layer.conv_kernel_offset.weight.any() and not layer.conv_kernel_offset.bias.any()
    assert layer.weight.shape == (C, 1, *_pair(scope_size))
    assert (layer.bias is not None) == bias
    x = _rand(2, C, 7, 8)
    kh, kw = layer.kernel_size
    Sh, Sw = layer.scope_size
    crop = layer.weight[:, :, (Sh - kh) // 2:(Sh - kh) // 2 + kh, (Sw - kw) // 2:(Sw - kw) // 2 + kw]
    torch.testing.assert_close(layer.centre_kernel(), crop)
    want = F.conv2d(x, crop, layer.bias, layer.stride, layer.padding, layer.dilation, groups=C)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_deform_kernel_conv2d_is_the_functional_op_with_predicted_kernel_offsets():
    layer = _wake(vnn.DeformKernelConv2d(4, 3, 5, kernel_groups=2, offset_channels=3).double(), std=0.5)
    x, cond = _rand(2, 4, 6, 5), _rand(2, 3, 6, 5, seed=1)
    kernel_offset = layer.conv_kernel_offset(cond)
    assert kernel_offset.shape == (2, 2 * 2 * 9, 6, 5)
    want = reference.deform_kernel_conv2d(x, layer.weight, kernel_offset, 3, None, None, layer.bias, 1, 1, 1)
    torch.testing.assert_close(layer(x, cond=cond), want)
    # Without cond the offsets come from the input itself (offset_channels = channels).
    own = _wake(vnn.DeformKernelConv2d(4, 3, 5).double(), std=0.5)
    want = reference.deform_kernel_conv2d(x, own.weight, own.conv_kernel_offset(x), 3, None, None, own.bias,
                                          1, 1, 1)
    torch.testing.assert_close(own(x), want)


def test_a_whole_pixel_kernel_offset_reads_the_shifted_crop():
    layer = vnn.DeformKernelConv2d(3, 3, 5, bias=False).double()
    with torch.no_grad():  # every tap: dky = +1, dkx = -1
        layer.conv_kernel_offset.bias.view(9, 2).copy_(torch.tensor([1.0, -1.0]))
    x = _rand(1, 3, 5, 6)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight[:, :, 2:5, 0:3], padding=1, groups=3))


def test_input_offset_and_mask_pass_through():
    # Zero kernel offsets: the depthwise deformable convolution of the centre crop.
    layer = vnn.DeformKernelConv2d(4, 3, 5, stride=(1, 2)).double()
    x = _rand(2, 4, 6, 7)
    offset = _rand(2, 2 * 2 * 9, 6, 4, seed=2)  # 2 offset groups
    mask = torch.rand(2, 2 * 9, 6, 4, dtype=torch.float64)
    want = reference.deform_conv2d(x, offset, layer.centre_kernel(), layer.bias, (1, 2), 1, 1, mask)
    torch.testing.assert_close(layer(x, offset, mask), want)
    want = reference.deform_conv2d(x, offset, layer.centre_kernel(), layer.bias, (1, 2), 1, 1)
    torch.testing.assert_close(layer(x, offset), want)
    # And with kernel offsets too, the functional op with all of them.
    _wake(layer, std=0.5)
    kernel_offset = layer.conv_kernel_offset(x)
    want = reference.deform_kernel_conv2d(x, layer.weight, kernel_offset, 3, offset, mask, layer.bias,
                                          (1, 2), 1, 1)
    torch.testing.assert_close(layer(x, offset, mask), want)


def test_deform_kernel_conv2d_bad_arguments():
    with pytest.raises(ValueError, match="kernel_groups"):
        vnn.DeformKernelConv2d(4, kernel_groups=3)
    with pytest.raises(ValueError, match="scope_size"):
        vnn.DeformKernelConv2d(4, 5, 3)
    with pytest.raises(ValueError, match="backend"):
        vnn.DeformKernelConv2d(4, backend="fast")
    with pytest.raises(ValueError, match="channels = 4"):
        vnn.DeformKernelConv2d(4)(torch.rand(1, 5, 4, 4))
    with pytest.raises(ValueError, match="offset_channels = 2"):
        vnn.DeformKernelConv2d(4, offset_channels=2)(torch.rand(1, 4, 4, 4), cond=torch.rand(1, 2, 4, 3))


def _params_all_get_gradients(module, out):
    out.square().mean().backward()
    missing = [name for name, p in module.named_parameters() if p.grad is None]
    assert not missing, missing
    for name, p in module.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # Every parameter of the deformable layers moves (a ReLU elsewhere may zero a gradient).
    for m in module.modules():
        if isinstance(m, (vnn.DeformKernelConv2d, vnn.DCNv2Pack)):
            for name, p in m.named_parameters():
                assert p.grad.abs().sum() > 0, name


def test_dkc_align_fresh_formula_shapes_and_gradients():
    align = vnn.DKCAlign(4, kernel_groups=2, deformable_groups=2).double()
    nbr, ref = _rand(2, 4, 6, 5), _rand(2, 4, 6, 5, seed=1)
    # Fresh: a depthwise conv of the centre crop, then DCNv2Pack at the regular grid with mask 1/2.
    dk = F.conv2d(nbr, align.dkconv.centre_kernel(), align.dkconv.bias, padding=1, groups=4)
    dk = F.leaky_relu(dk, 0.1)
    want = F.leaky_relu(0.5 * F.conv2d(dk, align.dcn_pack.weight, padding=1)
                        + align.dcn_pack.bias[:, None, None], 0.1)
    torch.testing.assert_close(align(nbr, ref), want)
    _wake(align)
    out = align(nbr, ref)
    assert out.shape == (2, 4, 6, 5)
    # The offsets depend on the reference: another reference moves the output.
    assert not torch.allclose(align(nbr, ref + 1), out)
    _params_all_get_gradients(align, out)
    with pytest.raises(ValueError, match="same shape"):
        align(nbr, ref[:, :, :5])
    with pytest.raises(ValueError, match="num_feat"):
        align(nbr[:, :3], ref[:, :3])


@pytest.mark.parametrize("light", [False, True])
def test_dksa_fresh_formula_shapes_and_gradients(light):
    dksa = (vnn.DeformKernelSpatialAttention.light(4) if light else
            vnn.DeformKernelSpatialAttention(4, num_layers=3)).double()
    assert len(dksa.dk_layers) == (1 if light else 3)
    x = _rand(2, 4, 5, 6)
    a = F.leaky_relu(dksa.conv(x), 0.1)
    for i, layer in enumerate(dksa.dk_layers):
        a = F.conv2d(a, layer.centre_kernel(), layer.bias, padding=1, groups=4)
        a = F.leaky_relu(a, 0.1) if i + 1 < len(dksa.dk_layers) else a
    torch.testing.assert_close(dksa(x), x * torch.sigmoid(a))
    att = dksa.attention(x)
    assert att.shape == x.shape and ((att > 0) & (att < 1)).all()
    _wake(dksa)
    out = dksa(x)
    assert out.shape == x.shape
    _params_all_get_gradients(dksa, out)
    with pytest.raises(ValueError, match="channels"):
        dksa(_rand(1, 3, 4, 4))


def test_rcab_and_reconstruction_module():
    ca = vnn.ChannelAttention(8, reduction=4).double()
    x = _rand(2, 8, 4, 5)
    w = torch.sigmoid(ca.excite(torch.relu(ca.squeeze(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(ca(x), x * w)
    rcab = vnn.ResidualChannelAttentionBlock(8, 4).double()
    torch.testing.assert_close(rcab(x), x + rcab.attention(rcab.conv2(torch.relu(rcab.conv1(x)))))
    rec = _wake(vnn.DKSAReconstruction(8, num_blocks=2, reduction=4, kernel_groups=2).double())
    assert len(rec.blocks) == 2 and len(rec.dksa.dk_layers) == 2
    torch.testing.assert_close(rec(x), x + rec.dksa(rec.blocks(x)))
    _params_all_get_gradients(rec, rec(x))
    assert len(vnn.DKSAReconstruction(8, light=True).dksa.dk_layers) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_on_cpu(dtype):
    torch.manual_seed(0)
    align = _wake(vnn.DKCAlign(8, deformable_groups=2, kernel_groups=2))
    dksa = _wake(vnn.DeformKernelSpatialAttention(8))
    nbr, ref = _rand(1, 8, 6, 6, dtype=torch.float32), _rand(1, 8, 6, 6, seed=1, dtype=torch.float32)
    want = dksa(align(nbr, ref)).detach()
    align.to(dtype), dksa.to(dtype)
    out = dksa(align(nbr.to(dtype), ref.to(dtype)))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, rtol=0.1, atol=0.1)
    out.float().sum().backward()
    for module in (align, dksa):
        for name, p in module.named_parameters():
            assert p.grad.dtype == dtype and torch.isfinite(p.grad.float()).all(), name


def test_cpu_autocast():
    dksa = _wake(vnn.DeformKernelSpatialAttention(4))
    x = _rand(1, 4, 5, 5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dksa(x)
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert dksa.dk_layers[0].weight.grad is not None


def test_layers_follow_the_device():
    """Meta tensors stand in for any other device."""
    x = torch.empty(1, 8, 6, 5, device="meta")
    align = vnn.DKCAlign(8, deformable_groups=2, warn_offset=False).to("meta")  # the warning reads a value
    dksa = vnn.DeformKernelSpatialAttention(8).to("meta")
    out = dksa(align(x, x))
    assert out.device.type == "meta" and out.shape == (1, 8, 6, 5)
    layer = vnn.DeformKernelConv2d(8, stride=2).to("meta")
    assert layer(x).shape == (1, 8, 3, 3)


def test_backend_argument_reaches_every_op():
    align = vnn.DKCAlign(4, deformable_groups=2, backend="reference")
    rec = vnn.DKSAReconstruction(4, num_blocks=1, reduction=2, backend="reference")
    for module in (align, rec):
        layers = [m for m in module.modules()
                  if isinstance(m, (vnn.DeformKernelConv2d, vnn.ModulatedDeformConv2d))]
        assert layers and all(m.backend == "reference" for m in layers)
    # The same parameters on "auto" compute the same.
    auto_align = vnn.DKCAlign(4, deformable_groups=2)
    auto_align.load_state_dict(_wake(align).state_dict())
    nbr, ref = _rand(1, 4, 5, 5, dtype=torch.float32), _rand(1, 4, 5, 5, seed=1, dtype=torch.float32)
    torch.testing.assert_close(auto_align(nbr, ref), align(nbr, ref), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        vnn.DeformKernelSpatialAttention(4, backend="fast")


def test_deform_kernel_conv2d_traces_without_graph_breaks():
    layer = _wake(vnn.DeformKernelConv2d(4, 3, 5))
    x = torch.rand(1, 4, 5, 5)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "reference", "cuda", "triton"])
def test_layers_on_cuda_match_cpu(backend):
    from vsr_kernels.ops import _backend

    device = torch.device("cuda")
    for op in ("deform_kernel_conv2d", "deform_conv2d"):
        if backend != "auto" and _backend.unavailable(op, backend, device):
            pytest.skip(f"{op}: {_backend.unavailable(op, backend, device)}")
    torch.manual_seed(0)
    align = _wake(vnn.DKCAlign(8, deformable_groups=2, kernel_groups=2, backend=backend))
    dksa = _wake(vnn.DeformKernelSpatialAttention(8, backend=backend))
    nbr, ref = _rand(2, 8, 9, 7, dtype=torch.float32), _rand(2, 8, 9, 7, seed=1, dtype=torch.float32)
    want = dksa(align(nbr, ref))
    want.square().sum().backward()
    want_grads = [p.grad.clone() for m in (align, dksa) for p in m.parameters()]
    align.zero_grad(), dksa.zero_grad()
    align.to(device), dksa.to(device)
    got = dksa(align(nbr.to(device), ref.to(device)))
    got.square().sum().backward()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    got_grads = [p.grad.cpu() for m in (align, dksa) for p in m.parameters()]
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dksa(align(nbr.to(device), ref.to(device)))
    assert torch.isfinite(out.float()).all()
