"""One module per op: argument checks, backend choice, autograd and fake registration."""
from .local_argmax_attention import local_argmax_attention

__all__ = ["local_argmax_attention"]
