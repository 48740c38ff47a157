"""The shared test harness: what every op's test file (tests/test_<op>.py) is built from.

- which backends to test for an op, each on its device, skipped with the reason when this
  installation cannot run it (`backend_params`, `Backend`);
- seeded inputs (`make_inputs`), forward and gradients of a random linear loss
  (`forward_and_grads`), comparison with per-dtype tolerances and exact integer outputs
  (`assert_same`, `TOLERANCES`);
- issue 12's tools: canary buffers (`canary`), the layout sweep (`LAYOUTS`,
  `layout_assignments`), the size-mismatch generator (`size_mismatches`), and a crash-proof
  call for feeding the registered ops inputs they may read out of bounds (`call_isolated`).

Nothing here knows an op: inputs are named dicts, shapes are tuples, agreements are lists
of (input name, dim).
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import sys
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import pytest
import torch

from vsr_kernels.ops import _backend

HAS_CUDA = torch.cuda.is_available()
# The device of the GPU-capable backends here: CUDA when present, else CPU (the Triton
# interpreter, switched on by conftest.py).
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")

# (rtol, atol) per dtype for results computed in that dtype against a float64 oracle.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


class Backend(NamedTuple):
    """A backend and the device its tests run on."""
    name: str
    device: torch.device

    def __str__(self) -> str:
        return self.name


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


CPU_FLAGS = _cpu_flags()
# The instruction sets VSR_KERNELS_CPU_ISA can force on the per-ISA CPU kernels, as pytest
# params: the ones this CPU lacks are skipped, never silently run as another.
ISA_NEEDS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "fma"}}
CPU_ISAS = [pytest.param("base", id="base")] + [
    pytest.param(isa, id=isa, marks=[] if needs <= CPU_FLAGS else [pytest.mark.skip(reason=f"CPU lacks {isa}")])
    for isa, needs in ISA_NEEDS.items()]


def backend_device(name: str) -> torch.device:
    """Where `name` is tested: cpu and reference on CPU, cuda on CUDA, triton on the GPU when
    there is one, else on CPU through the interpreter."""
    return {"reference": torch.device("cpu"), "cpu": torch.device("cpu"),
            "cuda": torch.device("cuda"), "triton": DEVICE}[name]


def unavailable(op_name: str, backend: str) -> str | None:
    """Why `backend` cannot run `op_name` on its test device here, or None."""
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    return _backend.unavailable(op_name, backend, backend_device(backend))


def backend_params(op_name: str, names: Sequence[str] = BACKEND_NAMES) -> list:
    """pytest params of `Backend`s for `op_name`, each skipped with the reason when unavailable."""
    params = []
    for name in names:
        reason = unavailable(op_name, name)
        marks = [pytest.mark.skip(reason=f"backend={name!r}: {reason}")] if reason else []
        params.append(pytest.param(Backend(name, backend_device(name)), id=name, marks=marks))
    return params


def available_backends(op_name: str, names: Sequence[str] = BACKEND_NAMES) -> list[Backend]:
    return [Backend(n, backend_device(n)) for n in names if unavailable(op_name, n) is None]


# ---------------------------------------------------------------------------------------
# Inputs, forward and gradients, comparison.

def make_inputs(shapes: Mapping[str, tuple], dtype=torch.float64, device="cpu", seed: int = 0,
                integers: bool = False, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Seeded random tensors of the given shapes, in the order given, drawn in float64 and cast.

    Standard normal values are never exactly zero (a kernel that writes zeros or reads a
    zero-filled buffer cannot pass by accident). `integers=True` draws from {-1, 0, 1}:
    exact in every dtype and accumulation, so many candidates tie exactly.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randint(-1, 2, shape, generator=g).double() if integers else \
            torch.randn(shape, generator=g, dtype=torch.float64)
        out[name] = t.to(device, dtype).requires_grad_(requires_grad)
    return out


def leaf_copies(tensors: Sequence[torch.Tensor], dtype=None, device=None) -> list[torch.Tensor]:
    """Fresh leaves requiring grad with the same values (cast / moved when asked)."""
    return [t.detach().to(device or t.device, dtype or t.dtype).requires_grad_() for t in tensors]


def upstream_grads(outputs: Sequence[torch.Tensor], seed: int = 1, integers: bool = False) -> list:
    """Seeded random upstream gradients for the floating-point outputs (None for the others)."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for t in outputs:
        if not t.is_floating_point():
            grads.append(None)
            continue
        r = torch.randint(-1, 2, t.shape, generator=g).double() if integers else \
            torch.randn(t.shape, generator=g, dtype=torch.float64)
        grads.append(r.to(t))
    return grads


