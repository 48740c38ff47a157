"""vsr_kernels: fused kernels for the hot paths of video super-resolution networks."""
from . import nn, reference
from .ops import deform_conv2d, deform_kernel_conv2d, flow_guided_window_attention, local_argmax_attention, trajectory_attention

__version__ = "0.1.0"
__all__ = ["deform_conv2d", "deform_kernel_conv2d", "flow_guided_window_attention", "local_argmax_attention", "nn", "reference",
           "trajectory_attention"]
