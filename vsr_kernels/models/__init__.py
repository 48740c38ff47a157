"""Example networks assembled from vsr_kernels.nn (installed with the package)."""
from .iart import ImplicitAlignmentVSR

__all__ = ["ImplicitAlignmentVSR"]
