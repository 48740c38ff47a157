"""Backend choice for every op, from its OpSpec: which implementations exist in this build,
which devices and dtypes each takes, what "auto" means, and the callable of each backend."""
import importlib
import importlib.util
import os
import warnings

import torch

from .. import _extension
from . import _spec

BACKENDS = ("auto", *_spec.BACKENDS)

# Read once at import, like Triton itself does: the interpreter runs Triton kernels on CPU tensors.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}  # the C++ backends' device types and dispatch keys
_LOADED: dict = {}  # (op name, backend) -> qualified name of its forward op, registered
_WARNED: set = set()  # op names whose "auto" fell back to the reference, warned once


def _spec_of(op_name: str) -> _spec.OpSpec:
    try:
        return _spec.SPECS[op_name]
    except KeyError:
        known = ", ".join(sorted(_spec.SPECS))
        raise ValueError(f"unknown op {op_name!r}; registered ops: {known}") from None


def unavailable(op_name: str, backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run op `op_name` on `device` in this installation, or None if it can."""
    _spec_of(op_name)
    if backend in _DISPATCH_KEYS:  # "cpu", "cuda": the C++ kernels of _C
        dispatch_key = _DISPATCH_KEYS[backend]
        if device.type != backend:
            return f"it runs on {dispatch_key} tensors, got tensors on {device}"
        if _extension.LOAD_ERROR is not None:
            return f"the compiled extension vsr_kernels._C is not loaded ({_extension.LOAD_ERROR})"
        if not _extension.has_kernel(op_name, dispatch_key):
            if backend == "cuda":
                return ("vsr_kernels was built without CUDA (rebuild with a CUDA PyTorch and toolkit, "
                        "or VSR_KERNELS_CUDA=1)")
            return f"this vsr_kernels._C has no CPU kernel for it; rebuild with: {_extension.REBUILD_COMMAND}"
    elif backend == "triton":
        if _spec_of(op_name).triton_module is None:
            return "the op has no Triton implementation"
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type != "cuda" and not (device.type == "cpu" and TRITON_INTERPRET):
            return f"it runs on CUDA tensors (or CPU ones with TRITON_INTERPRET=1), got tensors on {device}"
    elif backend != "reference":
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return None


def _auto_candidates(spec: _spec.OpSpec, device: torch.device) -> tuple:
    if device.type == "cpu":
        return "cpu", "reference"
    if device.type == "cuda":
        return spec.gpu_default, "triton" if spec.gpu_default == "cuda" else "cuda", "reference"
    return ("reference",)  # meta tensors (shapes only) and devices no kernel serves


def choose(op_name: str, backend: str, tensor: torch.Tensor) -> str:
    """The concrete backend for `backend` on `tensor`'s device and dtype; raises if it cannot run.

    "auto" is "cpu" for CPU tensors and the op's gpu_default (its faster GPU backend, by its
    benchmarks) for CUDA tensors, falling back to the other GPU backend and then to the
    reference, with a one-time warning saying why, when the preferred ones are missing from
    this installation. On other devices (meta) it is the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    spec = _spec_of(op_name)
    device = tensor.device
    if backend == "auto":
        candidates = _auto_candidates(spec, device)
        backend = next(c for c in candidates if unavailable(op_name, c, device) is None)
        if backend == "reference" and candidates[0] != "reference" and op_name not in _WARNED:
            _WARNED.add(op_name)
            reasons = "; ".join(f"backend={c!r}: {unavailable(op_name, c, device)}" for c in candidates[:-1])
            warnings.warn(f"vsr_kernels.{op_name}: backend='auto' falls back to the slow reference "
                          f"implementation on {device.type} tensors ({reasons})", RuntimeWarning,
                          stacklevel=3)
    reason = unavailable(op_name, backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run: {reason}")
    if tensor.dtype not in spec.dtypes[backend]:
        raise TypeError(f"backend={backend!r} supports dtypes {spec.dtypes[backend]}, got {tensor.dtype}")
    return backend


def op_for(op_name: str, backend: str):
    """The callable of `backend` (a concrete one, as choose returns) for op `op_name`, taking
    the op schema's arguments: the spec's reference, torch.ops.vsr_kernels.<op> for "cpu" and
    "cuda", torch.ops.vsr_kernels.<op>_triton for "triton" (whose module is imported, and its
    fake tensors and autograd registered, on first use)."""
    if backend == "reference":
        return _spec_of(op_name).reference
    namespace, name = _load(op_name, backend).split("::")
    return getattr(getattr(torch.ops, namespace), name)


# torch.compile runs this at trace time instead of tracing it (it imports and registers) and
# takes its result, a string, as a constant.
@torch.compiler.assume_constant_result
def _load(op_name: str, backend: str) -> str:
    """The qualified name of `backend`'s forward op, made ready to call the first time:
    the Triton module imported, fake tensors and autograd registered."""
    key = (op_name, backend)
    if key not in _LOADED:
        spec = _spec_of(op_name)
        if backend not in _spec.IMPLEMENTATION_OF_BACKEND:
            raise ValueError(f"op_for takes a concrete backend {_spec.BACKENDS}, got {backend!r}")
        implementation = _spec.IMPLEMENTATION_OF_BACKEND[backend]
        if implementation == "triton":
            if spec.triton_module is None:
                raise ValueError(f"vsr_kernels.{op_name} has no Triton implementation")
            importlib.import_module(spec.triton_module)
        elif _extension.LOAD_ERROR is not None:
            raise ValueError(f"backend={backend!r} cannot run: {_extension.LOAD_ERROR}")
        _spec.register_ops(spec, implementation)
        _LOADED[key] = spec.op_names(implementation)[0]
    return _LOADED[key]
