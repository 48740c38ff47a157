"""A DKSAN-style network (Xu et al., "Deformable Kernel Convolutional Network for Video Extreme
Super-Resolution", AIM 2020 / arXiv:2010.00154; code not public), assembled from
vsr_kernels.nn.dksan: super-resolution of the centre frame of a clip by x4 (default) up to x16.

Pipeline, for a clip of T low-resolution frames:
1. per-frame features: conv + LeakyReLU + residual blocks (shared by the frames);
2. `DKCAlign` (deformable-kernel conv + deformable conv) of every neighbour's features to the
   centre frame's (one module shared by the neighbours, as EDVR shares its PCD module);
3. fusion: a 1x1 conv over the concatenated centre and aligned features, LeakyReLU;
4. residual groups (`DKSAReconstruction`: RCAB stack + DKSA + residual) and a conv, with a
   long skip over the trunk (RCAN's residual-in-residual);
5. log2(scale) cascaded x2 levels, each conv(C -> 4C) + pixel shuffle + LeakyReLU; the first
   level refines its output with a light DKSA (the paper's light DKSA at its first level);
6. a conv to in_channels, added to the bilinear upsampling of the centre frame (global residual).
What follows the paper: DKC_Align per neighbour, fusion, reconstruction with DKSA, cascaded x2
levels to x16, the light DKSA at the first level. Assumptions: every width and depth, the
fusion by a 1x1 conv (the paper's fusion details were not available to us), one shared
alignment module, the long skip, where the light DKSA sits (after the first level's shuffle).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.dksan import DeformKernelSpatialAttention, DKCAlign, DKSAReconstruction
from ..ops import _backend, _checks
from ._blocks import ResidualBlock


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class DKSAN(nn.Module):
    """DKSAN-style video super-resolution of the centre frame: (B, T, C, H, W) -> (B, C, sH, sW).

    Args:
        in_channels: channels of the frames (3 for RGB).
        num_feat: C, the feature width (a multiple of deformable_groups and kernel_groups).
        num_frames: T; the centre frame is num_frames // 2.
        scale: s, a power of two >= 2 (4 default; 16 for the paper's extreme setting): log2(s)
            cascaded x2 levels.
        extract_blocks: residual blocks of the per-frame feature extractor.
        num_groups: residual groups (`DKSAReconstruction`) of the trunk.
        num_rcab: RCABs per group.
        reduction: channel-attention reduction of the RCABs.
        dksa_layers: deformable-kernel convs of each group's DKSA.
        kernel_size, scope_size, kernel_groups: of every deformable-kernel convolution.
        deformable_groups: offset groups of DKC_Align's deformable convolution.
        backend: backend of `deform_kernel_conv2d` and `deform_conv2d` in every layer.
    Shapes:
        forward(frames (B, num_frames, in_channels, H, W)) -> (B, in_channels, scale*H, scale*W).
    """

    def __init__(self, in_channels: int = 3, num_feat: int = 64, num_frames: int = 5, scale: int = 4,
                 extract_blocks: int = 5, num_groups: int = 4, num_rcab: int = 4, reduction: int = 16,
                 dksa_layers: int = 2, kernel_size: int = 3, scope_size: int = 5, kernel_groups: int = 1,
                 deformable_groups: int = 8, backend: str = "auto"):
        super().__init__()
        self.in_channels = _checks.integer("in_channels", in_channels, 1)
        self.num_feat = _checks.integer("num_feat", num_feat, 1)
        self.num_frames = _checks.integer("num_frames", num_frames, 1)
        self.scale = _checks.integer("scale", scale, 2)
        if scale & (scale - 1):
            raise ValueError(f"scale must be a power of two (cascaded x2 levels), got {scale}")
        self.center = num_frames // 2
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        dk = dict(kernel_size=kernel_size, scope_size=scope_size, kernel_groups=kernel_groups,
                  backend=backend)
        self.extract = nn.Sequential(_conv(in_channels, num_feat), nn.LeakyReLU(0.1),
                                     *(ResidualBlock(num_feat) for _ in range(extract_blocks)))
        self.align = DKCAlign(num_feat, deformable_groups=deformable_groups, **dk)
        self.fusion = nn.Sequential(_conv(num_frames * num_feat, num_feat, 1), nn.LeakyReLU(0.1))
        self.groups = nn.Sequential(*(
            DKSAReconstruction(num_feat, num_rcab, reduction, num_layers=dksa_layers, **dk)
            for _ in range(num_groups)))
        self.trunk_conv = _conv(num_feat, num_feat)
        self.levels = nn.ModuleList(
            nn.Sequential(_conv(num_feat, 4 * num_feat), nn.PixelShuffle(2), nn.LeakyReLU(0.1))
            for _ in range(int(math.log2(scale))))
        self.level_attention = DeformKernelSpatialAttention.light(num_feat, **dk)
        self.conv_last = _conv(num_feat, in_channels)

    @classmethod
    def small(cls, **overrides) -> "DKSAN":
        """A configuration small enough for tests and CPU training steps (3 frames, C = 8)."""
        config = dict(num_feat=8, num_frames=3, extract_blocks=1, num_groups=1, num_rcab=1, reduction=4,
                      deformable_groups=2)
        return cls(**{**config, **overrides})

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        _checks.tensor("frames", frames, "BTCHW")
        B, T, C, H, W = frames.shape
        if (T, C) != (self.num_frames, self.in_channels):
            raise ValueError(f"frames must have shape (B, {self.num_frames}, {self.in_channels}, H, W) "
                             f"(num_frames, in_channels), got {tuple(frames.shape)}")
        feats = self.extract(frames.flatten(0, 1)).unflatten(0, (B, T))
        ref = feats[:, self.center]
        aligned = [ref if t == self.center else self.align(feats[:, t], ref) for t in range(T)]
        feat = self.fusion(torch.cat(aligned, 1))
        feat = feat + self.trunk_conv(self.groups(feat))
        for i, level in enumerate(self.levels):
            feat = level(feat)
            if i == 0:
                feat = self.level_attention(feat)
        base = F.interpolate(frames[:, self.center], scale_factor=self.scale, mode="bilinear",
                             align_corners=False)
        return base + self.conv_last(feat)
