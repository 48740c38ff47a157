"""Naive PyTorch implementations of every op: the test oracle and the benchmark baseline."""
from .local_argmax_attention import local_argmax_attention
from .trajectory_attention import trajectory_attention

__all__ = ["local_argmax_attention", "trajectory_attention"]
