"""The trajectory-aware attention of TTVSR (Learning Trajectory-Aware Transformer for Video
Super-Resolution, Liu et al., CVPR 2022) and the helpers around it.

Frames are cut into s x s tokens (s = stride, 4 in TTVSR) on an (H/s) x (W/s) token grid. A
trajectory map (B, T, 2, H/s, W/s) says, for every token of the current frame, where (x, y
in token units) the trajectory ending there was in each of T earlier key frames.
`update_locations` moves those maps one frame on with the optical flow,
`CrossScaleTokenizer` makes TTVSR's three token scales of a frame, and
`TrajectoryAwareAttention` (TTVSR's LTAM block) lets each token of the current frame keep
its best match on its trajectory, at three scales, through `vsr_kernels.trajectory_attention`.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _checks
from ..ops.trajectory_attention import trajectory_attention


def _stride(stride) -> int:
    stride = _checks.integer("stride", stride, 1)
    if stride % 4:
        # TTVSR's 1.5x and 2x windows (kernel 1.5 s, padding s/4; kernel 2 s, padding s/2) only
        # tile the frame with one window per token when s is a multiple of 4.
        raise ValueError(f"stride must be a positive multiple of 4, got {stride}")
    return stride


def _check_frame(name: str, value, channels=None, stride=None) -> None:
    _checks.tensor(name, value, "BCHW")
    if channels is not None and value.shape[1] != channels:
        raise ValueError(f"{name} must have C = {channels} channels in dim 1, got shape {tuple(value.shape)}")
    if stride is not None and (value.shape[2] % stride or value.shape[3] % stride):
        raise ValueError(f"{name} must have H and W divisible by stride = {stride}, "
                         f"got shape {tuple(value.shape)}")


def identity_locations(batch: int, height: int, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(batch, 1, 2, height, width): every token at its own position (x = column, y = row)."""
    y, x = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                          torch.arange(width, dtype=dtype, device=device), indexing="ij")
    return torch.stack((x, y), 0).expand(batch, 1, 2, height, width)


def update_locations(location: torch.Tensor, flow: torch.Tensor, stride: int,
                     append: bool = True) -> torch.Tensor:
    """TTVSR's trajectory update: moves T trajectory maps from the previous frame to the current one.

    The flow (B, 2, H, W) in pixels, from the current frame to the previous one (channel 0 = x),
    is averaged over each s x s token (s = stride) and divided by s, giving a token-grid flow
    f. Token p = (x, y) of the current frame continues the trajectory that passed token
    p + f(p) of the previous frame, so each map is read there: nearest token (ties to even),
    the position first clamped to the grid (TTVSR's `grid_sample(mode="nearest",
    padding_mode="border")`, without its ulp-level drift at .5 positions, see
    `vsr_kernels.reference.trajectory_attention`). A NaN position gives a NaN location (which
    `trajectory_attention` treats as outside the frame). With `append`, the identity map of
    the current frame is appended as frame T, as TTVSR does when the current frame becomes a
    key frame.

    Args:
        location: (B, T, 2, H/s, W/s) floating point, T >= 0.
        flow: (B, 2, H, W) floating point.
        stride: s, the token side.
        append: append the current frame's identity map.

    Returns:
        (B, T + append, 2, H/s, W/s) in location's dtype. Not differentiable (nearest reads).
    """
    stride = _checks.integer("stride", stride, 1)
    _checks.tensor("location", location, "BT2HW")
    _checks.tensor("flow", flow, "B2HW")
    B, T, _, h, w = location.shape
    if location.shape[2] != 2:
        raise ValueError(f"location must have 2 channels (x, y) in dim 2, got shape {tuple(location.shape)}")
    if flow.shape[1] != 2:
        raise ValueError(f"flow must have 2 channels (x, y) in dim 1, got shape {tuple(flow.shape)}")
    if flow.shape[0] != B or flow.shape[2] != h * stride or flow.shape[3] != w * stride:
        raise ValueError(f"flow must have shape ({B}, 2, {h * stride}, {w * stride}) (location of shape "
                         f"{tuple(location.shape)} times stride {stride}), got {tuple(flow.shape)}")
    if flow.device != location.device:
        raise ValueError(f"flow must be on the device of location ({location.device}), got {flow.device}")
    with torch.no_grad():
        token_flow = F.avg_pool2d(flow.detach(), stride) / stride  # (B, 2, h, w)
        grid = identity_locations(1, h, w, token_flow.dtype, flow.device)[:, 0]
        position = grid + token_flow
        px, py = position[:, 0], position[:, 1]
        nan = px.isnan() | py.isnan()
        # clamp to the border, then round to the nearest token, ties to even
        col = torch.round(px.clamp(0, max(w - 1, 0))).nan_to_num(0).long()
        row = torch.round(py.clamp(0, max(h - 1, 0))).nan_to_num(0).long()
        source = (row * w + col).view(B, 1, 1, h * w).expand(B, T, 2, h * w)
        moved = location.detach().flatten(3).gather(3, source).view(B, T, 2, h, w)
        moved = moved.masked_fill(nan.view(B, 1, 1, h, w), float("nan"))
        if append:
            ident = identity_locations(B, h, w, location.dtype, location.device)
            moved = torch.cat((moved, ident), 1)
    return moved


