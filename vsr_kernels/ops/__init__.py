"""One module per op: argument checks, backend choice, autograd and fake registration."""
from .deform_conv2d import deform_conv2d
from .deform_kernel_conv2d import deform_kernel_conv2d
from .flow_guided_window_attention import flow_guided_window_attention
from .local_argmax_attention import local_argmax_attention
from .trajectory_attention import trajectory_attention

__all__ = ["deform_conv2d", "deform_kernel_conv2d", "flow_guided_window_attention", "local_argmax_attention", "trajectory_attention"]
