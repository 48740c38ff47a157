"""Example networks assembled from vsr_kernels.nn (installed with the package)."""
from .iart import ImplicitAlignmentVSR
from .mana import MANA
from .ttvsr import TTVSR, zero_flow

__all__ = ["MANA", "TTVSR", "ImplicitAlignmentVSR", "zero_flow"]
