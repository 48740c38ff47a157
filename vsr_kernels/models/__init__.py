"""Example networks assembled from vsr_kernels.nn (installed with the package)."""
from .dksan import DKSAN
from .iart import ImplicitAlignmentVSR
from .mana import MANA
from .ttvsr import TTVSR, zero_flow
from .zooming_slowmo import ZoomingSlowMo

__all__ = ["DKSAN", "MANA", "TTVSR", "ImplicitAlignmentVSR", "zero_flow", "ZoomingSlowMo"]
