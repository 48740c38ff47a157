"""vsr_kernels: fused kernels for the hot paths of video super-resolution networks."""
from . import nn, reference
from .ops import local_argmax_attention, trajectory_attention

__version__ = "0.1.0"
__all__ = ["local_argmax_attention", "nn", "reference", "trajectory_attention"]
