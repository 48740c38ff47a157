"""Example networks assembled from vsr_kernels.nn (installed with the package)."""
from .mana import MANA

__all__ = ["MANA"]
