"""A one-stage space-time video super-resolution network in the style of Zooming Slow-Mo (Xiang
et al., CVPR 2020) and MEGAN (its seed paper's memory-enhanced variant; code not public):
x4 in space and 2x in frame rate, on deformable convolution throughout.

Pipeline, for a clip of T low-resolution frames:
1. per-frame features (conv + residual blocks) and their 3-level pyramid (EDVR);
2. the features of the T-1 missing intermediate frames by deformable feature temporal
   interpolation of each pair of neighbours (PCD alignment both ways, learned blending);
3. a bidirectional deformable ConvLSTM over the 2T-1 frames' features;
4. MEGAN-style non-local residual blocks over the whole clip (spatio-temporal attention on
   scaled_dot_product_attention);
5. per-frame reconstruction (residual blocks, two x2 pixel shuffles) added to a bilinear x4
   upsampling of the input frames (for an intermediate frame, the mean of its neighbours').
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.edvr import FeaturePyramid
from ..nn.megan import NonLocalResidualBlock
from ..nn.zooming_slowmo import BidirectionalDeformableConvLSTM, FeatureTemporalInterpolation
from ..ops import _backend, _checks
from ._blocks import ResidualBlock, conv3x3


class ZoomingSlowMo(nn.Module):
    """Space-time video super-resolution: (B, T, C, H, W) -> (B, 2T-1, C, 4H, 4W).

    Args:
        in_channels: channels of the frames (3 for RGB).
        num_feat: feature width (a multiple of deformable_groups).
        deformable_groups: offset groups of every deformable convolution.
        front_blocks: residual blocks of the per-frame feature extractor.
        back_blocks: residual blocks of the per-frame reconstruction trunk.
        nonlocal_blocks: MEGAN-style non-local residual blocks after the ConvLSTM (0: plain
            Zooming Slow-Mo).
        nonlocal_sub_sample: 2x2 max-pool the non-local keys/values (cost / 4).
        backend: backend of `deform_conv2d` in every layer.
    Shapes:
        forward(frames (B, T, in_channels, H, W)) with T >= 1, H and W divisible by 4
        -> (B, 2T-1, in_channels, 4H, 4W); output frame 2t is input frame t, frame 2t+1 lies
        halfway between input frames t and t+1.
    """

    def __init__(self, in_channels: int = 3, num_feat: int = 64, deformable_groups: int = 8,
                 front_blocks: int = 5, back_blocks: int = 10, nonlocal_blocks: int = 1,
                 nonlocal_sub_sample: bool = True, backend: str = "auto"):
        super().__init__()
        self.in_channels = _checks.integer("in_channels", in_channels, 1)
        self.num_feat = _checks.integer("num_feat", num_feat, 1)
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        self.extract = nn.Sequential(conv3x3(in_channels, num_feat), nn.LeakyReLU(0.1),
                                     *(ResidualBlock(num_feat) for _ in range(front_blocks)))
        self.pyramid = FeaturePyramid(num_feat)
        self.interpolate = FeatureTemporalInterpolation(num_feat, deformable_groups, backend=backend)
        self.lstm = BidirectionalDeformableConvLSTM(num_feat, num_feat, deformable_groups, backend=backend)
        self.nonlocal_blocks = nn.ModuleList(
            NonLocalResidualBlock(num_feat, sub_sample=nonlocal_sub_sample) for _ in range(nonlocal_blocks))
        self.reconstruct = nn.Sequential(*(ResidualBlock(num_feat) for _ in range(back_blocks)))
        self.upsample = nn.Sequential(
            conv3x3(num_feat, 4 * num_feat), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            conv3x3(num_feat, 4 * num_feat), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            conv3x3(num_feat, num_feat), nn.LeakyReLU(0.1), conv3x3(num_feat, in_channels))

    @classmethod
    def small(cls, **kwargs) -> "ZoomingSlowMo":
        """A configuration small enough for tests and CPU training steps."""
        config = dict(num_feat=8, deformable_groups=2, front_blocks=1, back_blocks=1, nonlocal_blocks=1)
        config.update(kwargs)
        return cls(**config)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        _checks.tensor("frames", frames, "BTCHW")
        B, T, C, H, W = frames.shape
        if C != self.in_channels:
            raise ValueError(f"frames must have C = in_channels = {self.in_channels} in dim 2, "
                             f"got shape {tuple(frames.shape)}")
        if T < 1 or H % 4 or W % 4 or H < 4 or W < 4:
            raise ValueError(f"frames must hold T >= 1 frames with H and W positive multiples of 4, "
                             f"got shape {tuple(frames.shape)}")
        feats = self.extract(frames.flatten(0, 1))  # (B*T, F, H, W)
        levels = [level.unflatten(0, (B, T)) for level in self.pyramid(feats)]
        sequence = []
        for t in range(T):
            sequence.append(levels[0][:, t])
            if t + 1 < T:
                sequence.append(self.interpolate([level[:, t] for level in levels],
                                                 [level[:, t + 1] for level in levels]))
        feats = self.lstm(torch.stack(sequence, 1))  # (B, 2T-1, F, H, W)
        for block in self.nonlocal_blocks:
            feats = block(feats)
        out = self.upsample(self.reconstruct(feats.flatten(0, 1)))
        base = F.interpolate(frames.flatten(0, 1), scale_factor=4, mode="bilinear",
                             align_corners=False).unflatten(0, (B, T))
        bases = []
        for t in range(T):
            bases.append(base[:, t])
            if t + 1 < T:
                bases.append(0.5 * (base[:, t] + base[:, t + 1]))
        return out.unflatten(0, (B, 2 * T - 1)) + torch.stack(bases, 1)