def forward_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], seed: int = 1, integers: bool = False,
                      grad_outputs: Sequence | None = None):
    """(outputs, gradients): `fn(*inputs)` and the gradients, with respect to the inputs that
    require grad, of the random linear loss sum <output, random> over the floating outputs."""
    outputs = fn(*inputs)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    grad_outputs = upstream_grads(outputs, seed, integers) if grad_outputs is None else grad_outputs
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not pairs or not wrt:
        return outputs, ()
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    return outputs, tuple(torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt))


def optional_leaf_copies(tensors: Sequence[torch.Tensor | None], **kw) -> list:
    """leaf_copies of a list whose optional inputs may be None (kept None)."""
    return [None if t is None else leaf_copies([t], **kw)[0] for t in tensors]


def forward_and_grads_optional(fn: Callable, tensors: Sequence[torch.Tensor | None], grad_outputs=None):
    """forward_and_grads of fn(*tensors) where optional inputs may be None: they are passed
    to fn as None and get no gradient."""
    present = [t for t in tensors if t is not None]
    positions = [i for i, t in enumerate(tensors) if t is not None]

    def call(*xs):
        full = [None] * len(tensors)
        for i, x in zip(positions, xs):
            full[i] = x
        return fn(*full)

    return forward_and_grads(call, present, grad_outputs=grad_outputs)


def assert_compiled_matches_eager(fn: Callable, tensors: Sequence[torch.Tensor | None], device) -> None:
    """torch.compile(fn, fullgraph=True) gives fn's outputs and gradients (optional inputs may be
    None): the op's fake and autograd registrations trace without graph breaks."""
    tensors = [None if t is None else t.to(device) for t in tensors]
    want = forward_and_grads_optional(fn, optional_leaf_copies(tensors))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_same(forward_and_grads_optional(compiled, optional_leaf_copies(tensors)), want, rtol=1e-6, atol=1e-6)


def check_optional_against_reference(forward: Callable, reference: Callable, backend: Backend,
                                     tensors: Sequence[torch.Tensor | None], canary_variant: str | None = None,
                                     dtype=torch.float64, tol: Mapping | None = None) -> None:
    """forward(*tensors) on `backend` (cast to `dtype`; optional inputs may be None), outputs and
    gradients, against reference(*tensors) in float64 under the same upstream gradients. With
    `canary_variant` (a CANARY_VARIANTS name) the inputs and upstream gradients are views into
    NaN-filled buffers, so any out-of-bounds read shows."""
    want = forward_and_grads_optional(reference, optional_leaf_copies(tensors))
    got_inputs = optional_leaf_copies(tensors, dtype=dtype, device=backend.device)
    grad_outputs = [g.to(backend.device, dtype) for g in upstream_grads(want[0])]
    if canary_variant is not None:
        kw = CANARY_VARIANTS[canary_variant]
        got_inputs = [None if t is None else canary(t.detach(), **kw).requires_grad_() for t in got_inputs]
        grad_outputs = [canary(g, **kw) for g in grad_outputs]
    got = forward_and_grads_optional(forward, got_inputs, grad_outputs)
    if dtype != torch.float64:
        assert all(t.dtype == dtype for t in _flatten(got))
        got = [t.double() for t in _flatten(got)]
    assert_same(got, want, **(tol or {}))


