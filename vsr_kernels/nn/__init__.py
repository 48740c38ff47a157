"""nn.Module layers over the vsr_kernels ops, named after the papers' blocks."""
from .iart import ImplicitWarp
from .mana import CrossFrameNonLocalAttention, MemoryAugmentedAttention
from .ttvsr import CrossScaleTokenizer, TrajectoryAwareAttention, identity_locations, update_locations

__all__ = [
    "CrossFrameNonLocalAttention", "CrossScaleTokenizer", "ImplicitWarp", "MemoryAugmentedAttention",
    "TrajectoryAwareAttention", "identity_locations", "update_locations",
]
