"""Backend choice shared by every op: which implementations exist in this build, which
devices and dtypes each takes, and what "auto" means."""
import importlib.util
import os

import torch

from .. import _extension

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# Read once at import, like Triton itself does: the interpreter runs Triton kernels on CPU tensors.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

_DTYPES = {
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def _unavailable(backend: str, device: torch.device):
    """Why `backend` cannot run on `device` in this installation, or None if it can."""
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors, got tensors on {device}"
        if not _extension.HAS_CPU_KERNELS:
            return f"the compiled extension vsr_kernels._C is not loaded ({_extension.LOAD_ERROR})"
    elif backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors, got tensors on {device}"
        if not _extension.HAS_CUDA_KERNELS:
            return "vsr_kernels was built without CUDA (reinstall with a CUDA PyTorch or FORCE_CUDA=1)"
    elif backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type != "cuda" and not (device.type == "cpu" and TRITON_INTERPRET):
            return f"it runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    return None


def choose(backend: str, tensor: torch.Tensor, gpu_default: str) -> str:
    """The concrete backend for `backend` on `tensor`'s device and dtype; raises if it cannot run.

    "auto" is "cpu" for CPU tensors and `gpu_default` (the faster GPU backend of the op, by
    its benchmarks) for CUDA tensors, falling back to the other GPU backend and then the
    reference when the preferred one is missing from this installation.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    device = tensor.device
    if backend == "auto":
        if device.type == "cpu":
            candidates = ("cpu",)
        else:
            candidates = (gpu_default, "triton" if gpu_default == "cuda" else "cuda", "reference")
        backend = next((c for c in candidates if _unavailable(c, device) is None), candidates[0])
    reason = _unavailable(backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run: {reason}")
    if tensor.dtype not in _DTYPES[backend]:
        raise TypeError(f"backend={backend!r} supports dtypes {_DTYPES[backend]}, got {tensor.dtype}")
    return backend


def unavailable(op_name: str, backend: str, device) -> "str | None":
    """Why `backend` cannot run op `op_name` on `device` in this installation, or None if it can.

    A thin shim over `_unavailable` (every backend serves every op today); the op spec
    registry of issue 5 replaces it.
    """
    if backend == "reference":
        return None
    return _unavailable(backend, torch.device(device))
