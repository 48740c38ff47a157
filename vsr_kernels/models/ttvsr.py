"""A TTVSR-style network (Liu et al., CVPR 2022) built on `TrajectoryAwareAttention`.

Bidirectional recurrent x4 video super-resolution: a feature extractor per frame; a backward
and a forward propagation pass, each warping the propagated feature by the optical flow,
moving the trajectory maps with it (`update_locations`), attending along the trajectories to
the tokens of every key frame seen so far (every `keyframe_stride`-th frame of the pass) and
refining with residual blocks; then fusion of both passes with the frame's feature, two x2
pixel-shuffle upsamplers and a residual over the bilinearly upsampled input.

TTVSR computes its flows with a pretrained SPyNet, which cannot be downloaded here: this
network takes the flows as input, or any callable that estimates them.
"""
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.ttvsr import TrajectoryAwareAttention, identity_locations, update_locations
from ..ops import _checks
from ._blocks import ResidualBlock

FlowEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def zero_flow(reference: torch.Tensor, supporting: torch.Tensor) -> torch.Tensor:
    """A flow estimator for static scenes (and tests): no motion."""
    return reference.new_zeros(reference.shape[0], 2, *reference.shape[2:])


def flow_warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) read at p + flow(p) (flow (N, 2, H, W), x then y, pixels): bilinear, border padding."""
    H, W = x.shape[2:]
    y, xs = torch.meshgrid(torch.arange(H, dtype=flow.dtype, device=flow.device),
                           torch.arange(W, dtype=flow.dtype, device=flow.device), indexing="ij")
    gx = 2.0 * (xs + flow[:, 0]) / max(W - 1, 1) - 1.0
    gy = 2.0 * (y + flow[:, 1]) / max(H - 1, 1) - 1.0
    grid = torch.stack((gx, gy), -1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def residual_blocks(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
    """conv 3x3 in_channels -> channels, LeakyReLU(0.1), then `blocks` residual blocks."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, 1, 1), nn.LeakyReLU(0.1),
                         *(ResidualBlock(channels, small_init=True) for _ in range(blocks)))


