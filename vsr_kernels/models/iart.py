"""A BasicVSR-style bidirectional recurrent network whose alignment is IART's implicit
alignment (`vsr_kernels.nn.ImplicitWarp`) instead of flow warping.

BasicVSR (Chan et al., CVPR 2021) extracts features from every low-resolution frame, carries
a hidden state backwards then forwards through the clip, aligning the state to each frame
with the optical flow, and reconstructs every frame from both states with pixel-shuffle
upsampling. IART (Xu et al., CVPR 2024) keeps that recurrent skeleton (with transformer
blocks where this example uses residual convolutions) and replaces the bilinear warp of the
state by attention over a small flow-guided window; like IART, both directions share one
alignment module. Flow is an input here (IART and BasicVSR compute it with SPyNet).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ImplicitWarp
from ..ops import _checks
from ._blocks import ResidualBlock, conv3x3

SCALE = 4


def _trunk(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_channels, channels), nn.LeakyReLU(0.1),
                         *(ResidualBlock(channels) for _ in range(blocks)))


class ImplicitAlignmentVSR(nn.Module):
    """x4 video super-resolution of every frame of a clip, bidirectional recurrent, with
    implicit (attention) alignment of the recurrent state.

    Args:
        in_channels: channels of the frames (3 for RGB).
        channels: C, the feature width, a multiple of 4 and of num_heads.
        num_heads: heads of the implicit alignment.
        window_size: side of its flow-guided window (2: the bilinear neighbours, as in IART).
        extract_blocks: residual blocks of the shared per-frame feature extractor.
        propagation_blocks: residual blocks of each propagation trunk.
        backend: backend of `flow_guided_window_attention`.

    Shapes:
        forward(frames (B, T, in_channels, H, W), forward_flows (B, T-1, 2, H, W),
                backward_flows (B, T-1, 2, H, W)) -> (B, T, in_channels, 4H, 4W)
        backward_flows[:, i] is the flow from frame i to frame i + 1 (used to bring the state
        of frame i + 1 to frame i), forward_flows[:, i] the flow from frame i + 1 to frame i;
        channel 0 = dx, channel 1 = dy, in low-resolution pixels (BasicVSR's flows_backward
        and flows_forward).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_heads: int = 4, window_size: int = 2,
                 extract_blocks: int = 5, propagation_blocks: int = 15, backend: str = "auto"):
        super().__init__()
        self.in_channels = _checks.integer("in_channels", in_channels, 1)
        self.channels = channels
        self.extract = _trunk(in_channels, channels, extract_blocks)
        self.align = ImplicitWarp(channels, num_heads, window_size, backend=backend)
        self.backward_trunk = _trunk(2 * channels, channels, propagation_blocks)
        self.forward_trunk = _trunk(2 * channels, channels, propagation_blocks)
        self.fusion = nn.Conv2d(2 * channels, channels, 1)
        self.upsample = nn.Sequential(
            conv3x3(channels, 4 * channels), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            conv3x3(channels, 4 * channels), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            conv3x3(channels, channels), nn.LeakyReLU(0.1),
            conv3x3(channels, in_channels))

    @classmethod
    def small(cls, **kwargs) -> "ImplicitAlignmentVSR":
        """A configuration small enough for tests and CPU training steps."""
        config = dict(channels=16, num_heads=2, window_size=2, extract_blocks=1, propagation_blocks=2)
        config.update(kwargs)
        return cls(**config)

    def _check(self, frames, forward_flows, backward_flows):
        _checks.tensor("frames", frames, "BTCHW")
        B, T, C, H, W = frames.shape
        if C != self.in_channels:
            raise ValueError(f"frames must have C = in_channels = {self.in_channels} in dim 2, "
                             f"got shape {tuple(frames.shape)}")
        if T < 1:
            raise ValueError(f"frames must hold at least one frame, got shape {tuple(frames.shape)}")
        for name, flows in (("forward_flows", forward_flows), ("backward_flows", backward_flows)):
            _checks.tensor(name, flows, "BTCHW")
            if flows.shape != (B, T - 1, 2, H, W):
                raise ValueError(f"{name} must have shape (B, T - 1, 2, H, W) = {(B, T - 1, 2, H, W)}, "
                                 f"got shape {tuple(flows.shape)}")

    def forward(self, frames: torch.Tensor, forward_flows: torch.Tensor,
                backward_flows: torch.Tensor) -> torch.Tensor:
        self._check(frames, forward_flows, backward_flows)
        B, T, C, H, W = frames.shape
        feats = self.extract(frames.flatten(0, 1)).unflatten(0, (B, T))

        state = feats.new_zeros(B, self.channels, H, W)
        backward_states = [None] * T
        for i in reversed(range(T)):
            if i < T - 1:
                state = self.align(state, feats[:, i], backward_flows[:, i])
            state = self.backward_trunk(torch.cat((feats[:, i], state), dim=1))
            backward_states[i] = state

        state = feats.new_zeros(B, self.channels, H, W)
        outputs = []
        for i in range(T):
            if i > 0:
                state = self.align(state, feats[:, i], forward_flows[:, i - 1])
            state = self.forward_trunk(torch.cat((feats[:, i], state), dim=1))
            fused = self.fusion(torch.cat((backward_states[i], state), dim=1))
            base = F.interpolate(frames[:, i], scale_factor=SCALE, mode="bilinear", align_corners=False)
            outputs.append(base + self.upsample(fused))
        return torch.stack(outputs, dim=1)
