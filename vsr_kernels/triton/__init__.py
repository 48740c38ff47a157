"""Triton kernels, one module per op, each registering its ops with torch.library.

Imported lazily by vsr_kernels.ops, so that vsr_kernels imports without Triton.
"""
