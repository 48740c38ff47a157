"""nn.Module layers over the vsr_kernels ops, named after the papers' blocks."""
from .iart import ImplicitWarp
from .mana import CrossFrameNonLocalAttention, MemoryAugmentedAttention

__all__ = ["CrossFrameNonLocalAttention", "ImplicitWarp", "MemoryAugmentedAttention"]
