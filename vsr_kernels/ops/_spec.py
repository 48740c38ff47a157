"""What the generic machinery knows about an op: its OpSpec, and the registry SPECS.

An op named N has, per implementation, a (forward, backward) pair of torch.library ops:
  "cpp":    vsr_kernels::N and vsr_kernels::N_backward (schemas in csrc/registration.cpp,
            kernels in _C for the "cpu" and "cuda" backends);
  "triton": vsr_kernels::N_triton and vsr_kernels::N_triton_backward (torch.library.custom_op
            in the module spec.triton_module, with the same schemas).
Both pairs get the same fake tensors and autograd, from the spec, through register_ops. The
backward ops get an autograd formula that raises: a second-order gradient through an op is
an error naming it, never a silent zero.
"""
import dataclasses
import threading
from collections.abc import Callable, Mapping

import torch

from .. import _extension

NAMESPACE = "vsr_kernels"
BACKENDS = ("reference", "cpu", "cuda", "triton")  # the concrete backends ("auto" picks one)
# How each compiled backend's ops are registered, and the suffix of their names.
IMPLEMENTATIONS = {"cpp": "", "triton": "_triton"}
IMPLEMENTATION_OF_BACKEND = {"cpu": "cpp", "cuda": "cpp", "triton": "triton"}


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op, as _backend and register_ops see it.

    The callables take the op schema's arguments (those of torch.ops.vsr_kernels.<name>):
    reference(*inputs) -> outputs; fake(*inputs) and fake_backward(*backward_inputs) return
    empty tensors of the outputs' shapes, dtypes and strides; setup_context(ctx, inputs,
    output) saves what backward needs; backward(backward_op, ctx, *grad_outputs) returns one
    gradient (or None) per forward input, computing them with `backward_op`, the backward op
    of the implementation being differentiated.
    """

    name: str
    dtypes: Mapping[str, tuple]  # backend ("reference", "cpu", "cuda", "triton") -> torch dtypes it takes
    gpu_default: str  # the faster GPU backend, "cuda" or "triton": what backend="auto" picks on CUDA tensors
    reference: Callable
    triton_module: str | None  # the module defining the Triton ops, imported when first needed
    fake: Callable
    fake_backward: Callable
    setup_context: Callable
    backward: Callable

    def __post_init__(self):
        if set(self.dtypes) != set(BACKENDS):
            raise ValueError(f"OpSpec {self.name!r}: dtypes must list every backend {BACKENDS}, "
                             f"got {set(self.dtypes)}")
        if self.gpu_default not in ("cuda", "triton"):
            raise ValueError(f"OpSpec {self.name!r}: gpu_default must be 'cuda' or 'triton', "
                             f"got {self.gpu_default!r}")

    def op_names(self, implementation: str) -> tuple[str, str]:
        """Qualified names ("vsr_kernels::...") of `implementation`'s forward and backward ops."""
        base = f"{NAMESPACE}::{self.name}{IMPLEMENTATIONS[implementation]}"
        return base, f"{base}_backward"

    def forward_op(self, implementation: str):
        """The forward op (a torch.ops OpOverloadPacket) of `implementation`."""
        return _resolve(self.op_names(implementation)[0])


SPECS: dict[str, OpSpec] = {}
_REGISTERED: set = set()  # (op name, implementation) pairs whose fake and autograd are registered
_LOCK = threading.Lock()


def _resolve(qualified_name: str):
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def register(spec: OpSpec) -> OpSpec:
    """Adds `spec` to SPECS and, when _C is loaded, registers its C++ ops' fake tensors and
    autograd (the Triton ops are registered by _backend.op_for, which imports them)."""
    if spec.name in SPECS:
        raise ValueError(f"an op named {spec.name!r} is already registered")
    SPECS[spec.name] = spec
    for dispatch_key in ("CPU", "CUDA"):  # filled now, outside any torch.compile trace
        _extension.has_kernel(spec.name, dispatch_key)
    if _extension.LOAD_ERROR is None:
        register_ops(spec, "cpp")
    return spec


def register_ops(spec: OpSpec, implementation: str) -> None:
    """Registers fake tensors and autograd for `implementation`'s (forward, backward) ops of
    `spec` ("cpp" or "triton"); the ops must exist. Does nothing the second time."""
    with _LOCK:
        if (spec.name, implementation) in _REGISTERED:
            return
        forward, backward = spec.op_names(implementation)
        backward_op = _resolve(backward)
        torch.library.register_fake(forward)(spec.fake)
        torch.library.register_fake(backward)(spec.fake_backward)

        def differentiate(ctx, *grad_outputs):
            return spec.backward(backward_op, ctx, *grad_outputs)

        torch.library.register_autograd(forward, differentiate, setup_context=spec.setup_context)
        torch.library.register_autograd(backward, _no_double_backward(spec.name), setup_context=_save_nothing)
        _REGISTERED.add((spec.name, implementation))


def _save_nothing(ctx, inputs, output) -> None:
    pass


def _no_double_backward(op_name: str) -> Callable:
    def backward(ctx, *grad_outputs):
        raise RuntimeError(f"vsr_kernels.{op_name}: double backward is not supported (its backward op is not "
                           "differentiable); use backend='reference' for higher-order gradients")

    return backward