def tolerance(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return dict(rtol=rtol, atol=atol)


def assert_same(got, want, names: Sequence[str] | None = None, **tol) -> None:
    """Nested tuples of tensors equal: integer tensors exactly, floating ones within `tol`
    (default: the dtype's tolerance), NaN equal to NaN, on the device of `want`."""
    got, want = _flatten(got), _flatten(want)
    assert len(got) == len(want), f"{len(got)} tensors, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        name = names[i] if names else f"tensor {i}"
        a = a.to(b.device)
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        if not b.is_floating_point():
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: {(a != b).sum()} elements differ"
        else:
            kw = tol or tolerance(b.dtype)
            torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}", **kw)


def _flatten(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for part in x for t in _flatten(part)]


# ---------------------------------------------------------------------------------------
# Canary buffers.

def canary(t: torch.Tensor, fill: float = float("nan"), before: int = 7, after: int = 7, gap: int = 1,
           channels_last: bool = False, flat_pixels: bool = False) -> torch.Tensor:
    """`t`'s values in a view into a larger buffer filled with `fill` (NaN).

    The buffer holds `before` elements before the view and `after` after it, and every dimension
    but the outermost is padded by `gap` elements (between rows, channels, frames), so a kernel
    that reads one element outside the tensor, or uses a wrong stride, reads NaN and shows it in
    its outputs. `channels_last` lays dim -3 (the channels of (..., C, H, W)) innermost.
    `flat_pixels` leaves the innermost storage dim unpadded, so that (H, W) still flatten into
    one pixel dimension and kernels that copy other layouts read this one in place (a read
    just before or after a row then lands in the neighbouring row or in the padding of the
    dim above). The result is a leaf requiring grad when `t` does.
    """
    order = list(range(t.dim()))
    if channels_last and t.dim() >= 3:
        order = order[:-3] + [t.dim() - 2, t.dim() - 1, t.dim() - 3]  # storage order of the dims
    last = len(order) - 1
    storage_shape = [t.shape[d] + (gap if 0 < i and not (flat_pixels and i == last) else 0)
                     for i, d in enumerate(order)]
    numel = 1
    for s in storage_shape:
        numel *= s
    buf = torch.full((before + numel + after,), fill, dtype=t.dtype, device=t.device)
    padded = buf[before:before + numel].view(storage_shape)
    view = padded[tuple(slice(0, t.shape[d]) for d in order)]
    inverse = [order.index(d) for d in range(t.dim())]
    view = view.permute(inverse)
    with torch.no_grad():
        view.copy_(t)
    return view.requires_grad_(t.requires_grad)


CANARY_VARIANTS = {  # name: canary() keywords
    "flat": dict(flat_pixels=True),
    "gapped": dict(),
    "gapped_channels_last": dict(channels_last=True),
}


def canaries(inputs: Sequence[torch.Tensor], **kw) -> list[torch.Tensor]:
    """`canary` of every tensor (other arguments passed through)."""
    return [canary(t.detach(), **kw).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in inputs]


# ---------------------------------------------------------------------------------------
# Layout sweep. Each layout maps a tensor to one with a different memory layout; all but
# "expanded" keep the values (that one repeats index 0 of dim 0, with stride 0), so a test
# compares a backend on `layout(x)` with the reference on `layout(x).contiguous()`.

