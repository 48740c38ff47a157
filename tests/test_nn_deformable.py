"""The deformable layers (vsr_kernels.nn.deformable / edvr / zooming_slowmo / megan) and the
Zooming Slow-Mo / MEGAN-style network: formulas against the reference op, BasicSR-shaped
state_dicts, the offset warning, shapes, gradients and a training step, on tiny shapes."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from vsr_kernels import nn as vnn
from vsr_kernels.models import ZoomingSlowMo
from vsr_kernels.reference import deform_conv2d as reference


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions on a shared 2-core machine: one thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_deform_conv2d_module_is_the_functional_op():
    layer = vnn.DeformConv2d(4, 6, 3, stride=(1, 2), padding=1, dilation=1, groups=2).double()
    assert set(layer.state_dict()) == {"weight", "bias"}  # torchvision's parameter names
    assert layer.weight.shape == (6, 2, 3, 3) and layer.bias.shape == (6,)
    x = _rand(2, 4, 6, 7)
    offset = _rand(2, 2 * 9, 6, 4, seed=1)
    mask = torch.rand(2, 9, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x, offset), reference(x, offset, layer.weight, layer.bias, (1, 2), 1, 1))
    torch.testing.assert_close(layer(x, offset, mask),
                               reference(x, offset, layer.weight, layer.bias, (1, 2), 1, 1, mask))
    assert vnn.DeformConv2d(4, 6, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="groups"):
        vnn.DeformConv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="backend"):
        vnn.DeformConv2d(4, 6, 3, backend="fast")


def test_modulated_deform_conv2d_is_the_functional_op_and_initialised_like_basicsr():
    layer = vnn.ModulatedDeformConv2d(4, 4, (3, 1), padding=(1, 0), deformable_groups=2).double()
    bound = 1 / (4 * 3) ** 0.5
    assert layer.weight.abs().max() <= bound and torch.equal(layer.bias, torch.zeros(4, dtype=torch.float64))
    x = _rand(1, 4, 5, 5)
    offset = _rand(1, 2 * 2 * 3, 5, 5, seed=2)
    mask = torch.rand(1, 2 * 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x, offset, mask),
                               reference(x, offset, layer.weight, layer.bias, 1, (1, 0), 1, mask))
    with pytest.raises(ValueError, match="deformable_groups"):
        vnn.ModulatedDeformConv2d(4, 4, 3, deformable_groups=3)


def _basicsr_state_dict(in_channels, out_channels, groups, deformable_groups, seed=0):
    """Random tensors under the key names and shapes of BasicSR's DCNv2Pack (3x3)."""
    return {
        "weight": _rand(out_channels, in_channels // groups, 3, 3, seed=seed),
        "bias": _rand(out_channels, seed=seed + 1),
        "conv_offset.weight": 0.3 * _rand(3 * deformable_groups * 9, in_channels, 3, 3, seed=seed + 2),
        "conv_offset.bias": _rand(3 * deformable_groups * 9, seed=seed + 3),
    }


@pytest.mark.parametrize("groups,deformable_groups", [(1, 1), (1, 2), (2, 4)])
def test_dcnv2pack_loads_a_basicsr_state_dict_and_matches_the_formula(groups, deformable_groups):
    pack = vnn.DCNv2Pack(8, 6, 3, padding=1, groups=groups, deformable_groups=deformable_groups).double()
    state = _basicsr_state_dict(8, 6, groups, deformable_groups)
    assert set(pack.state_dict()) == set(state)
    pack.load_state_dict(state)
    x, feat = _rand(2, 8, 6, 5, seed=10), _rand(2, 8, 6, 5, seed=11)
    # BasicSR's forward: out = conv_offset(feat); o1, o2, mask = chunk(out, 3); offset = cat(o1, o2).
    out = F.conv2d(feat, state["conv_offset.weight"], state["conv_offset.bias"], padding=1)
    n = deformable_groups * 9
    offset, mask = out[:, :2 * n], torch.sigmoid(out[:, 2 * n:])
    want = reference(x, offset, state["weight"], state["bias"], 1, 1, 1, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(pack(x, feat), want)


def test_fresh_dcnv2pack_is_a_half_weighted_convolution():
    # conv_offset is zero-initialised: offsets 0 and mask sigmoid(0) = 1/2.
    pack = vnn.DCNv2Pack(4, 4, 3, padding=1, deformable_groups=2).double()
    assert not pack.conv_offset.weight.any() and not pack.conv_offset.bias.any()
    x, feat = _rand(1, 4, 5, 6), _rand(1, 4, 5, 6, seed=3)
    want = 0.5 * F.conv2d(x, pack.weight, padding=1) + pack.bias[None, :, None, None]
    torch.testing.assert_close(pack(x, feat), want)


def test_dcnv2pack_warns_when_offsets_diverge():
    pack = vnn.DCNv2Pack(2, 2, 3, padding=1).double()
    x = _rand(1, 2, 4, 4)
    with torch.no_grad():
        pack.conv_offset.bias[:18] = 60.0
    with pytest.warns(RuntimeWarning, match="mean absolute offset is 60.0"):
        pack(x, x)
    pack.warn_offset = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pack(x, x)


def _pyramid(B, C, H, W, seed):
    return [_rand(B, C, H >> i, W >> i, seed=seed + i, dtype=torch.float32) for i in range(3)]


def test_pcd_alignment_shapes_gradients_and_backend():
    pcd = vnn.PCDAlignment(num_feat=4, deformable_groups=2)
    for pack in (pcd.cas_dcnpack, *pcd.dcn_pack.values()):  # non-zero offsets, so the sampling matters
        torch.nn.init.normal_(pack.conv_offset.weight, std=0.1)
    nbr, ref = _pyramid(2, 4, 8, 8, 0), _pyramid(2, 4, 8, 8, 5)
    out = pcd(nbr, ref)
    assert out.shape == (2, 4, 8, 8)
    out.square().mean().backward()
    for name, p in pcd.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert pcd.cas_dcnpack.conv_offset.weight.grad.abs().sum() > 0
    reference_pcd = vnn.PCDAlignment(num_feat=4, deformable_groups=2, backend="reference")
    reference_pcd.load_state_dict(pcd.state_dict())
    torch.testing.assert_close(reference_pcd(nbr, ref), out.detach())
    assert all(m.backend == "reference" for m in reference_pcd.modules() if isinstance(m, vnn.DCNv2Pack))
    with pytest.raises(ValueError, match="3 pyramid levels"):
        pcd(nbr[:2], ref)


def test_feature_pyramid_and_feature_temporal_interpolation():
    pyramid = vnn.FeaturePyramid(4)
    levels = pyramid(torch.rand(2, 4, 8, 12))
    assert [tuple(level.shape) for level in levels] == [(2, 4, 8, 12), (2, 4, 4, 6), (2, 4, 2, 3)]
    with pytest.raises(ValueError, match="divisible by 4"):
        pyramid(torch.rand(1, 4, 6, 8))
    fti = vnn.FeatureTemporalInterpolation(4, 2)
    a, b = _pyramid(1, 4, 8, 8, 0), _pyramid(1, 4, 8, 8, 3)
    out = fti(a, b)
    assert out.shape == (1, 4, 8, 8)
    out.sum().backward()
    assert fti.blend[0].weight.grad is not None
    # The blend is convex: equal aligned features give those features back.
    a1 = fti.align_first(a, b).detach()
    with torch.no_grad():
        fti.align_second.load_state_dict(fti.align_first.state_dict())
        same = fti(a, a)
    torch.testing.assert_close(same, fti.align_first(a, a).detach(), rtol=1e-5, atol=1e-6)
    assert a1.shape == out.shape


def test_deformable_conv_lstm_first_step_is_a_conv_lstm_cell():
    lstm = vnn.DeformableConvLSTM(3, 4, deformable_groups=2).double()
    x = _rand(2, 3, 3, 4, 4)
    outputs, (h, c) = lstm(x)
    assert outputs.shape == (2, 3, 4, 4, 4) and h.shape == c.shape == (2, 4, 4, 4)
    torch.testing.assert_close(outputs[:, -1], h)
    # With a zero state, the first step is a plain ConvLSTM cell (nothing to align).
    gates = lstm.gates(torch.cat([x[:, 0], torch.zeros(2, 4, 4, 4, dtype=torch.float64)], 1))
    i, f, g, u = gates.chunk(4, 1)
    c0 = torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(outputs[:, 0], torch.sigmoid(u) * torch.tanh(c0))
    # Continuing from a state equals running the whole sequence.
    first, state = lstm(x[:, :2])
    rest, _ = lstm(x[:, 2:], state)
    torch.testing.assert_close(torch.cat([first, rest], 1), outputs)
    outputs.sum().backward()
    assert lstm.align_h.conv_offset.weight.grad is not None
    with pytest.raises(ValueError, match="input_channels"):
        lstm(_rand(1, 2, 5, 4, 4))


def test_bidirectional_conv_lstm_is_symmetric_under_time_reversal():
    bi = vnn.BidirectionalDeformableConvLSTM(3, 4, deformable_groups=2).double()
    x = _rand(1, 3, 3, 4, 4)
    out = bi(x)
    assert out.shape == (1, 3, 4, 4, 4)
    # Swap the two directions (and the halves of the fusion): the output of the reversed clip
    # is the reversed output.
    swapped = vnn.BidirectionalDeformableConvLSTM(3, 4, deformable_groups=2).double()
    swapped.forward_lstm.load_state_dict(bi.backward_lstm.state_dict())
    swapped.backward_lstm.load_state_dict(bi.forward_lstm.state_dict())
    with torch.no_grad():
        swapped.fusion.weight.copy_(torch.cat([bi.fusion.weight[:, 4:], bi.fusion.weight[:, :4]], 1))
        swapped.fusion.bias.copy_(bi.fusion.bias)
    torch.testing.assert_close(swapped(x.flip(1)), out.flip(1))


def test_non_local_residual_block():
    block = vnn.NonLocalResidualBlock(4, inner_channels=4, num_heads=2).double()
    x = _rand(2, 4, 3, 5)
    torch.testing.assert_close(block(x), x)  # W is zero-initialised: the identity
    torch.nn.init.normal_(block.out.weight)
    # Explicit embedded-Gaussian non-local operation, per head.
    q, k, v = (conv(x).view(2, 2, 2, 15) for conv in (block.theta, block.phi, block.g))
    att = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) / 2 ** 0.5, -1)
    y = torch.einsum("bhnm,bhdm->bhdn", att, v).reshape(2, 4, 3, 5)
    torch.testing.assert_close(block(x), x + block.out(y))
    # Frames attend to each other: a change in frame 1 moves frame 0's output.
    clip = _rand(1, 2, 4, 3, 5, seed=4)
    out = block(clip)
    moved = clip.clone()
    moved[:, 1] += 1
    assert out.shape == clip.shape and not torch.allclose(block(moved)[:, 0], out[:, 0])
    sub = vnn.NonLocalResidualBlock(4, sub_sample=True, scale=1.0)
    assert sub(torch.rand(1, 2, 4, 4, 6)).shape == (1, 2, 4, 4, 6)
    with pytest.raises(ValueError, match="channels"):
        block(_rand(1, 3, 4, 4))


