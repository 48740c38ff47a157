"""Loads the compiled library vsr_kernels._C, which registers the C++/CUDA kernels of every op.

A C++ extension only works with the torch it was compiled against: its symbols and ABI are
those of that build. setup.py records that torch in vsr_kernels/_build_info.py
(TORCH_VERSION, CUDA); another torch release here refuses to load _C, rather than risk a
crash or an obscure "undefined symbol". Releases are compared without their local suffix:
torch's C++ ABI changes with the release, not with the +cpu/+cu128 variant, and a wheel pins
`torch==<release>`, which admits every variant. An extension built with CUDA kernels needs a
CUDA torch (it links against torch's CUDA libraries); one built without runs on either.

When _C cannot be loaded, LOAD_ERROR holds why (an ImportError whose message says how to
rebuild), the C++ backends report it, and backend="auto" falls back to the reference.
"""
import torch

REBUILD_COMMAND = ("pip install --no-build-isolation --force-reinstall --no-deps <vsr_kernels source or URL>"
                   " (in a source checkout: python setup.py build_ext --inplace)")


def _release(version: str) -> str:
    return version.split("+", 1)[0]


def version_mismatch(built: str, installed: str, built_with_cuda: bool = False,
                     installed_has_cuda: bool = True) -> str | None:
    """The error message for an extension built against torch `built` (with CUDA kernels or
    not) loaded with torch `installed`, or None when that build can load."""
    if _release(built) != _release(installed):
        return (f"vsr_kernels was built against torch {built} but torch {installed} is installed; "
                f"rebuild with: {REBUILD_COMMAND}")
    if built_with_cuda and not installed_has_cuda:
        return (f"vsr_kernels was built with CUDA kernels against torch {built}, but the installed torch "
                f"{installed} has no CUDA; rebuild with: {REBUILD_COMMAND}")
    return None


def _load() -> ImportError | None:
    """Imports _C (which registers its ops with torch.library); returns why it failed, or None."""
    try:
        from . import _build_info
    except ImportError:  # a build that predates _build_info.py, or a checkout never built
        _build_info = None
    built = getattr(_build_info, "TORCH_VERSION", None)
    if built is not None:
        message = version_mismatch(built, torch.__version__, bool(getattr(_build_info, "CUDA", False)),
                                   torch.version.cuda is not None)
        if message is not None:
            return ImportError(message)
    try:
        from . import _C  # noqa: F401
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == f"{__package__}._C":
            return ImportError(f"vsr_kernels._C is not built ({error}); build it with: {REBUILD_COMMAND}")
        # Typically an undefined symbol: another torch than the build's.
        against = f"torch {built}" if built is not None else "another torch"
        return ImportError(f"vsr_kernels._C failed to load ({error}); it was probably built against "
                           f"{against} but torch {torch.__version__} is installed; "
                           f"rebuild with: {REBUILD_COMMAND}")
    return None


LOAD_ERROR: ImportError | None = _load()

# has_kernel's answers. A plain dict, filled when an op's spec is registered at import, so
# that the per-call backend choice stays a dictionary read that torch.compile traces.
_HAS_KERNEL: dict = {}


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the loaded _C has a kernel for vsr_kernels::`op_name` on `dispatch_key`
    ("CPU", "CUDA"); False when _C is not loaded. Cached per (op_name, dispatch_key)."""
    if LOAD_ERROR is not None:
        return False
    key = (op_name, dispatch_key)
    if key not in _HAS_KERNEL:
        qualified = f"vsr_kernels::{op_name}"
        _HAS_KERNEL[key] = (torch._C._dispatch_has_kernel(qualified)
                            and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key))
    return _HAS_KERNEL[key]
