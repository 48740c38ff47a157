"""Example networks built on the vsr_kernels layers."""
from .ttvsr import TTVSR, zero_flow

__all__ = ["TTVSR", "zero_flow"]
