"""deform_kernel_conv2d on every backend, through the shared harness (tests/_harness.py).

Backends: "reference", "cpu" (C++), "triton" (the interpreter on CPU tensors without a GPU,
real kernels on CUDA tensors) and "cuda" (GPU only), each skipped with the reason when this
installation cannot run it. The oracle is the float64 reference (vsr_kernels.reference), itself
checked here against a per-output loop and, with zero kernel offsets, against a depthwise
F.conv2d with the centre crop of the scope. Each property once:

- a float64 sweep (SWEEP, >= 30 cases: scope = kernel, scope larger, odd scope - kernel
  difference (half-integer centre), kernel offsets zero, random, integer, on the scope's -1 / S
  boundaries and pointing far outside it, with and without input offset / mask, mask without
  offset, stride / padding / dilation, several kernel and offset groups, 1x1 and non-square
  kernels, batch 0 and 3): outputs and the gradients of all six inputs, plain and with canary
  inputs (views into NaN-filled buffers: an out-of-bounds read shows);
- gradcheck of all six inputs, opcheck of every registered op pair, torch.compile, the layout
  sweep, size mismatches both ways through the public function and the registered ops, bad
  inputs to the registered ops, NaN, the -1 edges read nothing, low precision with float32
  accumulation, autocast, determinism of the backward (and, on CPU, across thread counts).

The Triton interpreter is slow: Triton cases keep tiny shapes and a shorter sweep.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import vsr_kernels
from vsr_kernels import reference
from vsr_kernels.reference.deform_conv2d import output_size
from vsr_kernels.reference.deform_kernel_conv2d import kernel_points

import _harness as H
from deform_conv2d_cases import sample_point

OP = "deform_kernel_conv2d"
NAMES = ("input", "weight", "kernel_offset", "offset", "mask", "bias")
BACKENDS = H.backend_params(OP)
KERNEL_BACKENDS = ("cpu", "triton", "cuda")
AVAILABLE = {b.name for b in H.available_backends(OP)}
needs_cpu = pytest.mark.skipif("cpu" not in AVAILABLE, reason=f"backend='cpu': {H.unavailable(OP, 'cpu')}")
FLOAT64 = dict(rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------------------------------
# Cases.

# (B, C, H, W, (kh, kw), (Sh, Sw), Gk, G, stride, padding, dilation, offset, mask, kind)
# kind of the kernel offsets: "zero", "random" (within ~1.5 scope cells), "integer" (whole
# cells), "outside" (a third far outside the scope), "boundary" (points exactly on -1, 0,
# S - 1, S and just inside -1 / S), "mixed" (half boundary, some far outside; the input offsets
# then also point outside the input for a third of the taps).
SWEEP = [
    (1, 2, 5, 6, (3, 3), (3, 3), 1, 1, 1, 1, 1, True, True, "random"),  # scope = kernel
    (2, 4, 6, 5, (3, 3), (5, 5), 2, 2, 1, 1, 1, True, True, "random"),
    (1, 4, 6, 6, (3, 3), (5, 5), 1, 1, 1, 1, 1, False, False, "random"),  # regular grid
    (1, 2, 6, 7, (3, 3), (4, 4), 1, 1, 1, 1, 1, True, True, "random"),  # half-integer centre
    (1, 3, 5, 6, (3, 3), (4, 5), 1, 1, 1, 1, 1, False, False, "random"),
    (2, 4, 6, 6, (3, 3), (5, 5), 1, 1, 1, 1, 1, False, False, "zero"),  # depthwise conv, centre crop
    (1, 4, 6, 5, (3, 3), (5, 5), 2, 2, 1, 1, 1, True, True, "zero"),
    (1, 2, 6, 6, (3, 3), (5, 5), 1, 1, 1, 1, 1, True, True, "outside"),
    (1, 4, 5, 6, (3, 3), (5, 5), 2, 1, 1, 1, 1, False, False, "outside"),
    (1, 4, 6, 6, (3, 3), (5, 5), 1, 2, 1, 1, 1, False, True, "random"),  # mask without offset
    (1, 2, 6, 5, (3, 3), (5, 5), 1, 1, 1, 1, 1, True, False, "random"),  # offset without mask
    (1, 2, 7, 8, (3, 3), (5, 5), 1, 1, 2, 1, 1, True, True, "random"),  # stride 2
    (1, 2, 8, 7, (3, 3), (5, 5), 1, 1, 1, 2, 2, True, True, "random"),  # dilation 2
    (1, 2, 9, 8, (3, 3), (4, 4), 1, 1, 2, 2, 2, False, True, "random"),
    (1, 4, 6, 6, (3, 3), (5, 5), 2, 1, 1, 1, 1, True, True, "random"),  # kernel groups
    (1, 4, 6, 6, (3, 3), (5, 5), 1, 2, 1, 1, 1, True, True, "random"),  # offset groups
    (1, 8, 5, 5, (3, 3), (5, 5), 2, 4, 1, 1, 1, True, True, "mixed"),
    (1, 8, 5, 6, (3, 3), (4, 5), 4, 2, 1, 1, 1, True, True, "random"),
    (1, 6, 5, 5, (3, 3), (5, 5), 3, 2, 1, 1, 1, True, False, "random"),  # groups that do not nest
    (1, 2, 5, 6, (1, 1), (1, 1), 1, 1, 1, 0, 1, True, True, "random"),  # 1x1
    (1, 2, 5, 5, (1, 1), (3, 3), 2, 1, 1, 0, 1, False, False, "random"),
    (1, 2, 5, 7, (1, 3), (3, 5), 1, 1, 1, (0, 1), 1, True, True, "random"),  # non-square
    (1, 2, 7, 5, (3, 1), (4, 2), 1, 2, 1, (1, 0), 1, True, True, "random"),
    (1, 2, 6, 7, (2, 3), (5, 4), 1, 1, 1, 1, 1, True, True, "random"),
    (1, 2, 6, 6, (3, 3), (5, 5), 1, 1, 1, 1, 1, True, True, "integer"),
    (1, 4, 6, 5, (3, 3), (5, 5), 2, 1, 1, 1, 1, False, True, "integer"),
    (1, 2, 6, 6, (3, 3), (5, 5), 1, 1, 1, 1, 1, True, True, "boundary"),
    (1, 2, 5, 6, (3, 3), (3, 3), 1, 1, 1, 1, 1, False, False, "boundary"),
    (1, 2, 6, 5, (3, 3), (4, 5), 2, 1, 1, 1, 1, True, True, "boundary"),
    (2, 4, 6, 6, (3, 3), (5, 5), 2, 2, 1, 1, 1, True, True, "mixed"),
    (1, 2, 7, 9, (3, 3), (5, 5), 1, 1, (1, 2), (2, 1), (2, 1), True, True, "random"),
    (1, 2, 9, 7, (3, 3), (5, 4), 1, 1, (2, 1), (0, 2), (1, 2), False, False, "mixed"),
    (1, 2, 6, 6, (3, 3), (5, 5), 1, 1, 1, 0, 1, True, True, "random"),  # no padding
    (1, 2, 8, 8, (5, 5), (7, 7), 1, 1, 1, 2, 1, True, True, "random"),
    (1, 2, 1, 6, (1, 3), (2, 4), 1, 1, 1, (0, 1), 1, True, True, "mixed"),
    (1, 2, 6, 1, (3, 1), (3, 2), 1, 1, 1, (1, 0), 1, False, True, "boundary"),
    (0, 2, 5, 5, (3, 3), (5, 5), 1, 1, 1, 1, 1, True, True, "random"),  # batch 0
    (0, 4, 4, 4, (1, 1), (3, 3), 2, 2, 1, 0, 1, False, False, "random"),
    (3, 2, 4, 3, (3, 3), (5, 5), 1, 1, 1, 1, 1, True, True, "mixed"),
]


def case_id(case) -> str:
    B, C, Hh, Ww, (kh, kw), (Sh, Sw), Gk, G, s, p, d, o, m, kind = case
    return (f"B{B}-C{C}-{Hh}x{Ww}-k{kh}x{kw}-S{Sh}x{Sw}-Gk{Gk}-G{G}-s{s}-p{p}-d{d}"
            f"-{'off' if o else 'nooff'}-{'mask' if m else 'nomask'}-{kind}")


def make_case(case, seed: int, dtype=torch.float64):
    """(tensors, geometry): tensors = [input, weight, kernel_offset, offset, mask, bias] (None
    where absent), geometry = (kernel_size, stride, padding, dilation)."""
    B, C, Hh, Ww, (kh, kw), (Sh, Sw), Gk, G, stride, padding, dilation, with_offset, with_mask, kind = case
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = output_size(Hh, Ww, (kh, kw), stride, padding, dilation)
    K = kh * kw

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    input = rand(B, C, Hh, Ww)
    weight = rand(C, 1, Sh, Sw)
    bias = rand(C) if seed % 3 else None
    kernel_offset = torch.zeros(B, 2 * Gk * K, Ho, Wo, dtype=torch.float64) if kind == "zero" else \
        0.75 * rand(B, 2 * Gk * K, Ho, Wo)
    if kind in ("outside", "mixed"):
        far = uniform(kernel_offset.shape) < 1 / 3
        sign = torch.where(uniform(kernel_offset.shape) < 0.5, -1.0, 1.0).double()
        kernel_offset = torch.where(far, kernel_offset + sign * (max(Sh, Sw) + 3 * uniform(kernel_offset.shape)),
                                    kernel_offset)
    if kind == "integer":
        kernel_offset = torch.round(kernel_offset)
    if kind in ("boundary", "mixed"):
        # Points exactly on a chosen scope coordinate: offset = target - the tap's centre point.
        ky, kx = kernel_points(torch.zeros_like(kernel_offset), (kh, kw), (Sh, Sw))  # (B, Gk, K, Ho, Wo)
        ty = torch.tensor([-1.0, -1 + 1e-3, -0.5, 0.0, Sh - 1.0, Sh - 0.5, Sh - 1e-3, Sh, Sh + 0.25],
                          dtype=torch.float64)
        tx = torch.tensor([-1.0, -1 + 1e-3, -0.5, 0.0, Sw - 1.0, Sw - 0.5, Sw - 1e-3, Sw, 1.5], dtype=torch.float64)
        iy = torch.randint(len(ty), ky.shape, generator=gen)
        ix = torch.randint(len(tx), kx.shape, generator=gen)
        target = torch.stack((ty[iy] - ky, tx[ix] - kx), 3).reshape(kernel_offset.shape)
        kernel_offset = target if kind == "boundary" else torch.where(uniform(target.shape) < 0.5, target,
                                                                      kernel_offset)
    offset = None
    if with_offset:
        offset = 2 * rand(B, 2 * G * K, Ho, Wo)
        if kind == "integer":
            offset = torch.round(offset)
        if kind == "mixed":
            far = uniform(offset.shape) < 1 / 3
            sign = torch.where(uniform(offset.shape) < 0.5, -1.0, 1.0).double()
            offset = torch.where(far, offset + sign * (max(Hh, Ww) + 3 * uniform(offset.shape)), offset)
    mask = uniform(B, G * K, Ho, Wo) if with_mask else None
    tensors = [None if t is None else t.to(dtype) for t in (input, weight, kernel_offset, offset, mask, bias)]
    return tensors, ((kh, kw), stride, padding, dilation)


def _forward(backend, kernel_size, stride, padding, dilation):
    def fn(input, weight, kernel_offset, offset=None, mask=None, bias=None):
        return vsr_kernels.deform_kernel_conv2d(input, weight, kernel_offset, kernel_size, offset, mask, bias,
                                                stride, padding, dilation, backend=str(backend))
    return fn


def _reference(kernel_size, stride, padding, dilation):
    def fn(input, weight, kernel_offset, offset=None, mask=None, bias=None):
        return reference.deform_kernel_conv2d(input, weight, kernel_offset, kernel_size, offset, mask, bias,
                                              stride, padding, dilation)
    return fn


def check_against_reference(backend, tensors, geometry, canary=None, dtype=torch.float64, tol=FLOAT64):
    H.check_optional_against_reference(_forward(backend, *geometry), _reference(*geometry), backend, tensors,
                                       canary, dtype, tol)


# ---------------------------------------------------------------------------------------
# The oracle itself: a per-output loop, and the depthwise convolution it reduces to.

def loop_oracle(tensors, geometry):
    input, weight, kernel_offset, offset, mask, bias = tensors
    (kh, kw), stride, padding, dilation = geometry
    pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    B, C, Hh, Ww = input.shape
    Sh, Sw = weight.shape[2:]
    K = kh * kw
    Ho, Wo = kernel_offset.shape[2:]
    Gk = kernel_offset.shape[1] // (2 * K)
    G = offset.shape[1] // (2 * K) if offset is not None else mask.shape[1] // K if mask is not None else 1
    x, w, ko = input.tolist(), weight.tolist(), kernel_offset.tolist()
    off = offset.tolist() if offset is not None else None
    m = mask.tolist() if mask is not None else None
    out = torch.zeros(B, C, Ho, Wo, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            gk, g = c // (C // Gk), c // (C // G)
            for oy in range(Ho):
                for ox in range(Wo):
                    acc = float(bias[c]) if bias is not None else 0.0
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            kv = sample_point(w[c][0], i + (Sh - kh) / 2 + ko[b][2 * (gk * K + k)][oy][ox],
                                         j + (Sw - kw) / 2 + ko[b][2 * (gk * K + k) + 1][oy][ox])
                            y, xx = oy * sh - ph + i * dh, ox * sw - pw + j * dw
                            if off is not None:
                                xv = sample_point(x[b][c], y + off[b][2 * (g * K + k)][oy][ox],
                                             xx + off[b][2 * (g * K + k) + 1][oy][ox])
                            else:
                                xv = x[b][c][y][xx] if 0 <= y < Hh and 0 <= xx < Ww else 0.0
                            if m is not None:
                                xv *= m[b][g * K + k][oy][ox]
                            acc += kv * xv
                    out[b, c, oy, ox] = acc
    return out


@pytest.mark.parametrize("index", [1, 3, 9, 16, 18, 23, 27, 29, 31, 34, 38])
def test_reference_matches_loop_oracle(index):
    tensors, geometry = make_case(SWEEP[index], seed=index)
    H.assert_same(_reference(*geometry)(*tensors), loop_oracle(tensors, geometry), **FLOAT64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", [((3, 3), 1, 1, 1), ((3, 3), 2, 2, 2), ((1, 3), (1, 2), (0, 1), 1)],
                         ids=["3x3", "3x3-s2-p2-d2", "1x3"])
def test_zero_kernel_offsets_equal_depthwise_conv_with_centre_crop(backend, geometry):
    (kh, kw), stride, padding, dilation = geometry
    gen = torch.Generator().manual_seed(3)
    C, Sh, Sw = 3, kh + 2, kw + 4
    input = torch.randn(2, C, 7, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, 1, Sh, Sw, generator=gen, dtype=torch.float64)
    bias = torch.randn(C, generator=gen, dtype=torch.float64)
    crop = weight[:, :, (Sh - kh) // 2:(Sh - kh) // 2 + kh, (Sw - kw) // 2:(Sw - kw) // 2 + kw]
    want = F.conv2d(input, crop, bias, stride, padding, dilation, groups=C)
    kernel_offset = torch.zeros(2, 2 * kh * kw, *want.shape[2:], dtype=torch.float64)
    got = _forward(backend, *geometry)(input.to(backend.device), weight.to(backend.device),
                                       kernel_offset.to(backend.device), bias=bias.to(backend.device))
    H.assert_same(got, want, **FLOAT64)


# ---------------------------------------------------------------------------------------
# The sweeps.

TRITON_SWEEP = (1, 5, 16, 21, 28, 36)  # the interpreter: one of each kind


def _sweep_params():
    params = []
    variants = list(H.CANARY_VARIANTS)
    for param in BACKENDS:
        backend = param.values[0]
        indices = TRITON_SWEEP if backend.name == "triton" and backend.device.type == "cpu" else range(len(SWEEP))
        for i in indices:
            canary = None if i % 2 == 0 or backend.name == "reference" else variants[i // 2 % len(variants)]
            params.append(pytest.param(backend, i, canary, marks=param.marks,
                                       id=f"{backend}-{case_id(SWEEP[i])}-{canary or 'plain'}"))
    return params


def test_sweep_is_large_enough():
    assert len(SWEEP) >= 30
    kinds = {c[-1] for c in SWEEP}
    assert {"zero", "random", "integer", "outside", "boundary", "mixed"} <= kinds
    assert {0, 3} <= {c[0] for c in SWEEP}
    assert any(c[5] == c[4] for c in SWEEP) and any((c[5][0] - c[4][0]) % 2 for c in SWEEP)
    assert any(not c[11] and c[12] for c in SWEEP)  # mask without offset


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend,index,canary", _sweep_params())
def test_sweep_matches_reference_float64(backend, index, canary):
    """Odd entries read canary inputs and upstream gradients (cycling through the variants)."""
    check_against_reference(backend, *make_case(SWEEP[index], seed=index), canary=canary)


def _random_case(seed):
    rng = random.Random(seed)
    kh, kw = rng.choice([(1, 1), (3, 3), (3, 3), (5, 5), (1, 3), (3, 1), (2, 3)])
    Sh, Sw = kh + rng.randint(0, 3), kw + rng.randint(0, 3)
    Gk, G = rng.choice([(1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2)])
    C = 4 * rng.randint(1, 2)
    s, p, d = rng.randint(1, 2), rng.randint(0, 2), rng.randint(1, 2)
    Hh = rng.randint(max(1, d * (kh - 1) + 1 - 2 * p), 9)
    Ww = rng.randint(max(1, d * (kw - 1) + 1 - 2 * p), 9)
    kind = rng.choice(["zero", "random", "outside", "integer", "boundary", "mixed"])
    return (rng.randint(1, 2), C, Hh, Ww, (kh, kw), (Sh, Sw), Gk, G, s, p, d, rng.random() < 0.6,
            rng.random() < 0.6, kind)


@pytest.mark.parametrize("backend,seed", [
    pytest.param(p.values[0], seed, marks=p.marks, id=f"{p.values[0]}-{seed}")
    for p in BACKENDS if p.values[0].name != "reference"
    for seed in (range(1) if p.values[0].name == "triton" and p.values[0].device.type == "cpu" else range(16))])
def test_random_sweep_matches_reference(backend, seed):
    check_against_reference(backend, *make_case(_random_case(seed), seed=seed + 100))


# Shapes wide enough for the CPU backend's vector paths (the sweep's are not): 16 output
# positions per tap-building segment plus a tail (W not a multiple of 16), 64 float32 (32
# float64) channels summed in registers plus a scalar channel tail (C not a multiple of them),
# groups, borders, no offset; float64 and float32, and the float32 results independent of the
# thread count.
WIDE = [
    (1, 72, 5, 37, (3, 3), (5, 5), 1, 1, 1, 1, 1, True, True, "mixed"),
    (1, 64, 4, 33, (3, 3), (5, 5), 2, 2, 1, 1, 1, True, True, "boundary"),
    (1, 80, 4, 18, (3, 3), (5, 5), 1, 1, 2, 1, 1, False, True, "random"),
    (2, 64, 3, 17, (3, 3), (4, 5), 1, 4, 1, 2, 2, True, False, "outside"),
]


@needs_cpu
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", WIDE, ids=case_id)
def test_cpu_vector_paths_match_reference(case):
    cpu = next(p.values[0] for p in BACKENDS if p.values[0].name == "cpu")
    check_against_reference(cpu, *make_case(case, seed=11))
    # NaN canaries around every input and upstream gradient: no read outside them.
    check_against_reference(cpu, *make_case(case, seed=13), canary=next(iter(H.CANARY_VARIANTS)))
    tensors, geometry = make_case(case, seed=12, dtype=torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(H.forward_and_grads_optional(_forward("cpu", *geometry), H.optional_leaf_copies(tensors)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(H._flatten(runs[0]), H._flatten(runs[1])):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Gradients, registration, compile.

TINY = (2, 4, 4, 5, (3, 3), (5, 4), 2, 2, 1, 1, 1, True, True, "random")


def _tiny(dtype=torch.float64, seed=0, kind="random", bias=True):
    tensors, geometry = make_case(TINY[:-1] + (kind,), seed=seed, dtype=dtype)
    if bias and tensors[5] is None:
        tensors[5] = torch.randn(4, dtype=dtype)
    return tensors, geometry


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
def test_gradcheck_all_six_inputs(backend):
    tensors, geometry = _tiny()
    fast = backend.name == "triton"
    if fast and backend.device.type == "cpu":  # the interpreter: one batch element, 3x4 output
        tensors, geometry = make_case((1, 2, 3, 4, (3, 3), (4, 4), 1, 1, 1, 1, 1, True, True, "random"), seed=0)
        tensors[5] = torch.randn(2, dtype=torch.float64)
    tensors = [t.detach().clone().to(backend.device).requires_grad_() for t in tensors]
    fn = _forward(backend, *geometry)
    assert torch.autograd.gradcheck(fn, tensors, fast_mode=fast)
    # Without offset, mask and bias (the plain deformable-kernel convolution), and the mask alone.
    assert torch.autograd.gradcheck(lambda i, w, k: fn(i, w, k), tensors[:3], fast_mode=fast)
    assert torch.autograd.gradcheck(lambda i, w, k, m: fn(i, w, k, None, m), tensors[:3] + tensors[4:5],
                                    fast_mode=fast)


def _registered(backend):
    ops = torch.ops.vsr_kernels
    if backend == "triton":
        import importlib
        importlib.import_module("vsr_kernels.triton.deform_kernel_conv2d")  # registers the ops
        return ops.deform_kernel_conv2d_triton, ops.deform_kernel_conv2d_triton_backward
    return ops.deform_kernel_conv2d, ops.deform_kernel_conv2d_backward


def _op_args(tensors, geometry):
    return (*tensors, *[list(g) if isinstance(g, tuple) else [g, g] for g in geometry])


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
@pytest.mark.parametrize("optional", ["all", "none", "mask"])
def test_opcheck(backend, optional):
    tensors, geometry = _tiny()
    tensors = [t.to(backend.device) for t in tensors]
    _forward(backend, *geometry)(*tensors)  # registers fake and autograd
    forward, backward = _registered(backend.name)
    if optional == "none":
        tensors[3] = tensors[4] = tensors[5] = None
    elif optional == "mask":
        tensors[3] = tensors[5] = None
    args = _op_args([t.requires_grad_() if t is not None else None for t in tensors], geometry)
    # The interpreter is slow: there, aot_dispatch_dynamic (several more traced runs) is left out.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if (
        backend.name == "triton" and backend.device.type == "cpu") else None
    torch.library.opcheck(forward, args, **({"test_utils": utils} if utils else {}))
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    out = forward(*detached)
    torch.library.opcheck(backward, (torch.randn_like(out), *detached), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
def test_compile_fullgraph_matches_eager(backend):
    tensors, geometry = _tiny(torch.float32)
    H.assert_compiled_matches_eager(_forward(backend, *geometry), tensors, backend.device)


# ---------------------------------------------------------------------------------------
# Layouts, sizes, bad inputs.

LAYOUT_CASES = H.layout_assignments(NAMES)


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_layout_sweep(backend, case):
    """Channels-last, transposed H/W, stride-0 expanded, sliced (non-unit innermost stride)
    inputs give what the reference gives on the same values made contiguous."""
    if backend.name == "triton" and not case[0].startswith("mixed") and backend.device.type == "cpu":
        pytest.skip("the Triton interpreter runs the mixed layouts only (time)")
    _, assign = case
    tensors, geometry = _tiny(seed=5)
    laid = [H.apply_layout(t, assign[n]) for n, t in zip(NAMES, tensors)]
    want = H.forward_and_grads_optional(_reference(*geometry), [t.detach().contiguous().requires_grad_() for t in laid])
    got_inputs = [H.apply_layout(t.to(backend.device), assign[n]).requires_grad_() for n, t in zip(NAMES, laid)]
    got = H.forward_and_grads_optional(_forward(backend, *geometry), got_inputs)
    H.assert_same(got, want, **FLOAT64)


MISMATCH_CASE = (2, 4, 4, 5, (3, 3), (5, 5), 2, 2, 1, 1, 1, True, True, "random")
FORWARD_AGREE = {
    "B": [("input", 0), ("kernel_offset", 0), ("offset", 0), ("mask", 0)],
    "Ho": [("kernel_offset", 2), ("offset", 2), ("mask", 2)],
    "Wo": [("kernel_offset", 3), ("offset", 3), ("mask", 3)],
    "C": [("input", 1), ("weight", 0), ("bias", 0)],
    "taps": [("kernel_offset", 1), ("offset", 1), ("mask", 1)],
    "one": [("weight", 1)],
    "H": [("input", 2)],
    "W": [("input", 3)],
}


def _mismatch_inputs():
    tensors, _ = make_case(MISMATCH_CASE, seed=4)
    tensors[5] = torch.randn(4, dtype=torch.float64)
    return dict(zip(NAMES, tensors))


MISMATCHES = list(H.size_mismatches(_mismatch_inputs(), FORWARD_AGREE))
GEOMETRY = [3, 3], [1, 1], [1, 1], [1, 1]


def _call_args(t, geometry=GEOMETRY):
    return (t["input"], t["weight"], t["kernel_offset"], t["offset"], t["mask"], t["bias"], *geometry)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mismatch", MISMATCHES, ids=[m.id for m in MISMATCHES])
def test_size_mismatch_public_function(backend, mismatch):
    t = {n: x.to(backend.device) for n, x in mismatch.inputs.items()}
    names = "|".join(sorted({mismatch.name, *mismatch.group, "kernel_offset"}))
    with pytest.raises(ValueError, match=names):
        vsr_kernels.deform_kernel_conv2d(t["input"], t["weight"], t["kernel_offset"], 3, t["offset"], t["mask"],
                                         t["bias"], 1, 1, 1, backend=str(backend))


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
@pytest.mark.parametrize("mismatch", MISMATCHES, ids=[m.id for m in MISMATCHES])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_size_mismatch_registered_ops(backend, mismatch, which):
    """The registered ops called directly refuse every mismatch (no out-of-bounds read): the
    call runs in a forked child so that a read that faults fails this test only."""
    forward, backward = _registered(backend.name)
    t = {n: x.to(backend.device) for n, x in mismatch.inputs.items()}
    grad_out = torch.randn(2, 4, 4, 5, dtype=torch.float64, device=backend.device)

    def call():
        return forward(*_call_args(t)) if which == "forward" else backward(grad_out, *_call_args(t))

    outcome = H.call_isolated(call)
    assert outcome.kind == "raised", outcome
    assert outcome.error in ("RuntimeError", "ValueError"), outcome


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
def test_registered_ops_accept_good_inputs_and_check_grad_out(backend):
    forward, backward = _registered(backend.name)
    t = {n: x.to(backend.device) for n, x in _mismatch_inputs().items()}
    out = forward(*_call_args(t))
    assert out.shape == (2, 4, 4, 5)
    grads = backward(torch.randn_like(out), *_call_args(t))
    assert [tuple(g.shape) for g in grads] == [tuple(t[n].shape) for n in NAMES]
    for dim in range(4):
        for delta in (1, -1):
            bad = H.resize_dim(torch.randn_like(out), dim, delta)
            outcome = H.call_isolated(lambda bad=bad: backward(bad, *_call_args(t)))
            assert outcome.kind == "raised" and "grad_out" in outcome.message, outcome


def _bad_direct_cases():
    t = _mismatch_inputs()
    ok = dict(t)
    yield "input rank", dict(ok, input=t["input"][0]), "input"
    yield "weight rank", dict(ok, weight=t["weight"][0]), "weight"
    yield "kernel_offset rank", dict(ok, kernel_offset=t["kernel_offset"][0]), "kernel_offset"
    yield "scope smaller than kernel", dict(ok, weight=t["weight"][:, :, :2]), "weight"
    yield "kernel groups", dict(ok, kernel_offset=torch.cat([t["kernel_offset"]] * 3, 1)[:, :54]), "kernel_offset"
    yield "offset groups", dict(ok, offset=torch.cat([t["offset"]] * 3, 1)[:, :54], mask=None), "offset"
    yield "mask groups", dict(ok, offset=None, mask=torch.cat([t["mask"]] * 3, 1)[:, :27]), "mask"
    yield "mask channels", dict(ok, mask=t["mask"][:, :9]), "mask"
    yield "offset rank", dict(ok, offset=t["offset"][0]), "offset"
    yield "mask rank", dict(ok, mask=t["mask"][0]), "mask"
    yield "bias rank", dict(ok, bias=t["bias"][None]), "bias"
    yield "dtype", dict(ok, kernel_offset=t["kernel_offset"].float()), "kernel_offset"
    yield "offset dtype", dict(ok, offset=t["offset"].float()), "offset"
    yield "mask dtype", dict(ok, mask=t["mask"].float()), "mask"
    yield "integer input", {k: (v.long() if v is not None else None) for k, v in ok.items()}, "input"


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
@pytest.mark.parametrize("case", list(_bad_direct_cases()), ids=lambda c: c[0])
def test_bad_inputs_to_registered_ops(backend, case):
    _, t, word = case
    forward, _ = _registered(backend.name)
    t = {n: None if x is None else x.to(backend.device) for n, x in t.items()}
    outcome = H.call_isolated(lambda: forward(*_call_args(t)))
    assert outcome.kind == "raised", outcome
    assert word in outcome.message, outcome


BAD_GEOMETRY = [("kernel_size", ([0, 3], [1, 1], [1, 1], [1, 1])), ("stride", ([3, 3], [0, 1], [1, 1], [1, 1])),
                ("padding", ([3, 3], [1, 1], [-1, 1], [1, 1])), ("dilation", ([3, 3], [1, 1], [1, 1], [1, 0])),
                ("kernel_size", ([3, 3, 3], [1, 1], [1, 1], [1, 1]))]


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
@pytest.mark.parametrize("name,geometry", BAD_GEOMETRY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_GEOMETRY)])
def test_bad_hyper_parameters_name_themselves(backend, name, geometry):
    forward, backward = _registered(backend.name)
    t = {n: x.to(backend.device) for n, x in _mismatch_inputs().items()}
    for call in (lambda: forward(*_call_args(t, geometry)),
                 lambda: backward(torch.randn(2, 4, 4, 5, dtype=torch.float64, device=backend.device),
                                  *_call_args(t, geometry))):
        outcome = H.call_isolated(call)
        assert outcome.kind == "raised" and name in outcome.message, outcome


# ---------------------------------------------------------------------------------------
# NaN, edges, low precision, autocast, determinism.

NAN_PLACES = ["input", "weight", "kernel_offset", "offset", "mask"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
@pytest.mark.parametrize("where", NAN_PLACES)
def test_nan_propagates(backend, where):
    tensors, geometry = _tiny(seed=2)
    index = {"input": (1, 3, 2, 2), "weight": (2, 0, 1, 3), "kernel_offset": (0, 4, 1, 2),
             "offset": (1, 6, 2, 3), "mask": (0, 12, 3, 1)}[where]
    tensors[NAMES.index(where)][index] = float("nan")
    want = _reference(*geometry)(*tensors)
    got = _forward(backend, *geometry)(*[t.to(backend.device) for t in tensors]).cpu()
    assert torch.isnan(want).any() and not torch.isnan(want).all()
    H.assert_same(got, want, **FLOAT64)


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
def test_minus_one_edges_read_nothing(backend):
    """A point exactly on the -1 edge (y == -1 or x == -1) of the input or of the kernel scope
    samples 0 without reading: its neighbours inside have weight 0, so a NaN there must not leak
    in (0 * NaN). Row 0 and column 0 of the input and of every scope are NaN; every kernel
    point is on the scope's -1 edge, or every input point on the input's."""
    B, C, Hh, Ww, Sh, Sw = 1, 2, 4, 5, 3, 4
    gen = torch.Generator().manual_seed(0)
    input = torch.randn(B, C, Hh, Ww, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, 1, Sh, Sw, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, 1, Hh, Ww, generator=gen, dtype=torch.float64)
    nan_input, nan_weight = input.clone(), weight.clone()
    nan_input[:, :, 0, :] = nan_input[:, :, :, 0] = float("nan")
    nan_weight[:, :, 0, :] = nan_weight[:, :, :, 0] = float("nan")
    wo = torch.arange(Ww, dtype=torch.float64).view(1, Ww).expand(Hh, Ww)
    ho = torch.arange(Hh, dtype=torch.float64).view(Hh, 1).expand(Hh, Ww)
    # Kernel points: the 1x1 kernel's centre is ((Sh - 1) / 2, (Sw - 1) / 2) = (1, 1.5).
    on_edge = torch.zeros(B, 2, Hh, Ww, dtype=torch.float64)
    on_edge[0, 0] = torch.where(wo < 2, -2.0, 0.25)  # ky == -1 at the first two columns
    on_edge[0, 1] = torch.where(wo < 2, 0.5, -2.5)  # else kx == -1
    inside = torch.full((B, 2, Hh, Ww), 0.25, dtype=torch.float64)
    offset = torch.zeros(B, 2, Hh, Ww, dtype=torch.float64)
    offset[0, 0] = torch.where(wo < 2, -1.0 - ho, 0.5)  # y == -1 at the first two columns
    offset[0, 1] = torch.where(wo < 2, 0.25, -1.0 - wo)  # else x == -1
    safe = torch.full((B, 2, Hh, Ww), 0.5, dtype=torch.float64)
    for tensors in ([input, nan_weight, on_edge, safe, mask, None], [nan_input, weight, inside, offset, mask, None]):
        geometry = ((1, 1), 1, 0, 1)
        want = _reference(*geometry)(*tensors)
        got = _forward(backend, *geometry)(*[t.to(backend.device) if t is not None else None
                                             for t in tensors]).cpu()
        assert torch.equal(want, torch.zeros_like(want))
        H.assert_same(got, want, **FLOAT64)


LOW = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_float32_accumulation(backend, dtype):
    """Inputs rounded to dtype, computed with float32 accumulation: within a few ulps of dtype
    of the float64 reference on the same rounded values (outputs and every gradient)."""
    case = (1, 16, 5, 6, (3, 3), (5, 5), 2, 4, 1, 1, 1, True, True, "random")
    tensors, geometry = make_case(case, seed=11)
    tensors[5] = torch.randn(16, dtype=torch.float64)
    rounded = [t.to(dtype).double() for t in tensors]
    tol = {torch.float16: dict(rtol=1e-2, atol=2e-2), torch.bfloat16: dict(rtol=4e-2, atol=8e-2),
           torch.float32: dict(rtol=1e-4, atol=1e-4)}[dtype]
    check_against_reference(backend, rounded, geometry, dtype=dtype, tol=tol)


@needs_cpu
def test_autocast_on_cpu_runs_in_float32():
    tensors, geometry = _tiny(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _forward("cpu", *geometry)(*tensors)
    assert out.dtype == torch.float32
    H.assert_same(out, _reference(*geometry)(*tensors), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", H.backend_params(OP, KERNEL_BACKENDS))
def test_backward_is_deterministic(backend):
    """Two backward passes give bitwise equal gradients (no float atomics' order)."""
    case = (2, 8, 7, 6, (3, 3), (5, 5), 2, 4, 1, 1, 1, True, True, "mixed")
    if backend.name == "triton" and backend.device.type == "cpu":
        case = (1, 4, 5, 4, (3, 3), (5, 5), 2, 2, 1, 1, 1, True, True, "mixed")  # the interpreter: smaller
    tensors, geometry = make_case(case, seed=4, dtype=torch.float32)
    tensors = [t.to(backend.device) for t in tensors]
    runs = [H.forward_and_grads_optional(_forward(backend, *geometry), H.optional_leaf_copies(tensors)) for _ in range(2)]
    for a, b in zip(H._flatten(runs[0]), H._flatten(runs[1])):
        assert torch.equal(a, b)


@needs_cpu
def test_cpu_results_do_not_depend_on_the_thread_count():
    case = (3, 8, 9, 7, (3, 3), (5, 5), 2, 4, 1, 1, 1, True, True, "mixed")
    tensors, geometry = make_case(case, seed=6, dtype=torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(H.forward_and_grads_optional(_forward("cpu", *geometry), H.optional_leaf_copies(tensors)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(H._flatten(runs[0]), H._flatten(run)):
            assert torch.equal(a, b)