class Upsample2x(nn.Module):
    """conv 3x3 in -> 4*out, pixel shuffle x2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, 3, 1, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


class TTVSR(nn.Module):
    """TTVSR-style x4 video super-resolution with trajectory-aware attention.

    Args:
        channels: C, the feature channels (64 in TTVSR).
        blocks: residual blocks of each propagation step (60 in TTVSR).
        extractor_blocks: residual blocks of the per-frame feature extractor (5 in TTVSR).
        stride: token side s, a multiple of 4 (4 in TTVSR).
        keyframe_stride: every keyframe_stride-th frame of a pass joins the attention memory
            (3 in TTVSR).
        upsample_channels: channels after the second upsampler (64 in TTVSR).
        flow_estimator: optional callable (reference (N, 3, H, W), supporting (N, 3, H, W)) ->
            flow (N, 2, H, W) in pixels (x then y) such that pixel p of `reference` shows what
            pixel p + flow(p) of `supporting` shows (SPyNet's convention); used when `forward`
            gets no flows. `zero_flow` is one.
        backend: passed to `vsr_kernels.trajectory_attention`.

    Shapes:
        forward(frames (B, T, 3, H, W), flows=None) -> (B, T, 3, 4H, 4W), H and W multiples of s.
        flows = (forward_flows, backward_flows), each (B, T-1, 2, H, W):
        forward_flows[:, i] from frame i+1 to frame i, backward_flows[:, i] from frame i to i+1.
    """

    def __init__(self, channels: int = 64, blocks: int = 60, extractor_blocks: int = 5, stride: int = 4,
                 keyframe_stride: int = 3, upsample_channels: int = 64,
                 flow_estimator: FlowEstimator | None = None, backend: str = "auto"):
        super().__init__()
        self.channels = _checks.integer("channels", channels, 1)
        self.keyframe_stride = _checks.integer("keyframe_stride", keyframe_stride, 1)
        if flow_estimator is not None and not callable(flow_estimator):
            raise TypeError(f"flow_estimator must be callable, got {type(flow_estimator).__name__}")
        self.flow_estimator = flow_estimator
        extractor_blocks = _checks.integer("extractor_blocks", extractor_blocks, 0)
        self.extractor = residual_blocks(3, channels, extractor_blocks)
        self.attention = TrajectoryAwareAttention(channels, stride, backend)
        self.stride = self.attention.stride
        # shared by both passes, as in TTVSR
        self.propagation = residual_blocks(2 * channels, channels, _checks.integer("blocks", blocks, 0))
        upsample_channels = _checks.integer("upsample_channels", upsample_channels, 1)
        self.fusion = nn.Conv2d(3 * channels, channels, 1)
        self.upsample1 = Upsample2x(channels, channels)
        self.upsample2 = Upsample2x(channels, upsample_channels)
        self.conv_hr = nn.Conv2d(upsample_channels, upsample_channels, 3, 1, 1)
        self.conv_last = nn.Conv2d(upsample_channels, 3, 3, 1, 1)

    @classmethod
    def small(cls, **kwargs) -> "TTVSR":
        """A configuration for tests and CPU benchmarks: 16 channels, 2 + 1 blocks, key frames every 2."""
        config = {"channels": 16, "blocks": 2, "extractor_blocks": 1, "keyframe_stride": 2,
                  "upsample_channels": 16}
        config.update(kwargs)
        return cls(**config)

    def _flows(self, frames: torch.Tensor, flows):
        B, T, _, H, W = frames.shape
        if flows is None:
            if self.flow_estimator is None:
                raise ValueError("flows must be given when the network has no flow_estimator")
            earlier, later = frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1)
            forward_flows = self.flow_estimator(later, earlier).view(B, T - 1, 2, H, W)
            backward_flows = self.flow_estimator(earlier, later).view(B, T - 1, 2, H, W)
            return forward_flows, backward_flows
        if not isinstance(flows, (list, tuple)) or len(flows) != 2:
            raise TypeError("flows must be a pair (forward_flows, backward_flows)")
        for name, flow in zip(("forward_flows", "backward_flows"), flows):
            _checks.tensor(name, flow, "BTCHW")
            if flow.shape != (B, T - 1, 2, H, W):
                raise ValueError(f"{name} must have shape {(B, T - 1, 2, H, W)} for frames of shape "
                                 f"{tuple(frames.shape)}, got {tuple(flow.shape)}")
        return flows

    def _propagate(self, features: Sequence[torch.Tensor], flows: torch.Tensor, reverse: bool):
        """One recurrent pass; returns the propagated feature of every frame, in frame order.

        flows[:, i] is the flow used when stepping onto frame i (forward) or frame i (backward,
        from frame i to i+1)."""
        T = len(features)
        order = range(T - 1, -1, -1) if reverse else range(T)
        feature = features[0]
        B, C, H, W = feature.shape
        s = self.stride
        propagated = feature.new_zeros(B, C, H, W)
        keys, values, location = [], ([], [], []), None
        results = [None] * T
        for step, i in enumerate(order):
            current = features[i]
            keyframe = step % self.keyframe_stride == 0
            if step > 0:
                flow = flows[:, i] if reverse else flows[:, i - 1]
                propagated = flow_warp(propagated, flow)
                location = update_locations(location, flow, s)  # the current frame's identity appended
                propagated = self.attention(current, propagated, torch.stack(keys, 1),
                                            [torch.stack(v, 1) for v in values], location[:, :-1])
                if not keyframe:
                    location = location[:, :-1]
            propagated = self.propagation(torch.cat((current, propagated), 1))
            if keyframe:
                key, scales = self.attention.tokens(current, propagated)
                keys.append(key)
                for memory, tokens in zip(values, scales):
                    memory.append(tokens)
                if step == 0:
                    location = identity_locations(B, H // s, W // s, torch.float32, current.device)
            results[i] = propagated
        return results

    def forward(self, frames: torch.Tensor, flows=None) -> torch.Tensor:
        _checks.tensor("frames", frames, "BTCHW")
        B, T, C, H, W = frames.shape
        if C != 3 or T < 1 or H % self.stride or W % self.stride or H == 0 or W == 0:
            raise ValueError(f"frames must have shape (B, T >= 1, 3, H, W) with H and W positive multiples "
                             f"of {self.stride}, got {tuple(frames.shape)}")
        forward_flows, backward_flows = self._flows(frames, flows) if T > 1 else (None, None)
        features = list(self.extractor(frames.flatten(0, 1)).unflatten(0, (B, T)).unbind(1))
        backward = self._propagate(features, backward_flows, reverse=True)
        forward = self._propagate(features, forward_flows, reverse=False)
        hr = []
        for i in range(T):
            x = F.leaky_relu(self.fusion(torch.cat((backward[i], features[i], forward[i]), 1)), 0.1)
            x = F.leaky_relu(self.upsample1(x), 0.1)
            x = F.leaky_relu(self.upsample2(x), 0.1)
            x = self.conv_last(F.leaky_relu(self.conv_hr(x), 0.1))
            hr.append(x + F.interpolate(frames[:, i], scale_factor=4, mode="bilinear", align_corners=False))
        return torch.stack(hr, 1)
