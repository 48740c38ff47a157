"""vsr_kernels.nn.ImplicitWarp against a step-by-step re-statement of IART's ImplicitWarpModule,
its shapes, gradients and argument checks; the example network ImplicitAlignmentVSR."""
import math

import pytest
import torch

from vsr_kernels.models import ImplicitAlignmentVSR
from vsr_kernels.nn import ImplicitWarp
from vsr_kernels.nn.iart import cell_encoding


# --- IART's arithmetic, restated here from kai422/IART archs/implicit_alignment.py --------------
# (ImplicitWarpModule with pe_dim = dim, pe_wrp = pe_x = True, warp_padding = 'duplicate',
# qkv_bias = True, qk_scale = None, aux_loss_out = False: the configuration IART's network uses.)
# Differences kept on purpose: the device follows the inputs (IART hard-codes 'cuda' for the
# offset encoding's frequencies and computes them in float32), and `first_cell` (IART: 0)
# lets w = 3 be compared with the op's centred window.

def _official_window_encoding(window_size, num_pos_feats, temperature, dtype):
    """get_sine_position_encoding(window, pe_dim // 2, temperature, normalize=True): (1, w*w, pe_dim)."""
    scale = 2 * math.pi
    not_mask = torch.ones([1, window_size, window_size], dtype=dtype)
    y_embed = not_mask.cumsum(1, dtype=dtype) - 1
    x_embed = not_mask.cumsum(2, dtype=dtype) - 1
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_embed = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
    return pos_embed.flatten(2).permute(0, 2, 1).contiguous()


def _official_points_encoding(points, num_pos_feats, temperature, window_size):
    """get_sine_position_encoding_points(offsets (n, hw, 2), pe_dim // 2, temperature, normalize=True)."""
    scale = 2 * math.pi
    y_embed, x_embed = points[:, :, 0].unsqueeze(0), points[:, :, 1].unsqueeze(0)
    eps = 1e-6
    y_embed = y_embed / (window_size + eps) * scale
    x_embed = x_embed / (window_size + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=points.dtype, device=points.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).squeeze(0)


