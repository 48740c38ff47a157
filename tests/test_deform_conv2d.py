"""deform_conv2d on every backend, through the shared harness (tests/_harness.py).

Backends: "reference", "cpu" (C++), "triton" (the interpreter on CPU tensors without a GPU,
real kernels on CUDA tensors) and "cuda" (GPU only), each skipped with the reason when this
installation cannot run it. The oracle is the float64 reference (itself checked against a
per-output loop and torchvision in tests/test_deform_conv2d_reference.py). Each property once:

- the float64 sweep of tests/deform_conv2d_cases.py (groups, offset groups, stride / padding /
  dilation 1-2, kernels 1x1 / 3x3 / 5x5 / 1x3 / 3x1, mask or not, offsets outside, on integers
  and on the -1 / H boundaries, batch 0 and 33): outputs and the gradients of all five inputs,
  plain and with canary inputs (views into NaN-filled buffers: an out-of-bounds read shows);
- gradcheck of all five inputs, opcheck of every registered op pair, torch.compile, the
  layout sweep, size mismatches both ways through the public function and the registered ops,
  bad inputs to the registered ops, NaN, low precision with float32 accumulation, autocast,
  determinism of the backward.

The Triton interpreter is slow: Triton cases keep tiny shapes and a shorter sweep.
"""
import random

import pytest
import torch

import vsr_kernels
from vsr_kernels import reference

import _harness as H
from deform_conv2d_cases import SWEEP, case_id, make_case

OP = "deform_conv2d"
NAMES = ("input", "offset", "weight", "mask", "bias")
BACKENDS = H.backend_params(OP)
AVAILABLE = {b.name for b in H.available_backends(OP)}
needs_cpu = pytest.mark.skipif("cpu" not in AVAILABLE, reason=f"backend='cpu': {H.unavailable(OP, 'cpu')}")
needs_triton = pytest.mark.skipif("triton" not in AVAILABLE,
                                  reason=f"backend='triton': {H.unavailable(OP, 'triton')}")
FLOAT64 = dict(rtol=1e-11, atol=1e-11)
OUTPUT_NAMES = ("out", "grad_input", "grad_offset", "grad_weight", "grad_mask", "grad_bias")
# Sweep entries the Triton interpreter runs (indices into SWEEP): one of every kind.
TRITON_SWEEP = (5, 12, 21, 24, 30, 37, 40, 44)


def _forward(backend, stride, padding, dilation):
    def fn(input, offset, weight, mask=None, bias=None):
        return vsr_kernels.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask,
                                         backend=str(backend))
    return fn


def _reference(stride, padding, dilation):
    def fn(input, offset, weight, mask=None, bias=None):
        return reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    return fn


def _tensors(args):
    """(input, offset, weight, mask, bias) of a make_case tuple, and its (stride, padding, dilation)."""
    input, offset, weight, bias, stride, padding, dilation, mask = args
    return [input, offset, weight, mask, bias], (stride, padding, dilation)


def check_against_reference(backend, args, canary=None, dtype=torch.float64, tol=FLOAT64):
    tensors, geometry = _tensors(args)
    H.check_optional_against_reference(_forward(backend, *geometry), _reference(*geometry), backend, tensors,
                                       canary, dtype, tol)