def _channels_last(t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 3:
        return t.clone()
    c = t.dim() - 3
    return t.movedim(c, -1).contiguous().movedim(-1, c)


def _hw_swapped(t: torch.Tensor) -> torch.Tensor:
    """H/W strides swapped: stored transposed (x slower than y)."""
    if t.dim() < 2:
        return t.clone()
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _expanded(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Stride 0 along `dim`: one slice repeated (the values change: every slice equals the first)."""
    return t.narrow(dim, 0, min(1, t.shape[dim])).clone().expand(t.shape)


def _sliced(t: torch.Tensor, step: int = 2, offset: int = 1) -> torch.Tensor:
    """Every `step`-th element of the last dim of a larger buffer, from `offset`: non-unit
    innermost stride and a storage offset."""
    shape = list(t.shape)
    shape[-1] = shape[-1] * step + offset
    out = torch.randn(shape, dtype=torch.float64).to(t)[..., offset::step]
    with torch.no_grad():
        out.copy_(t)
    return out


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": _channels_last,
    "hw_swapped": _hw_swapped,
    "expanded": _expanded,
    "sliced": _sliced,
}


def apply_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`LAYOUTS[layout]` of a detached `t`, a leaf requiring grad when `t` does."""
    return LAYOUTS[layout](t.detach()).requires_grad_(t.requires_grad)


def layout_assignments(names: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """(id, {input name: layout}) cases: each non-contiguous layout on one input alone (the
    others contiguous), then mixed: every input a different layout, rotated over the inputs."""
    layouts = [l for l in LAYOUTS if l != "contiguous"]
    cases = []
    for name in names:
        for layout in layouts:
            cases.append((f"{name}={layout}", {n: layout if n == name else "contiguous" for n in names}))
    for shift in range(len(layouts)):
        assign = {n: layouts[(i + shift) % len(layouts)] for i, n in enumerate(names)}
        cases.append(("mixed:" + ",".join(f"{n}={l}" for n, l in assign.items()), assign))
    return cases


# ---------------------------------------------------------------------------------------
# Size mismatches.

def resize_dim(t: torch.Tensor, dim: int, delta: int) -> torch.Tensor:
    """`t` one (or `delta`) larger or smaller along `dim`: narrowed, or extended with a copy of
    its own leading slices (so integer inputs such as indices stay valid)."""
    if delta < 0:
        return t.narrow(dim, 0, t.shape[dim] + delta).clone()
    reps = [t]
    while sum(r.shape[dim] for r in reps) < t.shape[dim] + delta:
        missing = t.shape[dim] + delta - sum(r.shape[dim] for r in reps)
        reps.append(t.narrow(dim, 0, min(t.shape[dim], missing)))
    return torch.cat(reps, dim).clone()


class Mismatch(NamedTuple):
    id: str
    name: str  # the resized input
    dim: int
    delta: int
    group: tuple  # the input names that must agree on that size
    inputs: dict  # every input, `name` resized


def size_mismatches(inputs: Mapping[str, torch.Tensor], agree: Mapping[str, Sequence[tuple[str, int]]],
                    deltas: Sequence[int] = (1, -1)) -> Iterator[Mismatch]:
    """For every group of (input, dim) that must agree (keyed by a label such as "B"), every
    input in it and every delta: the inputs with that one dimension resized by delta."""
    for label, members in agree.items():
        group = tuple(name for name, _ in members)
        for name, dim in members:
            for delta in deltas:
                if inputs[name].shape[dim] + delta < 0:
                    continue
                changed = dict(inputs)
                changed[name] = resize_dim(inputs[name], dim, delta)
                yield Mismatch(f"{name}.{label}{delta:+d}", name, dim, delta, group, changed)


# ---------------------------------------------------------------------------------------
# Calls that may crash.

class Outcome(NamedTuple):
    kind: str  # "returned", "raised", "crashed" or "timeout"
    error: str = ""  # the exception's type name, or the signal
    message: str = ""


def call_isolated(fn: Callable[[], object], timeout: float = 120.0) -> Outcome:
    """Runs `fn()` in a forked child, so that an out-of-bounds read that faults (a kernel fed
    mismatched sizes) fails one test instead of killing the session. The child runs torch with
    one thread (an OpenMP pool does not survive fork). Without fork, or once CUDA is initialised,
    runs in-process."""
    if not hasattr(os, "fork") or torch.cuda.is_initialized():  # CUDA does not survive fork
        try:
            fn()
            return Outcome("returned")
        except Exception as error:  # noqa: BLE001
            return Outcome("raised", type(error).__name__, str(error))
    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            torch.set_num_threads(1)
            try:
                fn()
                result = Outcome("returned")
            except Exception as error:  # noqa: BLE001
                result = Outcome("raised", type(error).__name__, str(error)[:2000])
            os.write(write, pickle.dumps(tuple(result)))
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([read], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return Outcome("timeout", f"no result in {timeout} s")
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return Outcome(*pickle.loads(b"".join(chunks)))
    if os.WIFSIGNALED(status):
        return Outcome("crashed", signal.Signals(os.WTERMSIG(status)).name)
    return Outcome("crashed", f"exit status {os.WEXITSTATUS(status)}")
