"""IART's implicit alignment (An Implicit Alignment for Video Super-Resolution, Xu et al.,
CVPR 2024; official code kai422/IART, `ImplicitWarpModule`).

Instead of warping the reference frame's features with bilinear interpolation, every pixel
of the current frame attends to the w x w cells of the reference frame around where its
optical flow points. Sinusoidal positional encodings tell the attention where things are:
the encoding of each window cell is added to the reference features of that cell (keys and
values), the encoding of the flow target's sub-pixel offset from its floor is added to the
current frame's features (queries); then linear q/k/v projections and softmax attention over
the w * w cells, with num_heads heads.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _backend, _checks
from ..ops.flow_guided_window_attention import flow_guided_window_attention
from ..reference.flow_guided_window_attention import coordinate_dtype

# IART's guard against dividing by zero when normalising coordinates.
PE_EPS = 1e-6


def sine_encoding(y: torch.Tensor, x: torch.Tensor, channels: int, temperature: float) -> torch.Tensor:
    """DETR-style sinusoidal encoding of 2-D positions, as IART computes it.

    y, x: tensors of one shape S holding positions already scaled to radians. Returns
    (*S, channels): channels / 2 for y, then channels / 2 for x; within each half, feature
    2i is sin(t / temperature ** (2i / F)) and feature 2i + 1 is cos of the same angle,
    F = channels / 2 (IART's `temperature ** (2 * (j // 2) / F)` for feature j). channels
    must be a multiple of 4.
    """
    features = channels // 2
    # One period per sin/cos pair: temperature ** (2i / F) for pair i.
    pair = torch.arange(0, features, 2, dtype=y.dtype, device=y.device)
    period = temperature ** (pair / features)

    def encode(t):
        angle = t[..., None] / period
        return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)

    return torch.cat((encode(y), encode(x)), dim=-1)


def cell_encoding(window_size: int, channels: int, temperature: float, dtype=torch.float64) -> torch.Tensor:
    """(w * w, channels): the encoding of window cell n = i * w + j (row i, column j, both in
    0 .. w - 1), positions normalised as IART does: i / (w - 1) * 2 pi (0 for w = 1)."""
    index = torch.arange(window_size, dtype=dtype)
    position = index / (window_size - 1 + PE_EPS) * (2 * math.pi)
    y = position.view(window_size, 1).expand(window_size, window_size)
    x = position.view(1, window_size).expand(window_size, window_size)
    return sine_encoding(y, x, channels, temperature).reshape(window_size * window_size, channels)


def offset_encoding(offset_y: torch.Tensor, offset_x: torch.Tensor, window_size: int, channels: int,
                    temperature: float) -> torch.Tensor:
    """(*S, channels): the encoding of sub-pixel offsets in [0, 1), normalised as IART does:
    offset / w * 2 pi."""
    scale = 2 * math.pi / (window_size + PE_EPS)
    return sine_encoding(offset_y * scale, offset_x * scale, channels, temperature)


class ImplicitWarp(nn.Module):
    """IART's implicit alignment of a reference frame's features to the current frame.

    For pixel p of the current frame and flow f(p) (current -> reference), with base =
    floor(p + f(p)) and offset = p + f(p) - base:

        query  = W_q (current(p) + PE_offset(offset)) + b_q
        key_n  = W_k (reference(cell n) + PE_cell(n)) + b_k
        value_n = W_v (reference(cell n) + PE_cell(n)) + b_v
        out(p) = softmax_n(<query, key_n> / sqrt(head_dim)) . value_n      (per head)

    over the w * w cells of the window (w = 2: the four bilinear neighbours of p + f(p);
    odd w: centred on base; replicate border). The keys and values are projected once per
    reference pixel and the projected cell encodings W PE_cell(n) + b enter the fused op
    `flow_guided_window_attention` as key_bias / value_bias, so no windowed copy of the
    features is built.

    As in IART, the encodings have `dim` channels (IART's pe_dim = embed_dim), half for the
    rows and half for the columns, interleaved sin/cos; cells are normalised by (w - 1),
    offsets by w, and the temperature is IART's 0.01 by default.

    Args:
        dim: channels of the features, a multiple of 4 and of num_heads.
        num_heads: attention heads (contiguous channel blocks of dim / num_heads).
        window_size: w >= 1.
        pe_temperature: temperature of the sinusoidal encodings.
        backend: passed to `flow_guided_window_attention`.

    Shapes:
        forward(reference (B, dim, H, W), current (B, dim, H, W), flow (B, 2, H, W)) -> (B, dim, H, W)
        flow: channel 0 = dx, channel 1 = dy, from each current-frame pixel to its match in the
        reference frame (BasicVSR's convention). Pixels with non-finite flow get NaN.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 2, pe_temperature: float = 0.01,
                 backend: str = "auto"):
        super().__init__()
        self.dim = _checks.integer("dim", dim, 4)
        self.num_heads = _checks.integer("num_heads", num_heads, 1)
        if dim % 4 or dim % num_heads:
            raise ValueError(f"dim must be a multiple of 4 (sin/cos pairs for rows and columns) and of "
                             f"num_heads = {num_heads}, got {dim}")
        self.window_size = _checks.integer("window_size", window_size, 1)
        self.pe_temperature = _checks.real("pe_temperature", pe_temperature)
        if not self.pe_temperature > 0:
            raise ValueError(f"pe_temperature must be > 0, got {pe_temperature}")
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        # Derived from the configuration, so not saved with the weights; float64 until the module
        # is cast, so that a float64 module computes it exactly.
        self.register_buffer("cell_pe", cell_encoding(window_size, dim, self.pe_temperature),
                             persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # IART's ImplicitWarpModule saves its window encoding and cell offsets as buffers; here
        # both derive from the configuration. Its q/k/v weights load as they are.
        for name in ("position_bias", "window_idx_offset"):
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check(self, reference, current, flow):
        _checks.tensor("reference", reference, "BCHW")
        _checks.tensor("current", current, "BCHW")
        _checks.tensor("flow", flow, "BCHW")
        if reference.shape[1] != self.dim:
            raise ValueError(f"reference must have C = dim = {self.dim} channels, "
                             f"got shape {tuple(reference.shape)}")
        if current.shape != reference.shape:
            raise ValueError(f"current must have the shape of reference {tuple(reference.shape)}, "
                             f"got shape {tuple(current.shape)}")
        B, _, H, W = reference.shape
        if flow.shape != (B, 2, H, W):
            raise ValueError(f"flow must have shape (B, 2, H, W) = {(B, 2, H, W)}, "
                             f"got shape {tuple(flow.shape)}")
        if flow.device != reference.device or current.device != reference.device:
            raise ValueError(f"reference, current and flow must be on one device, got {reference.device}, "
                             f"{current.device} and {flow.device}")

    def forward(self, reference: torch.Tensor, current: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        self._check(reference, current, flow)
        H, W = reference.shape[-2:]
        # The op floors the same coordinates (float32, float64 for float64 flow).
        coords = flow.detach().to(coordinate_dtype(flow))
        target_y = torch.arange(H, dtype=coords.dtype, device=coords.device).view(H, 1) + coords[:, 1]
        target_x = torch.arange(W, dtype=coords.dtype, device=coords.device).view(1, W) + coords[:, 0]
        offset_pe = offset_encoding(target_y - target_y.floor(), target_x - target_x.floor(),
                                    self.window_size, self.dim, self.pe_temperature)  # (B, H, W, dim)
        query_in = current + offset_pe.permute(0, 3, 1, 2).to(current.dtype)
        query = F.conv2d(query_in, self.q.weight[:, :, None, None], self.q.bias)
        key_value = F.conv2d(reference, torch.cat((self.k.weight, self.v.weight))[:, :, None, None])
        key, value = key_value.split(self.dim, dim=1)
        cell_pe = self.cell_pe.to(self.k.weight.dtype)
        key_bias = F.linear(cell_pe, self.k.weight, self.k.bias)
        value_bias = F.linear(cell_pe, self.v.weight, self.v.bias)
        if key_bias.dtype != key.dtype:  # autocast: the convs ran in another dtype than the linears
            key_bias, value_bias = key_bias.to(key.dtype), value_bias.to(key.dtype)
        return flow_guided_window_attention(query, key, value, flow, self.window_size, self.num_heads,
                                            key_bias, value_bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"pe_temperature={self.pe_temperature}, backend={self.backend!r}")
