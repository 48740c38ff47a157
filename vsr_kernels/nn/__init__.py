"""nn.Module layers over the vsr_kernels ops, named after the papers' blocks."""
from .deformable import DCNv2Pack, DeformConv2d, ModulatedDeformConv2d
from .dksan import (ChannelAttention, DeformKernelConv2d, DeformKernelSpatialAttention, DKCAlign,
                    DKSAReconstruction, ResidualChannelAttentionBlock)
from .edvr import FeaturePyramid, PCDAlignment
from .iart import ImplicitWarp
from .mana import CrossFrameNonLocalAttention, MemoryAugmentedAttention
from .megan import NonLocalResidualBlock
from .ttvsr import CrossScaleTokenizer, TrajectoryAwareAttention, identity_locations, update_locations
from .zooming_slowmo import BidirectionalDeformableConvLSTM, DeformableConvLSTM, FeatureTemporalInterpolation

__all__ = [
    "CrossFrameNonLocalAttention", "CrossScaleTokenizer", "ImplicitWarp", "MemoryAugmentedAttention",
    "TrajectoryAwareAttention", "identity_locations", "update_locations",
    "BidirectionalDeformableConvLSTM", "DCNv2Pack", "DeformConv2d", "DeformableConvLSTM", "FeaturePyramid",
    "FeatureTemporalInterpolation", "ModulatedDeformConv2d", "NonLocalResidualBlock", "PCDAlignment",
    "ChannelAttention", "DeformKernelConv2d", "DeformKernelSpatialAttention", "DKCAlign", "DKSAReconstruction",
    "ResidualChannelAttentionBlock",
]