def official_implicit_warp(module, y, x, flow, first_cell=0):
    """ImplicitWarpModule.forward(y, x, flow.permute(0, 2, 3, 1)) with the weights of `module`.

    y: frame to be propagated (keys, values); x: frame propagated to (queries); flow (n, 2, h, w).
    """
    flow = flow.permute(0, 2, 3, 1)  # IART's frame_alignment passes (n, h, w, 2), last dim (dx, dy)
    window = module.window_size
    num_values = window * window
    pe_dim = dim = module.dim
    num_heads = module.num_heads
    scale = (dim // num_heads) ** -0.5
    position_bias = _official_window_encoding(window, pe_dim // 2, module.pe_temperature, x.dtype)
    grid_h, grid_w = torch.meshgrid(torch.arange(first_cell, first_cell + window),
                                    torch.arange(first_cell, first_cell + window), indexing="ij")
    window_idx_offset = torch.stack((grid_h, grid_w), 2).reshape(num_values, 2)

    n, c, h, w = x.size()
    grid_h, grid_w = torch.meshgrid(torch.arange(0, h, dtype=x.dtype), torch.arange(0, w, dtype=x.dtype),
                                    indexing="ij")
    grid = torch.stack((grid_h, grid_w), 2).repeat(n, 1, 1, 1)
    grid_wrp = grid + flow.flip(dims=(-1,))
    grid_wrp_flr = torch.floor(grid_wrp).int()
    grid_wrp_off = grid_wrp - grid_wrp_flr
    grid_wrp_flr = grid_wrp_flr.reshape(n, h * w, 2)
    grid_wrp_off = grid_wrp_off.reshape(n, h * w, 2)
    grid_wrp = grid_wrp_flr.unsqueeze(2).repeat(1, 1, num_values, 1) + window_idx_offset
    grid_wrp = grid_wrp.reshape(n, h * w * num_values, 2)
    idx0 = grid_wrp[:, :, 0].clamp(min=0, max=h - 1)
    idx1 = grid_wrp[:, :, 1].clamp(min=0, max=w - 1)
    # gather_hw
    lin_idx = idx1 + y.size(-1) * idx0
    flat = y.contiguous().view(-1, y.size(1), y.size(2) * y.size(3))
    wrp = flat.gather(-1, lin_idx.unsqueeze(1).repeat(1, flat.size(1), 1))
    wrp = wrp.reshape(n, c, h * w, num_values).permute(0, 2, 3, 1).reshape(n, h * w * num_values, c)

    wrp = wrp.repeat(1, 1, pe_dim // c) + position_bias.repeat(n, h * w, 1)
    x = x.flatten(2).permute(0, 2, 1)
    x_pe = _official_points_encoding(grid_wrp_off, pe_dim // 2, module.pe_temperature, window)
    x = x.repeat(1, 1, pe_dim // c) + x_pe

    nhw = n * h * w
    kw = module.k(wrp).reshape(nhw, num_values, num_heads, dim // num_heads).permute(0, 2, 1, 3)
    vw = module.v(wrp).reshape(nhw, num_values, num_heads, dim // num_heads).permute(0, 2, 1, 3)
    qx = module.q(x).reshape(nhw, num_heads, dim // num_heads).unsqueeze(1).permute(0, 2, 1, 3)
    attn = (qx * scale) @ kw.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    out = (attn @ vw).transpose(1, 2).reshape(nhw, 1, dim).squeeze(1)
    return out.reshape(n, h, w, dim).permute(0, 3, 1, 2)


# --- tests ----------------------------------------------------------------------------------------

def _inputs(B, C, H, W, seed=0, dtype=torch.float64, flow_scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(B, C, H, W, generator=generator, dtype=dtype)
    current = torch.randn(B, C, H, W, generator=generator, dtype=dtype)
    flow = torch.randn(B, 2, H, W, generator=generator, dtype=dtype) * flow_scale
    return reference, current, flow


def _layer(dim, heads, window, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ImplicitWarp(dim, heads, window, **kwargs)


@pytest.mark.parametrize("dim,heads,window,first_cell,shape", [
    (8, 1, 2, 0, (2, 5, 6)),
    (16, 4, 2, 0, (1, 4, 7)),
    (12, 3, 2, 0, (1, 1, 5)),
    (8, 2, 1, 0, (2, 3, 3)),
    (8, 2, 3, -1, (1, 5, 4)),  # odd windows: IART's starts at the floor, the op's is centred
])
def test_matches_official_arithmetic(dim, heads, window, first_cell, shape):
    B, H, W = shape
    layer = _layer(dim, heads, window).double()
    reference, current, flow = _inputs(B, dim, H, W, flow_scale=3.0)
    flow[:, :, 0, 0] = torch.tensor([1.0, -2.0], dtype=torch.float64)  # exactly integer
    flow[0, :, -1, -1] = torch.tensor([40.0, -35.5], dtype=torch.float64)  # far outside
    got = layer(reference, current, flow)
    expected = official_implicit_warp(layer, reference, current, flow, first_cell)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_odd_window_differs_from_official_start():
    """w = 3: the op's window is centred on the floor; IART's official one starts there."""
    layer = _layer(8, 2, 3).double()
    reference, current, flow = _inputs(1, 8, 5, 5, seed=1)
    got = layer(reference, current, flow)
    assert not torch.allclose(got, official_implicit_warp(layer, reference, current, flow, first_cell=0))


def test_cell_encoding_matches_official():
    for window in (1, 2, 3):
        expected = _official_window_encoding(window, 8, 0.01, torch.float64)[0]
        torch.testing.assert_close(cell_encoding(window, 16, 0.01), expected, rtol=1e-12, atol=1e-12)


def test_shapes_and_gradients():
    layer = _layer(8, 2, 2)
    reference, current, flow = _inputs(2, 8, 5, 6, dtype=torch.float32)
    reference.requires_grad_(True)
    current.requires_grad_(True)
    flow.requires_grad_(True)
    out = layer(reference, current, flow)
    assert out.shape == (2, 8, 5, 6) and out.dtype == torch.float32 and out.isfinite().all()
    out.square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert reference.grad.abs().sum() > 0 and current.grad.abs().sum() > 0
    assert flow.grad is None


def test_encodings_are_not_saved():
    layer = _layer(8, 2, 2)
    assert set(layer.state_dict()) == {"q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias"}


def test_loads_official_state_dict():
    """An ImplicitWarpModule(dim, pe_dim=dim) checkpoint: q/k/v, plus two derived buffers."""
    source = _layer(8, 2, 2, seed=3)
    official = dict(source.state_dict())
    official["position_bias"] = _official_window_encoding(2, 4, 0.01, torch.float32)
    official["window_idx_offset"] = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    layer = _layer(8, 2, 2, seed=4)
    layer.load_state_dict(official)  # strict
    for name, tensor in source.state_dict().items():
        assert torch.equal(layer.state_dict()[name], tensor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_module_runs(dtype):
    layer = _layer(8, 2, 2)
    reference, current, flow = _inputs(1, 8, 4, 5, dtype=torch.float32)
    expected = layer(reference, current, flow)
    got = layer.to(dtype)(reference.to(dtype), current.to(dtype), flow)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0.1, atol=0.1)


def test_autocast_cpu():
    layer = _layer(8, 2, 2)
    reference, current, flow = _inputs(1, 8, 4, 5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(reference, current, flow)
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_nonfinite_flow_gives_nan_at_that_pixel_only():
    layer = _layer(8, 2, 2).double()
    reference, current, flow = _inputs(1, 8, 4, 5)
    flow[0, 0, 2, 3] = math.nan
    out = layer(reference, current, flow)
    assert out[0, :, 2, 3].isnan().all()
    out[0, :, 2, 3] = 0
    assert out.isfinite().all()


BAD_LAYER = [
    (dict(dim=6, num_heads=2), ValueError, "dim must be a multiple of 4"),
    (dict(dim=8, num_heads=3), ValueError, "num_heads = 3"),
    (dict(dim=8, num_heads=0), ValueError, "num_heads must be an integer >= 1"),
    (dict(dim=8, num_heads=2, window_size=0), ValueError, "window_size must be an integer >= 1"),
    (dict(dim=8, num_heads=2, pe_temperature=0.0), ValueError, "pe_temperature must be > 0"),
    (dict(dim=8, num_heads=2, backend="fast"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_LAYER)
def test_bad_layer_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ImplicitWarp(**kwargs)


def test_bad_forward_arguments():
    layer = _layer(8, 2, 2)
    reference, current, flow = _inputs(1, 8, 4, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="reference must have C = dim = 8"):
        layer(reference[:, :4], current, flow)
    with pytest.raises(ValueError, match="current must have the shape of reference"):
        layer(reference, current[..., :4], flow)
    with pytest.raises(ValueError, match=r"flow must have shape \(B, 2, H, W\)"):
        layer(reference, current, flow[:, :1])
    with pytest.raises(ValueError, match="flow must be 4-D"):
        layer(reference, current, flow[0])
    with pytest.raises(TypeError, match="reference must be a torch.Tensor"):
        layer(None, current, flow)
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        _layer(8, 2, 2, backend="cuda")(reference, current, flow)


# --- the example network -----------------------------------------------------------------------------

def _clip(B=1, T=3, H=8, W=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    frames = torch.rand(B, T, 3, H, W, generator=generator)
    forward_flows = torch.randn(B, T - 1, 2, H, W, generator=generator)
    backward_flows = torch.randn(B, T - 1, 2, H, W, generator=generator)
    return frames, forward_flows, backward_flows


def test_model_training_step():
    torch.manual_seed(0)
    model = ImplicitAlignmentVSR.small()
    frames, forward_flows, backward_flows = _clip()
    sr = model(frames, forward_flows, backward_flows)
    assert sr.shape == (1, 3, 3, 32, 32) and sr.isfinite().all()
    target = torch.nn.functional.interpolate(frames.flatten(0, 1), scale_factor=4, mode="bicubic",
                                             align_corners=False).unflatten(0, (1, 3))
    loss = (sr - target).abs().mean()
    loss.backward()
    for parameter in (model.extract[0].weight, model.align.q.weight, model.align.k.weight,
                      model.align.v.bias, model.backward_trunk[0].weight, model.forward_trunk[0].weight,
                      model.upsample[-1].weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_model_single_frame_and_bad_flows():
    torch.manual_seed(0)
    model = ImplicitAlignmentVSR.small(window_size=3)
    frames, forward_flows, backward_flows = _clip(T=1, H=5, W=6)
    assert model(frames, forward_flows, backward_flows).shape == (1, 1, 3, 20, 24)
    frames, forward_flows, backward_flows = _clip(T=3)
    with pytest.raises(ValueError, match=r"backward_flows must have shape \(B, T - 1, 2, H, W\)"):
        model(frames, forward_flows, backward_flows[:, :1])
    with pytest.raises(ValueError, match="frames must have C = in_channels = 3"):
        model(frames[:, :, :2], forward_flows, backward_flows)


def test_layer_and_model_follow_the_device():
    """Meta tensors stand in for any other device (IART's module hard-codes 'cuda')."""
    layer = _layer(8, 2, 2).to("meta")
    features = torch.empty(1, 8, 4, 5, device="meta")
    assert layer(features, features, torch.empty(1, 2, 4, 5, device="meta")).device.type == "meta"
    model = ImplicitAlignmentVSR.small().to("meta")
    flows = torch.empty(1, 1, 2, 4, 5, device="meta")
    assert model(torch.empty(1, 2, 3, 4, 5, device="meta"), flows, flows).shape == (1, 2, 3, 16, 20)