def test_zooming_slowmo_forward_backward_and_training_step():
    torch.manual_seed(0)
    model = ZoomingSlowMo.small()
    frames = torch.rand(1, 3, 3, 4, 8)
    out = model(frames)
    assert out.shape == (1, 5, 3, 16, 32) and torch.isfinite(out).all()
    target = torch.rand_like(out)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = F.l1_loss(out, target)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    optimiser.step()
    assert F.l1_loss(model(frames), target).isfinite()
    assert all(m.backend == "auto" for m in model.modules() if isinstance(m, vnn.ModulatedDeformConv2d))


def test_zooming_slowmo_single_frame_autocast_and_bad_inputs():
    model = ZoomingSlowMo.small(nonlocal_blocks=0, backend="reference")
    assert all(m.backend == "reference" for m in model.modules() if isinstance(m, vnn.ModulatedDeformConv2d))
    assert model(torch.rand(2, 1, 3, 4, 4)).shape == (2, 1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 2, 3, 4, 4))
    assert out.shape == (1, 3, 3, 16, 16) and torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(1, 2, 3, 6, 8))
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.rand(1, 2, 1, 4, 4))


def test_dcnv2pack_traces_without_graph_breaks():
    pack = vnn.DCNv2Pack(4, 4, 3, padding=1, deformable_groups=2)
    torch.nn.init.normal_(pack.conv_offset.weight, std=0.1)
    x, feat = torch.rand(1, 4, 5, 5), torch.rand(1, 4, 5, 5)
    compiled = torch.compile(pack, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, feat), pack(x, feat))