class CrossScaleTokenizer(nn.Module):
    """TTVSR's three token scales of a feature map, all on the same (H/s) x (W/s) token grid.

    Scale 1: the s x s blocks (F.unfold kernel s, stride s), token channel c*s*s + ky*s + kx.
    Scale 2: the 1.5s x 1.5s window around each block (padding s/4, zeros outside), laid out
    tile by tile, average-pooled back to the frame size (F.adaptive_avg_pool2d) and cut into
    s x s blocks: each token is its 1.5s window resized to s x s.
    Scale 3: the same with a 2s x 2s window (padding s/2) and 2 x 2 average pooling.
    `fold` is the inverse of scale 1 (tokens back to the frame).

    Args:
        stride: s, a multiple of 4 (4 in TTVSR).

    Shapes:
        forward(x (B, C, H, W)) -> three (B, C*s*s, H/s, W/s) token maps (scales 1, 2, 3)
        unfold(x (B, C, H, W)) -> (B, C*s*s, H/s, W/s), scale 1 only
        fold(tokens (B, C*s*s, h, w)) -> (B, C, h*s, w*s)
    """

    def __init__(self, stride: int = 4):
        super().__init__()
        self.stride = _stride(stride)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        _check_frame("x", x, stride=self.stride)
        # pixel_unshuffle lays out the channels as F.unfold does: c*s*s + ky*s + kx
        return F.pixel_unshuffle(x, self.stride)

    def fold(self, tokens: torch.Tensor) -> torch.Tensor:
        _checks.tensor("tokens", tokens, "BDHW")
        if tokens.shape[1] % (self.stride * self.stride):
            raise ValueError(f"tokens must have D = C*{self.stride}*{self.stride} channels in dim 1, "
                             f"got shape {tuple(tokens.shape)}")
        return F.pixel_shuffle(tokens, self.stride)

    def _window_tokens(self, x: torch.Tensor, window: int) -> torch.Tensor:
        s = self.stride
        H, W = x.shape[2:]
        padding = (window - s) // 2
        patches = F.unfold(x, window, padding=padding, stride=s)  # (B, C*window², tokens)
        tiled = F.fold(patches, (H // s * window, W // s * window), window, stride=window)
        return F.pixel_unshuffle(F.adaptive_avg_pool2d(tiled, (H, W)), s)

    def forward(self, x: torch.Tensor):
        s1 = self.unfold(x)
        return s1, self._window_tokens(x, 3 * self.stride // 2), self._window_tokens(x, 2 * self.stride)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class TrajectoryAwareAttention(nn.Module):
    """TTVSR's LTAM block: each token of the current frame attends to the tokens on its trajectory.

    The current frame's feature is cut into s x s query tokens; each keeps, among the T key
    frames, the one whose key token on its trajectory has the highest cosine similarity
    (`vsr_kernels.trajectory_attention`, one index shared by the three value scales). The
    three chosen value tokens are folded back to three C-channel maps, fused by a 3x3 conv
    3C -> C, multiplied by the similarity of the chosen frame (the soft score, constant over
    each token's s x s pixels) and added to the anchor feature (the propagated feature warped
    to the current frame).

    A layer whose trajectories all leave the frame returns the anchor exactly (the score is 0).

    Args:
        channels: C.
        stride: s, the token side, a multiple of 4 (4 in TTVSR).
        backend: passed to `vsr_kernels.trajectory_attention`.

    Shapes:
        tokens(feature (B, C, H, W), propagated (B, C, H, W)) -> (key (B, D, h, w),
            values: three (B, D, h, w)), D = C*s*s, h = H/s, w = W/s: what a key frame adds
            to the memory (keys from its own feature, values from the propagated one).
        forward(feature (B, C, H, W), anchor (B, C, H, W), keys (B, T, D, h, w),
            values: three (B, T, D, h, w), location (B, T, 2, h, w)) -> (B, C, H, W)
    """

    def __init__(self, channels: int, stride: int = 4, backend: str = "auto"):
        super().__init__()
        self.channels = _checks.integer("channels", channels, 1)
        self.stride = _stride(stride)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.backend = backend
        self.tokenizer = CrossScaleTokenizer(stride)
        self.fusion = nn.Conv2d(3 * channels, channels, 3, 1, 1)

    def tokens(self, feature: torch.Tensor, propagated: torch.Tensor):
        _check_frame("feature", feature, self.channels, self.stride)
        _check_frame("propagated", propagated, self.channels, self.stride)
        if propagated.shape != feature.shape:
            raise ValueError(f"propagated must have the shape of feature {tuple(feature.shape)}, "
                             f"got {tuple(propagated.shape)}")
        return self.tokenizer.unfold(feature), self.tokenizer(propagated)

    def forward(self, feature: torch.Tensor, anchor: torch.Tensor, keys: torch.Tensor,
                values: Sequence[torch.Tensor], location: torch.Tensor) -> torch.Tensor:
        _check_frame("feature", feature, self.channels, self.stride)
        _check_frame("anchor", anchor, self.channels, self.stride)
        if anchor.shape != feature.shape:
            raise ValueError(f"anchor must have the shape of feature {tuple(feature.shape)}, "
                             f"got {tuple(anchor.shape)}")
        if isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple)) or len(values) != 3:
            raise TypeError("values must be a list or tuple of the three token scales "
                            "(B, T, C*s*s, H/s, W/s)")
        B, C, H, W = feature.shape
        s = self.stride
        _checks.tensor("keys", keys, "BTDHW")
        expected = (B, C * s * s, H // s, W // s)
        if (keys.shape[0], *keys.shape[2:]) != expected:
            raise ValueError(f"keys must have shape ({B}, T, {C * s * s}, {H // s}, {W // s}) (tokens of "
                             f"feature {tuple(feature.shape)}), got {tuple(keys.shape)}")
        query = self.tokenizer.unfold(feature)
        outs, score, _ = trajectory_attention(query, keys, list(values), location, backend=self.backend)
        aligned = torch.cat([self.tokenizer.fold(out) for out in outs], 1)
        h, w = score.shape[1:]
        soft = score[:, None, :, None, :, None].expand(B, 1, h, s, w, s).reshape(B, 1, H, W)
        return self.fusion(aligned) * soft + anchor

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}, backend={self.backend!r}"


__all__ = ["CrossScaleTokenizer", "TrajectoryAwareAttention", "identity_locations", "update_locations"]