def _sweep_params():
    params = []
    variants = list(H.CANARY_VARIANTS)
    for param in BACKENDS:
        backend = param.values[0]
        indices = TRITON_SWEEP if backend.name == "triton" else range(len(SWEEP))
        for i in indices:
            canary = None if i % 2 == 0 or backend.name == "reference" else variants[i // 2 % len(variants)]
            params.append(pytest.param(backend, i, canary, marks=param.marks,
                                       id=f"{backend}-{case_id(SWEEP[i])}-{canary or 'plain'}"))
    return params


def test_sweep_is_large_enough():
    assert len(SWEEP) >= 40
    kinds = {c[-1] for c in SWEEP}
    assert {"outside", "integer", "boundary"} <= kinds
    assert {0, 33} <= {c[0] for c in SWEEP}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend,index,canary", _sweep_params())
def test_sweep_matches_reference_float64(backend, index, canary):
    """Odd entries read canary inputs and upstream gradients (cycling through the variants)."""
    check_against_reference(backend, make_case(SWEEP[index], seed=index), canary)


def _random_case(seed):
    rng = random.Random(seed)
    kh, kw = rng.choice([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (2, 3)])
    groups, G = rng.choice([(1, 1), (1, 2), (2, 1), (2, 2), (2, 4)])
    C = 4 * rng.randint(1, 2)
    Cout = groups * rng.randint(1, 3)
    s, p, d = rng.randint(1, 2), rng.randint(0, 2), rng.randint(1, 2)
    H_ = rng.randint(max(1, d * (kh - 1) + 1 - 2 * p), 9)
    W_ = rng.randint(max(1, d * (kw - 1) + 1 - 2 * p), 9)
    kind = rng.choice(["random", "outside", "integer", "boundary", "mixed"])
    return (rng.randint(1, 2), C, Cout, H_, W_, (kh, kw), groups, G, s, p, d, rng.random() < 0.7, kind)


@pytest.mark.parametrize("backend,seed", [
    pytest.param(p.values[0], seed, marks=p.marks, id=f"{p.values[0]}-{seed}")
    for p in BACKENDS if p.values[0].name != "reference"
    for seed in (range(1) if p.values[0].name == "triton" else range(20))])
def test_random_sweep_matches_reference(backend, seed):
    check_against_reference(backend, make_case(_random_case(seed), seed=seed + 100))


# ---------------------------------------------------------------------------------------
# Gradients, registration, compile.

def _tiny(dtype=torch.float64, mask=True, bias=True, seed=0, kind="mixed"):
    case = (2, 4, 4, 4, 5, (3, 3), 2, 2, 1, 1, 1, mask, kind)
    args = make_case(case, seed=seed, dtype=dtype)
    if bias and args[3] is None:
        args = (*args[:3], torch.randn(4, dtype=dtype), *args[4:])
    return args


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
def test_gradcheck_all_five_inputs(backend):
    tensors, geometry = _tensors(_tiny(kind="random"))
    fast = backend.name == "triton"
    if fast and backend.device.type == "cpu":  # the interpreter: one batch element, 3x4 input
        tensors = [t[:1, ..., :3, :4] if t.dim() == 4 and t is not tensors[2] else t for t in tensors]
    tensors = [t.detach().clone().to(backend.device).requires_grad_() for t in tensors]
    fn = _forward(backend, *geometry)
    assert torch.autograd.gradcheck(fn, tensors, fast_mode=fast)
    # Without mask and bias (DCNv1): the two optional inputs absent.
    assert torch.autograd.gradcheck(lambda i, o, w: fn(i, o, w), tensors[:3], fast_mode=fast)


def _registered(backend):
    ops = torch.ops.vsr_kernels
    if backend == "triton":
        import vsr_kernels.triton.deform_conv2d  # noqa: F401 - registers the ops
        return ops.deform_conv2d_triton, ops.deform_conv2d_triton_backward
    return ops.deform_conv2d, ops.deform_conv2d_backward


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
@pytest.mark.parametrize("optional", ["mask+bias", "none"])
def test_opcheck(backend, optional):
    tensors, geometry = _tensors(_tiny())
    _forward(backend, *geometry)(*[t.to(backend.device) for t in tensors])  # registers fake and autograd
    forward, backward = _registered(backend.name)
    tensors = [t.to(backend.device) for t in tensors]
    if optional == "none":
        tensors[3] = tensors[4] = None
    args = (*[t.requires_grad_() if t is not None else None for t in tensors], *[list(g) if isinstance(g, tuple)
                                                                                  else [g, g] for g in geometry])
    # The interpreter is slow: there, aot_dispatch_dynamic (several more traced runs) is left out.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if (
        backend.name == "triton" and backend.device.type == "cpu") else None
    torch.library.opcheck(forward, args, **({"test_utils": utils} if utils else {}))
    out = forward(*[t.detach() if t is not None else None for t in args[:5]], *args[5:])
    torch.library.opcheck(backward, (torch.randn_like(out), *[t.detach() if t is not None else None
                                                              for t in args[:5]], *args[5:]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
def test_compile_fullgraph_matches_eager(backend):
    tensors, geometry = _tensors(_tiny(torch.float32))
    H.assert_compiled_matches_eager(_forward(backend, *geometry), tensors, backend.device)


# ---------------------------------------------------------------------------------------
# Layouts, sizes, bad inputs.

LAYOUT_CASES = H.layout_assignments(NAMES)


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_layout_sweep(backend, case):
    """Channels-last, transposed H/W, stride-0 expanded, sliced (non-unit innermost stride)
    inputs give what the reference gives on the same values made contiguous."""
    if backend.name == "triton" and not case[0].startswith("mixed") and backend.device.type == "cpu":
        pytest.skip("the Triton interpreter runs the mixed layouts only (time)")
    _, assign = case
    tensors, geometry = _tensors(_tiny(seed=5))
    laid = [H.apply_layout(t, assign[n]) for n, t in zip(NAMES, tensors)]
    want = H.forward_and_grads_optional(_reference(*geometry), [t.detach().contiguous().requires_grad_() for t in laid])
    got = H.forward_and_grads_optional(_forward(backend, *geometry), [t.detach().to(backend.device).requires_grad_()
                                              if backend.device.type != "cpu" else t for t in
                                              [H.apply_layout(t, assign[n]).requires_grad_()
                                               for n, t in zip(NAMES, tensors)]])
    H.assert_same(got, want, **FLOAT64)


MISMATCH_ARGS = make_case((2, 4, 6, 4, 5, (3, 3), 2, 2, 1, 1, 1, True, "random"), seed=4)
FORWARD_AGREE = {
    "B": [("input", 0), ("offset", 0), ("mask", 0)],
    "Ho": [("offset", 2), ("mask", 2)],
    "Wo": [("offset", 3), ("mask", 3)],
    "Cout": [("weight", 0), ("bias", 0)],
    "channels": [("input", 1), ("weight", 1), ("offset", 1), ("mask", 1)],
    "kernel": [("weight", 2), ("weight", 3)],
    "H": [("input", 2)],
    "W": [("input", 3)],
}


def _mismatch_inputs():
    tensors, _ = _tensors(MISMATCH_ARGS)
    return dict(zip(NAMES, tensors))


MISMATCHES = list(H.size_mismatches(_mismatch_inputs(), FORWARD_AGREE))
GEOMETRY = [1, 1], [1, 1], [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mismatch", MISMATCHES, ids=[m.id for m in MISMATCHES])
def test_size_mismatch_public_function(backend, mismatch):
    t = {n: x.to(backend.device) for n, x in mismatch.inputs.items()}
    with pytest.raises(ValueError, match=mismatch.name if mismatch.name != "weight" else "weight|offset|mask"):
        vsr_kernels.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"],
                                  backend=str(backend))


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
@pytest.mark.parametrize("mismatch", MISMATCHES, ids=[m.id for m in MISMATCHES])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_size_mismatch_registered_ops(backend, mismatch, which):
    """The registered ops called directly refuse every mismatch (no out-of-bounds read): the
    call runs in a forked child so that a read that faults fails this test only."""
    forward, backward = _registered(backend.name)
    t = {n: x.to(backend.device) for n, x in mismatch.inputs.items()}
    good = _mismatch_inputs()
    grad_out = torch.randn(2, 6, 4, 5, dtype=torch.float64, device=backend.device)

    def call():
        args = (t["input"], t["offset"], t["weight"], t["mask"], t["bias"], *GEOMETRY)
        return forward(*args) if which == "forward" else backward(grad_out, *args)

    outcome = H.call_isolated(call)
    assert outcome.kind == "raised", outcome
    assert outcome.error in ("RuntimeError", "ValueError"), outcome
    assert good  # the unchanged inputs are valid: see test_registered_ops_accept_good_inputs


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
def test_registered_ops_accept_good_inputs_and_grad_out_size(backend):
    forward, backward = _registered(backend.name)
    t = {n: x.to(backend.device) for n, x in _mismatch_inputs().items()}
    args = (t["input"], t["offset"], t["weight"], t["mask"], t["bias"], *GEOMETRY)
    out = forward(*args)
    assert out.shape == (2, 6, 4, 5)
    backward(torch.randn_like(out), *args)
    for dim in range(4):
        for delta in (1, -1):
            bad = H.resize_dim(torch.randn_like(out), dim, delta)
            outcome = H.call_isolated(lambda bad=bad: backward(bad, *args))
            assert outcome.kind == "raised" and "grad_out" in outcome.message, outcome


def _bad_direct_cases():
    t = _mismatch_inputs()
    ok = dict(t)
    yield "input rank", dict(ok, input=t["input"][0]), "input"
    yield "weight rank", dict(ok, weight=t["weight"][0]), "weight"
    yield "groups", dict(ok, weight=torch.cat([t["weight"], t["weight"][:, :1]], 1)), "weight"
    yield "Cout not divisible", dict(ok, weight=t["weight"][:5], bias=t["bias"][:5]), "weight"
    yield "offset channels", dict(ok, offset=t["offset"][:, :35]), "offset"
    yield "offset groups", dict(ok, offset=torch.cat([t["offset"]] * 3, 1)[:, :54], mask=None), "offset"
    yield "mask channels", dict(ok, mask=t["mask"][:, :9]), "mask"
    yield "mask rank", dict(ok, mask=t["mask"][0]), "mask"
    yield "bias rank", dict(ok, bias=t["bias"][None]), "bias"
    yield "dtype", dict(ok, offset=t["offset"].float()), "offset"
    yield "mask dtype", dict(ok, mask=t["mask"].float()), "mask"
    yield "integer input", {k: (v.long() if v is not None else None) for k, v in ok.items()}, "input"


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
@pytest.mark.parametrize("case", list(_bad_direct_cases()), ids=lambda c: c[0])
def test_bad_inputs_to_registered_ops(backend, case):
    _, t, word = case
    forward, backward = _registered(backend.name)
    t = {n: None if x is None else x.to(backend.device) for n, x in t.items()}
    for geometry in (GEOMETRY, ([0, 1], [1, 1], [1, 1]), ([1, 1], [-1, 1], [1, 1]), ([1, 1], [1, 1], [1, 0])):
        args = (t["input"], t["offset"], t["weight"], t["mask"], t["bias"], *geometry)
        outcome = H.call_isolated(lambda args=args: forward(*args))
        assert outcome.kind == "raised", outcome
        if geometry is GEOMETRY:
            assert word in outcome.message, outcome


def test_bad_hyper_parameters_name_themselves():
    t = _mismatch_inputs()
    for name, geometry in (("stride", ([0, 1], [1, 1], [1, 1])), ("padding", ([1, 1], [-1, 1], [1, 1])),
                           ("dilation", ([1, 1], [1, 1], [1, 0]))):
        with pytest.raises(RuntimeError, match=name):
            torch.ops.vsr_kernels.deform_conv2d(t["input"], t["offset"], t["weight"], t["mask"], t["bias"],
                                                *geometry)


# ---------------------------------------------------------------------------------------
# NaN, low precision, autocast, determinism.

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
def test_nan_offset_and_nan_pixel(backend):
    tensors, geometry = _tensors(_tiny(seed=2, kind="random"))
    tensors[1][0, 4, 1, 2] = float("nan")  # dy of kernel point 2 of offset group 0 at one output
    tensors[0][1, 3, 2, 2] = float("nan")  # one pixel of the second batch element
    want = _reference(*geometry)(*tensors)
    got = _forward(backend, *geometry)(*[t.to(backend.device) for t in tensors]).cpu()
    assert torch.isnan(want).any()
    H.assert_same(got, want, **FLOAT64)


def _minus_one_edge_case():
    B, C, Hh, Ww = 1, 2, 4, 5
    input = torch.randn(B, C, Hh, Ww, dtype=torch.float64)
    input[:, :, 0, :] = float("nan")  # row 0: the neighbours of y == -1
    input[:, :, :, 0] = float("nan")  # column 0: the neighbours of x == -1
    ho = torch.arange(Hh, dtype=torch.float64).view(Hh, 1).expand(Hh, Ww)
    wo = torch.arange(Ww, dtype=torch.float64).view(1, Ww).expand(Hh, Ww)
    offset = torch.zeros(B, 2, Hh, Ww, dtype=torch.float64)
    offset[0, 0] = torch.where(wo < 2, -1.0 - ho, 0.5)  # y == -1 at the first two columns
    offset[0, 1] = torch.where(wo < 2, 0.25, -1.0 - wo)  # else x == -1
    weight = torch.randn(3, C, 1, 1, dtype=torch.float64)
    mask = torch.rand(B, 1, Hh, Ww, dtype=torch.float64)
    return [input, offset, weight, mask, None], (1, 0, 1)


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
def test_minus_one_edge_reads_nothing(backend):
    """A point exactly on the -1 edge (y == -1 or x == -1) samples 0 without reading the plane:
    its in-plane neighbours have weight 0, so a NaN there must not leak in (0 * NaN)."""
    tensors, geometry = _minus_one_edge_case()
    want = _reference(*geometry)(*tensors)
    got = _forward(backend, *geometry)(*[t.to(backend.device) if t is not None else None
                                         for t in tensors]).cpu()
    assert torch.equal(want, torch.zeros_like(want))
    H.assert_same(got, want, **FLOAT64)


LOW = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_float32_accumulation(backend, dtype):
    """Inputs rounded to dtype, computed with float32 accumulation: within a few ulps of dtype
    of the float64 reference on the same rounded values (outputs and every gradient)."""
    case = (1, 16, 8, 5, 6, (3, 3), 1, 2, 1, 1, 1, True, "random")
    args = make_case(case, seed=11)
    rounded = tuple(a.to(dtype).double() if isinstance(a, torch.Tensor) else a for a in args)
    tol = {torch.float16: dict(rtol=1e-2, atol=2e-2), torch.bfloat16: dict(rtol=4e-2, atol=8e-2),
           torch.float32: dict(rtol=1e-4, atol=1e-4)}[dtype]
    check_against_reference(backend, rounded, dtype=dtype, tol=tol)


@needs_cpu
def test_autocast_on_cpu_runs_in_float32():
    tensors, geometry = _tensors(_tiny(torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _forward("cpu", *geometry)(*tensors)
    assert out.dtype == torch.float32
    H.assert_same(out, _reference(*geometry)(*tensors), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu", "triton", "cuda")))
def test_backward_is_deterministic(backend):
    """Two backward passes give bitwise equal gradients (no float atomics' order)."""
    case = (2, 8, 8, 7, 6, (3, 3), 2, 4, 1, 1, 1, True, "mixed")
    if backend.name == "triton" and backend.device.type == "cpu":
        case = (1, 4, 4, 5, 4, (3, 3), 2, 2, 1, 1, 1, True, "mixed")  # the interpreter: smaller
    tensors, geometry = _tensors(make_case(case, seed=4, dtype=torch.float32))
    tensors = [t.to(backend.device) for t in tensors]
    runs = [H.forward_and_grads_optional(_forward(backend, *geometry), H.optional_leaf_copies(tensors)) for _ in range(2)]
    for a, b in zip(H._flatten(runs[0]), H._flatten(runs[1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu",)))
def test_forward_and_backward_same_bits_for_any_thread_count(backend):
    """The tiles and tasks do not depend on the number of threads: same bits for 1, 2 and 3."""
    case = (2, 16, 8, 19, 23, (3, 3), 2, 4, 1, 1, 1, True, "mixed")  # several tiles per task
    tensors, geometry = _tensors(make_case(case, seed=5, dtype=torch.float32))
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(H.forward_and_grads_optional(_forward(backend, *geometry), H.optional_leaf_copies(tensors)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(H._flatten(runs[0]), H._flatten(run)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# The CPU backend's AVX-512 float32 tile kernels (csrc/cpu/deform_conv2d_avx512.cpp):
# VSR_KERNELS_CPU_ISA forces the scalar path ("base") or them. Both, in float32, against each
# other and the float64 reference on the same float32 inputs: the whole sweep (boundaries,
# integers, points outside, the -1 edge, groups, stride/padding/dilation), tails of the
# 16-position blocks, NaN.

_HAS_AVX512 = H.ISA_NEEDS["avx512"] <= H.CPU_FLAGS
needs_avx512 = pytest.mark.skipif(not _HAS_AVX512, reason="CPU lacks avx512f")
FLOAT32 = dict(rtol=1e-4, atol=1e-4)


def _float32_run(backend, args, isa, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    tensors, geometry = _tensors(args)
    want = H.forward_and_grads_optional(_reference(*geometry), H.optional_leaf_copies(tensors))
    grad_outputs = [g.float() for g in H.upstream_grads(want[0])]
    got = H.forward_and_grads_optional(_forward(backend, *geometry), H.optional_leaf_copies(tensors, dtype=torch.float32), grad_outputs)
    return [t.double() for t in H._flatten(got)], want


@needs_avx512
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu",)))
@pytest.mark.parametrize("index", range(len(SWEEP)))
def test_cpu_avx512_float32_matches_scalar_path(backend, index, monkeypatch):
    """Same float32 sample coordinates on both paths, so the same bilinear cases (an edge or an
    integer crossed by float32 rounding is crossed by both): results within float32 rounding."""
    args = tuple(a.float().double() if isinstance(a, torch.Tensor) else a
                 for a in make_case(SWEEP[index], seed=index))
    scalar, _ = _float32_run(backend, args, "base", monkeypatch)
    vector, _ = _float32_run(backend, args, "avx512", monkeypatch)
    H.assert_same(vector, scalar, **FLOAT32)


@needs_avx512
@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu",)))
@pytest.mark.parametrize("case", [
    (1, 8, 8, 9, 7, (3, 3), 1, 2, 1, 1, 1, True, "random"),      # 63 positions: a 15-lane tail
    (1, 4, 6, 17, 16, (3, 3), 2, 1, 1, 1, 1, False, "random"),   # 272: full blocks only
    (2, 6, 4, 11, 13, (1, 3), 1, 3, 2, 1, (1, 2), True, "random"),
    (1, 4, 4, 40, 40, (5, 5), 1, 4, 1, 2, 1, True, "random"),    # several tiles
], ids=case_id)
def test_cpu_avx512_float32_matches_reference(backend, case, monkeypatch):
    args = tuple(a.float().double() if isinstance(a, torch.Tensor) else a for a in make_case(case, seed=3))
    got, want = _float32_run(backend, args, "avx512", monkeypatch)
    H.assert_same(got, want, **FLOAT32)


@needs_avx512
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu",)))
def test_cpu_avx512_float32_nan(backend, monkeypatch):
    """NaN offset, NaN mask and NaN pixel: the output has NaN exactly where the reference has it,
    and every gradient NaN exactly where the scalar path has it (which documents the gradient
    at a NaN coordinate in common/bilinear.h: NaN, where the reference's is 0)."""
    args = list(_tiny(seed=2, kind="random"))
    args[1][0, 4, 1, 2] = float("nan")  # dy of kernel point 2 of offset group 0 at one output
    args[1][1, 9, 0, 3] = float("nan")  # dx of kernel point 4 of offset group 0
    args[0][1, 3, 2, 2] = float("nan")  # one pixel of the second batch element
    args[7][0, 10, 3, 1] = float("nan")  # a mask value
    args = tuple(a.float().double() if isinstance(a, torch.Tensor) else a for a in args)
    scalar, want = _float32_run(backend, args, "base", monkeypatch)
    vector, _ = _float32_run(backend, args, "avx512", monkeypatch)
    assert all(torch.isnan(t).any() for t in vector[:5])  # out and the four gradients but bias
    H.assert_same(vector[0], H._flatten(want)[0], **FLOAT32)
    H.assert_same(vector, scalar, **FLOAT32)


@needs_avx512
@pytest.mark.parametrize("backend", H.backend_params(OP, ("cpu",)))
def test_cpu_avx512_minus_one_edge_reads_nothing(backend, monkeypatch):
    """The -1 edge in float32 through the AVX-512 kernels (exact there too: integer offsets)."""
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", "avx512")
    tensors, geometry = _minus_one_edge_case()
    got = _forward(backend, *geometry)(*[None if t is None else t.float() for t in tensors])
    assert torch.equal(got, torch.zeros_like(got))
