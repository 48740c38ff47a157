"""EDVR's Pyramid, Cascading and Deformable alignment (Wang et al., "EDVR: Video Restoration with
Enhanced Deformable Convolutional Networks", CVPRW 2019; BasicSR's `PCDAlignment`).

A neighbour frame's features are aligned to the reference frame's at three pyramid levels,
coarse to fine: at each level the offsets are predicted from the concatenated neighbour and
reference features (plus the upsampled offsets of the coarser level, doubled with the
resolution) and feed a `DCNv2Pack`; the aligned features are fused with the upsampled ones of
the coarser level. A last cascading `DCNv2Pack` refines the finest level against the reference.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _backend, _checks
from .deformable import DCNv2Pack

LEVELS = 3


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class PCDAlignment(nn.Module):
    """EDVR's PCD alignment module.

    Args:
        num_feat: C, channels of every pyramid level.
        deformable_groups: offset groups of every DCNv2Pack (must divide num_feat).
        backend: backend of `deform_conv2d`.
    Shapes:
        forward(nbr_feats, ref_feats): two lists of 3 levels [(B, C, H, W), (B, C, H/2, W/2),
        (B, C, H/4, W/4)] (H and W divisible by 4, see `FeaturePyramid`)
        -> (B, C, H, W), the neighbour's finest features aligned to the reference.
    """

    def __init__(self, num_feat: int = 64, deformable_groups: int = 8, backend: str = "auto"):
        super().__init__()
        self.num_feat = _checks.integer("num_feat", num_feat, 1)
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        self.offset_conv1 = nn.ModuleDict()
        self.offset_conv2 = nn.ModuleDict()
        self.offset_conv3 = nn.ModuleDict()
        self.dcn_pack = nn.ModuleDict()
        self.feat_conv = nn.ModuleDict()
        for i in range(LEVELS, 0, -1):
            level = f"l{i}"
            self.offset_conv1[level] = _conv(2 * num_feat, num_feat)
            if i == LEVELS:
                self.offset_conv2[level] = _conv(num_feat, num_feat)
            else:
                self.offset_conv2[level] = _conv(2 * num_feat, num_feat)
                self.offset_conv3[level] = _conv(num_feat, num_feat)
            self.dcn_pack[level] = DCNv2Pack(num_feat, num_feat, 3, padding=1,
                                             deformable_groups=deformable_groups, backend=backend)
            if i < LEVELS:
                self.feat_conv[level] = _conv(2 * num_feat, num_feat)
        self.cas_offset_conv1 = _conv(2 * num_feat, num_feat)
        self.cas_offset_conv2 = _conv(num_feat, num_feat)
        self.cas_dcnpack = DCNv2Pack(num_feat, num_feat, 3, padding=1, deformable_groups=deformable_groups,
                                     backend=backend)
        self.lrelu = nn.LeakyReLU(0.1)

    def forward(self, nbr_feats: list, ref_feats: list) -> torch.Tensor:
        for name, feats in (("nbr_feats", nbr_feats), ("ref_feats", ref_feats)):
            if not isinstance(feats, (list, tuple)) or len(feats) != LEVELS:
                raise ValueError(f"{name} must be a list of {LEVELS} pyramid levels (finest first)")
        upsampled_offset = upsampled_feat = None
        for i in range(LEVELS, 0, -1):
            level = f"l{i}"
            offset = self.lrelu(self.offset_conv1[level](torch.cat([nbr_feats[i - 1], ref_feats[i - 1]], 1)))
            if i == LEVELS:
                offset = self.lrelu(self.offset_conv2[level](offset))
            else:
                offset = self.lrelu(self.offset_conv2[level](torch.cat([offset, upsampled_offset], 1)))
                offset = self.lrelu(self.offset_conv3[level](offset))
            feat = self.dcn_pack[level](nbr_feats[i - 1], offset)
            if i < LEVELS:
                feat = self.feat_conv[level](torch.cat([feat, upsampled_feat], 1))
            if i > 1:
                feat = self.lrelu(feat)
                # Offsets are in pixels of their level: twice as many at the next finer one.
                upsampled_offset = _upsample(offset) * 2
                upsampled_feat = _upsample(feat)
        offset = self.lrelu(self.cas_offset_conv1(torch.cat([feat, ref_feats[0]], 1)))
        offset = self.lrelu(self.cas_offset_conv2(offset))
        return self.lrelu(self.cas_dcnpack(feat, offset))


class FeaturePyramid(nn.Module):
    """The 3-level feature pyramid PCD alignment works on (EDVR): level 1 is the input, each
    coarser level a stride-2 conv and a conv (with LeakyReLU) of the previous one.

    Shapes: forward((B, C, H, W)) -> [(B, C, H, W), (B, C, H/2, W/2), (B, C, H/4, W/4)]
    (H, W divisible by 4).
    """

    def __init__(self, num_feat: int):
        super().__init__()
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(num_feat, num_feat, 3, 2, 1), nn.LeakyReLU(0.1),
                                                _conv(num_feat, num_feat), nn.LeakyReLU(0.1))
                                  for _ in range(LEVELS - 1))

    def forward(self, feat: torch.Tensor) -> list:
        H, W = feat.shape[-2:]
        if H % 4 or W % 4:
            raise ValueError(f"the feature pyramid needs H and W divisible by 4, "
                             f"got shape {tuple(feat.shape)}")
        levels = [feat]
        for down in self.down:
            levels.append(down(levels[-1]))
        return levels
