"""Example networks assembled from vsr_kernels.nn."""
