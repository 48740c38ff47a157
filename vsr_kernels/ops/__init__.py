"""One module per op: argument checks, backend choice, autograd and fake registration."""
from .local_argmax_attention import local_argmax_attention
from .trajectory_attention import trajectory_attention

__all__ = ["local_argmax_attention", "trajectory_attention"]
