"""Loads the compiled library vsr_kernels._C, which registers the C++/CUDA kernels."""
import torch

try:
    from . import _C  # noqa: F401  (import registers the ops with torch.library)

    LOAD_ERROR = None
except ImportError as error:  # a source checkout that was never built
    LOAD_ERROR = error


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"vsr_kernels::{op}", dispatch_key)


# Which compiled backends this build has, decided once at import so that the per-call
# backend choice stays a plain attribute read (traceable by torch.compile).
HAS_CPU_KERNELS = _has_kernel("local_argmax_attention", "CPU")
HAS_CUDA_KERNELS = _has_kernel("local_argmax_attention", "CUDA")
