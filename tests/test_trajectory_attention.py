"""trajectory_attention on every backend, through the shared harness (tests/_harness.py).

Backends: "reference", "cpu" (C++), "triton" (the interpreter on CPU tensors without a GPU,
real kernels on CUDA tensors) and "cuda" (GPU only), each skipped with the reason when this
installation cannot run it. The oracle (a per-token loop of the contract) and the input
generator with its sweep (T = 1, .5 ties, outside, all outside, NaN, planted similarity ties,
three value scales) come from tests/test_trajectory_attention_reference.py, which checks the
reference against that oracle; here every backend is checked against the reference.
"""
import random

import pytest
import torch

import vsr_kernels
from vsr_kernels import reference

import _harness as H
from test_trajectory_attention_reference import SWEEP, _case, oracle

OP = "trajectory_attention"
NAMES = ("query", "key", "value", "location")
BACKENDS = H.backend_params(OP)
KERNEL_BACKENDS = H.backend_params(OP, ("cpu", "triton", "cuda"))
AVAILABLE = {b.name for b in H.available_backends(OP)}
needs_cpu_kernels = pytest.mark.skipif("cpu" not in AVAILABLE,
                                       reason=f"backend='cpu': {H.unavailable(OP, 'cpu')}")
needs_triton = pytest.mark.skipif("triton" not in AVAILABLE,
                                  reason=f"backend='triton': {H.unavailable(OP, 'triton')}")
interpreter_warnings = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
FLOAT64 = dict(rtol=1e-12, atol=1e-12)
EXACT = dict(rtol=0, atol=0)


def op(backend):
    """The public function on one backend, taking (query, key, *values, location) and
    returning (*outs, score, index)."""
    def fn(q, k, *rest):
        *vs, loc = rest
        outs, score, index = vsr_kernels.trajectory_attention(q, k, list(vs), loc, backend=str(backend))
        return (*outs, score, index)
    return fn


def registered_ops(backend):
    if backend == "triton":
        import vsr_kernels.triton.trajectory_attention  # noqa: F401  (registers the ops)
        return (torch.ops.vsr_kernels.trajectory_attention_triton,
                torch.ops.vsr_kernels.trajectory_attention_triton_backward)
    return torch.ops.vsr_kernels.trajectory_attention, torch.ops.vsr_kernels.trajectory_attention_backward


def inputs_of(case, device, requires_grad=True):
    q, k, vs, loc = case
    leaves = [t.to(device).requires_grad_(requires_grad) for t in (q, k, *vs)]
    return [*leaves, loc.to(device)]


def check_against_reference(backend, case, grads=True, canary=None):
    """Outputs (and gradients, unless NaN makes them meaningless) of `backend` equal the
    float64 reference's. With `canary` (a CANARY_VARIANTS entry), every input and upstream
    gradient is read from a NaN-padded buffer: a read outside shows as NaN."""
    want = H.forward_and_grads(op("reference"), inputs_of(case, "cpu", grads))
    inputs = inputs_of(case, backend.device, grads)
    upstream = [None if g is None else g.to(backend.device) for g in H.upstream_grads(want[0])]
    if canary is not None:
        inputs = [H.canary(t.detach(), **canary).requires_grad_(t.requires_grad) for t in inputs]
        upstream = [None if g is None else H.canary(g, **canary) for g in upstream]
    got = H.forward_and_grads(op(backend), inputs, grad_outputs=upstream)
    H.assert_same(got, want, **FLOAT64)


def _sweep_id(i):
    shape, options = SWEEP[i]
    return f"{i}-{'x'.join(map(str, shape))}-{'-'.join(sorted(options)) or 'plain'}"


# Triton runs under the interpreter without a GPU: a subset covering every kind of case.
TRITON_SWEEP = (0, 2, 3, 7, 9, 14, 17, 19, 20, 22, 25, 27)


def _sweep_params():
    params = []
    for backend in BACKENDS:
        name = backend.values[0].name
        for i in range(len(SWEEP)):
            marks = backend.marks
            if name == "triton" and not H.HAS_CUDA and i not in TRITON_SWEEP:
                continue
            params.append(pytest.param(backend.values[0], i, marks=marks, id=f"{name}-{_sweep_id(i)}"))
    return params


# ---------------------------------------------------------------------------------------
# Every backend against the float64 reference.

@interpreter_warnings
@pytest.mark.parametrize("backend,i", _sweep_params())
def test_sweep_matches_reference_float64(backend, i):
    shape, options = SWEEP[i]
    check_against_reference(backend, _case(100 + i, *shape, **options), grads=not options.get("nan"))


@interpreter_warnings
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("variant", list(H.CANARY_VARIANTS))
def test_canary_inputs(backend, variant):
    for i in (5, 9, 22, 27):
        shape, options = SWEEP[i]
        check_against_reference(backend, _case(200 + i, *shape, **options), canary=H.CANARY_VARIANTS[variant])


def _random_case(seed):
    rng = random.Random(seed)
    B, T, D = rng.randint(1, 2), rng.randint(1, 6), rng.randint(1, 40)
    h, w = rng.randint(1, 9), rng.randint(1, 9)
    options = dict(spread=rng.choice((0.5, 1.5, 4.0)), halves=rng.random() < 0.3, outside=rng.random() < 0.4,
                   ties=rng.random() < 0.3, dvs=tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 3))))
    return _case(seed, B, T, D, h, w, **options)


@pytest.mark.parametrize("backend,seed", [
    pytest.param(b.values[0], seed, marks=b.marks, id=f"{b.values[0].name}-{seed}")
    for b in BACKENDS
    for seed in (range(3) if b.values[0].name == "triton" and not H.HAS_CUDA else range(12))])
def test_random_sweep_matches_reference(backend, seed):
    check_against_reference(backend, _random_case(seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_loop_oracle(backend):
    q, k, vs, loc = _case(7, 2, 4, 6, 5, 6, halves=True, outside=True, dvs=(2, 3))
    device = backend.device
    outs, score, index = vsr_kernels.trajectory_attention(q.to(device), k.to(device),
                                                          [v.to(device) for v in vs], loc.to(device),
                                                          backend=str(backend))
    want = oracle(q, k, vs, loc)
    H.assert_same((outs, score, index), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", H.backend_params(OP, ("reference", "cpu", "cuda", "triton")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_with_float32_accumulation(backend, dtype):
    """float32 / float16 / bfloat16 inputs: the same choice as float64 on the same (rounded)
    values, scores and gradients within the dtype's tolerance."""
    q, k, vs, loc = _case(3, 1, 4, 32, 4, 5, dvs=(3,))
    q, k, vs = q.to(dtype), k.to(dtype), [v.to(dtype) for v in vs]
    rounded = (q.double(), k.double(), [v.double() for v in vs], loc)
    want = H.forward_and_grads(op("reference"), inputs_of(rounded, "cpu"))
    got = H.forward_and_grads(op(backend), inputs_of((q, k, vs, loc.float()), backend.device))
    assert got[0][-1].dtype == torch.int64 and got[0][0].dtype == dtype and got[0][1].dtype == dtype
    assert torch.equal(got[0][-1].cpu(), want[0][-1])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else H.tolerance(torch.float32)
    H.assert_same([t.double() for t in got[0][:-1]], want[0][:-1], **tol)
    H.assert_same([t.double() for t in got[1]], want[1], **tol)


# ---------------------------------------------------------------------------------------
# Gradients, registration, compile.

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_query_key_values(backend):
    small = backend.name == "triton" and not H.HAS_CUDA
    q, k, vs, loc = _case(11, 1, 3, 3, 2, 3, outside=True, dvs=(2, 1)) if small else \
        _case(11, 2, 3, 4, 3, 4, outside=True, dvs=(2, 1))
    inputs = inputs_of((q, k, vs, loc), backend.device)
    fn = op(backend)
    torch.autograd.gradcheck(lambda *a: fn(*a)[:-1], inputs, fast_mode=small)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_below_eps_follow_f_normalize(backend):
    """Query and key tokens with norms below F.normalize's eps (1e-12), and zero ones: the
    forward and the gradients follow its clamp (no gradient through the norm below eps)."""
    q, k, vs, loc = _case(12, 1, 3, 4, 3, 3, spread=0.4)
    q[..., 0, :] *= 1e-14
    q[..., 1, 0] = 0
    k[:, 0] *= 3e-13
    check_against_reference(backend, (q, k, vs, loc))


@pytest.mark.parametrize("backend", BACKENDS)
def test_location_gets_no_gradient_and_index_is_not_differentiable(backend):
    q, k, vs, loc = inputs_of(_case(1, 1, 2, 3, 3, 3), backend.device)
    loc.requires_grad_()
    out, score, index = op(backend)(q, k, vs, loc)
    assert not index.requires_grad
    grads = torch.autograd.grad(out.sum() + score.sum(), (q, k, vs, loc), allow_unused=True)
    assert grads[3] is None or bool((grads[3] == 0).all())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(backend):
    q, k, v, loc = inputs_of(_case(2, 1, 2, 3, 3, 3), backend.device)
    out, score, _ = op(backend)(q, k, v, loc)
    (gq,) = torch.autograd.grad(score.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    forward, backward = registered_ops(backend.name)
    q, k, v1, v2, loc = inputs_of(_case(4, 1, 3, 3, 3, 4, outside=True, dvs=(2, 1)), backend.device)
    torch.library.opcheck(forward, (q, k, [v1, v2], loc))
    outs, score, index = forward(q, k, [v1, v2], loc)
    gos = H.upstream_grads([*outs, score])
    plain = [t.detach() for t in (q, k, v1, v2)]
    torch.library.opcheck(backward, (gos[:2], gos[2], *plain[:2], plain[2:], loc, index))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    def step(q, k, v1, v2, loc):
        outs, score, _ = vsr_kernels.trajectory_attention(q, k, [v1, v2], loc, backend=backend.name)
        return outs[0].sin().sum() + outs[1].square().sum() + score.square().sum()

    inputs = inputs_of(_case(5, 1, 3, 4, 4, 5, outside=True, dvs=(2, 3)), backend.device)
    compiler = "aot_eager" if backend.name == "triton" else "inductor"
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    eager_loss, compiled_loss = step(*inputs), compiled(*inputs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs[:4])
    for got, want in zip(compiled_grads, torch.autograd.grad(eager_loss, inputs[:4])):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------
# Layouts, empty inputs, determinism.

LAYOUT_CASES = H.layout_assignments(NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("assignment", [a for _, a in LAYOUT_CASES], ids=[i for i, _ in LAYOUT_CASES])
def test_layout_sweep(backend, assignment):
    q, k, vs, loc = _case(21, 2, 3, 3, 4, 5, outside=True)
    dense = inputs_of((q, k, vs, loc), backend.device)
    laid = [H.apply_layout(t, assignment[n]) for n, t in zip(NAMES, dense)]
    # A stride-0 layout changes the values: the reference sees the same laid-out values.
    dense = H.leaf_copies([t.contiguous() for t in laid[:3]]) + [laid[3].contiguous()]
    got = H.forward_and_grads(op(backend), laid)
    H.assert_same(got, H.forward_and_grads(op(backend), dense), **FLOAT64)
    want = H.forward_and_grads(op("reference"), [t.cpu() if not t.requires_grad else t.detach().cpu()
                                                 .requires_grad_() for t in dense])
    H.assert_same(got, want, **FLOAT64)
    if backend.name != "reference":
        assert all(g.is_contiguous() for g in got[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5, 6), (2, 3, 0, 4, 5), (2, 2, 3, 0, 5)], ids=["B0", "D0", "h0"])
def test_empty_inputs(backend, shape):
    B, T, D, h, w = shape
    q = torch.randn(B, D, h, w, dtype=torch.float64, device=backend.device, requires_grad=True)
    k = torch.randn(B, T, D, h, w, dtype=torch.float64, device=backend.device, requires_grad=True)
    v = torch.randn(B, T, 3, h, w, dtype=torch.float64, device=backend.device, requires_grad=True)
    loc = torch.zeros(B, T, 2, h, w, device=backend.device)
    out, score, index = vsr_kernels.trajectory_attention(q, k, v, loc, backend=backend.name)
    assert out.shape == (B, 3, h, w) and score.shape == index.shape == (B, h, w)
    grads = torch.autograd.grad(out.sum() + score.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    if B * h * w == 0:
        assert all(bool((g == 0).all()) for g in grads)


def _crowded_case():
    """Every trajectory of frame t reads one of 3 tokens: many queries add into one key token."""
    q, k, vs, loc = _case(9, 2, 4, 19, 7, 9, dvs=(5, 2))
    loc = loc.round().remainder(3)
    return q.float(), k.float(), [v.float() for v in vs], loc.float()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_is_deterministic(backend):
    """The same bits every run and for any thread count, with many queries per key token."""
    forward, backward = registered_ops(backend.name)
    q, k, vs, loc = [t if isinstance(t, torch.Tensor) else [v.to(backend.device) for v in t]
                     for t in _crowded_case()]
    q, k, loc = q.to(backend.device), k.to(backend.device), loc.to(backend.device)
    outs, score, index = forward(q, k, vs, loc)
    assert int(torch.bincount(index.flatten()).max()) > 3
    *gos, gs = H.upstream_grads([*outs, score])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 1, 2):
            torch.set_num_threads(n)
            results.append(backward(gos, gs, q, k, vs, loc, index))
    finally:
        torch.set_num_threads(threads)
    first = H._flatten(results[0])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, H._flatten(other)))
    want = H.forward_and_grads(op("reference"), inputs_of((q.cpu().double(), k.cpu().double(),
                                                           [v.cpu().double() for v in vs], loc.cpu()), "cpu"),
                               grad_outputs=[g.cpu().double() for g in (*gos, gs)] + [None])
    H.assert_same([t.double() for t in first], want[1], rtol=1e-4, atol=1e-4)


@needs_cpu_kernels
def test_auto_backend_on_cpu_is_the_cpu_kernel():
    q, k, vs, loc = _case(3, 1, 2, 3, 4, 4)
    H.assert_same(vsr_kernels.trajectory_attention(q, k, vs, loc),
                  vsr_kernels.trajectory_attention(q, k, vs, loc, backend="cpu"), **EXACT)


@needs_cpu_kernels
def test_cpu_autocast_runs_half_precision_inputs_in_float32():
    q, k, vs, loc = _case(3, 1, 2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, score, _ = vsr_kernels.trajectory_attention(q.bfloat16(), k.float(), vs[0].bfloat16(), loc)
    assert out.dtype == score.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Bad inputs and size mismatches, through the public function and the registered ops.

def _good(device="cpu"):
    q, k, vs, loc = _case(31, 2, 2, 3, 3, 4, dvs=(2,))
    return [t.to(device) for t in (q, k, vs[0], loc)]


BAD = [
    (TypeError, "location", lambda a: a[:3] + [a[3].long()]),
    (TypeError, "location", lambda a: a[:3] + [a[3].int()]),
    (ValueError, "location", lambda a: a[:3] + [a[3][:, :, :1]]),
    (ValueError, "query", lambda a: [a[0][0]] + a[1:]),
    (ValueError, "key", lambda a: [a[0], a[1][:, 0]] + a[2:]),
    (TypeError, "key", lambda a: [a[0], a[1].float()] + a[2:]),
    (TypeError, r"value\[1\]", lambda a: a[:2] + [[a[2], a[2].float()], a[3]]),
    (ValueError, "key", lambda a: [a[0], a[1].to("meta")] + a[2:]),
    (ValueError, "location", lambda a: a[:3] + [a[3].to("meta")]),
    (ValueError, "value", lambda a: a[:2] + [[], a[3]]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("error,name,make", BAD, ids=[f"{i}-{n}" for i, (_, n, _) in enumerate(BAD)])
def test_bad_inputs(backend, error, name, make):
    with pytest.raises(error, match=name):
        vsr_kernels.trajectory_attention(*make(_good(backend.device)), backend=backend.name)


FORWARD_AGREE = {
    "B": [("query", 0), ("key", 0), ("value", 0), ("location", 0)],
    "T": [("key", 1), ("value", 1), ("location", 1)],
    "D": [("query", 1), ("key", 2)],
    "h": [("query", 2), ("key", 3), ("value", 3), ("location", 3)],
    "w": [("query", 3), ("key", 4), ("value", 4), ("location", 4)],
}
BACKWARD_AGREE = {
    "B": [("grad_out", 0), ("grad_score", 0), ("query", 0), ("key", 0), ("value", 0), ("location", 0),
          ("index", 0)],
    "T": [("key", 1), ("value", 1), ("location", 1)],
    "D": [("query", 1), ("key", 2)],
    "Dv": [("grad_out", 1), ("value", 2)],
    "h": [("grad_out", 2), ("grad_score", 1), ("query", 2), ("key", 3), ("value", 3), ("location", 3),
          ("index", 1)],
    "w": [("grad_out", 3), ("grad_score", 2), ("query", 3), ("key", 4), ("value", 4), ("location", 4),
          ("index", 2)],
}


def _backward_inputs():
    q, k, v, loc = _good()
    outs, score, index = reference.trajectory_attention(q, k, [v], loc)
    go, gs = H.upstream_grads([outs[0], score])
    return dict(grad_out=go, grad_score=gs, query=q, key=k, value=v, location=loc, index=index)


FORWARD_MISMATCHES = list(H.size_mismatches(dict(zip(NAMES, _good())), FORWARD_AGREE))
BACKWARD_MISMATCHES = list(H.size_mismatches(_backward_inputs(), BACKWARD_AGREE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mismatch", FORWARD_MISMATCHES, ids=[m.id for m in FORWARD_MISMATCHES])
def test_size_mismatch_public_function(backend, mismatch):
    i = {n: t.to(backend.device) for n, t in mismatch.inputs.items()}
    letter = next(label for label, members in FORWARD_AGREE.items()
                  if (mismatch.name, mismatch.dim) in members)
    with pytest.raises(ValueError, match=f"must have {letter} = "):
        vsr_kernels.trajectory_attention(i["query"], i["key"], i["value"], i["location"],
                                         backend=backend.name)


def _assert_rejected(outcome, mismatch):
    assert outcome.kind == "raised", f"{mismatch.id}: the op {outcome.kind} {outcome.error}".rstrip() + \
        " instead of rejecting mismatched sizes"
    assert outcome.error in ("RuntimeError", "ValueError"), \
        f"{mismatch.id}: {outcome.error}: {outcome.message}"
    names = [n.replace("value", "values").replace("grad_out", "grad_outs") for n in mismatch.group]
    assert any(n in outcome.message for n in names + list(mismatch.group)), \
        f"{mismatch.id}: the error names none of {mismatch.group}: {outcome.message}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mismatch", FORWARD_MISMATCHES, ids=[m.id for m in FORWARD_MISMATCHES])
def test_size_mismatch_registered_forward_op(backend, mismatch):
    forward, _ = registered_ops(backend.name)
    i = {n: t.to(backend.device) for n, t in mismatch.inputs.items()}
    outcome = H.call_isolated(lambda: forward(i["query"], i["key"], [i["value"]], i["location"]))
    _assert_rejected(outcome, mismatch)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mismatch", BACKWARD_MISMATCHES, ids=[m.id for m in BACKWARD_MISMATCHES])
def test_size_mismatch_registered_backward_op(backend, mismatch):
    _, backward = registered_ops(backend.name)
    i = {n: t.to(backend.device) for n, t in mismatch.inputs.items()}
    outcome = H.call_isolated(lambda: backward([i["grad_out"]], i["grad_score"], i["query"], i["key"],
                                               [i["value"]], i["location"], i["index"]))
    _assert_rejected(outcome, mismatch)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_registered_ops_reject_bad_dtypes_and_lists(backend):
    forward, backward = registered_ops(backend.name)
    q, k, v, loc = _good(backend.device)
    bad = ((q, k, [v.float()], loc), (q, k, [v], loc.long()), (q, k, [], loc), (q.float(), k, [v], loc))
    for args in bad:
        outcome = H.call_isolated(lambda: forward(*args))
        assert outcome.kind == "raised" and outcome.error in ("RuntimeError", "ValueError"), outcome
    outs, score, index = forward(q, k, [v], loc)
    for args in (([], score, q, k, [v], loc, index), ([outs[0]], score, q, k, [v], loc, index.int())):
        outcome = H.call_isolated(lambda: backward(*args))
        assert outcome.kind == "raised" and outcome.error in ("RuntimeError", "ValueError"), outcome


# ---------------------------------------------------------------------------------------
# Triton specifics.

@needs_triton
def test_triton_launch_configs_compile_table_is_complete():
    from vsr_kernels.triton import trajectory_attention as module
    kernels = {c.kernel for c in module.all_launch_configs()}
    assert kernels == set(module.KERNELS)


# ---------------------------------------------------------------------------------------
# The float32 CPU kernels (csrc/cpu/trajectory_attention_simd.h): VSR_KERNELS_CPU_ISA forces
# each instruction set this CPU runs. Their edges: w below, at and above every vector width
# (4, 8, 16 lanes), D not a multiple of the channel block (the vector width), T = 1 and T > 4,
# locations outside / all outside / NaN, exact ties, several values, non-contiguous inputs
# (a frame stride that is not D * h * w, channels apart, pixels not adjacent), bands split
# over threads.

CPU_ISAS = H.CPU_ISAS
ISA_CASES = [  # (B, T, D, h, w), options
    ((1, 1, 5, 3, 7), {}),
    ((2, 3, 9, 5, 17), {"outside": True}),
    ((1, 5, 17, 4, 33), {"spread": 4.0, "dvs": (3, 20)}),
    ((1, 2, 3, 6, 16), {"all_outside": True}),
    ((1, 4, 8, 3, 5), {"nan": ("query", "key", "location")}),
    ((1, 8, 12, 7, 9), {"ties": True, "halves": True}),
    ((1, 6, 33, 9, 23), {"outside": True, "spread": 3.0}),
    # the key pass's channel blocks (16, 8, 4 channels): two whole and a partial one, frames
    # whose read rows start and end off the vector width, B = 2
    ((2, 8, 40, 10, 37), {"outside": True, "spread": 5.0}),
]


def _float32_case(shape, options, seed, layout):
    """_case's inputs rounded to float32, and their float64 copies (the reference's); with
    `layout`, key a view of every other frame, value of every other channel, query with
    transposed pixels (non-contiguous)."""
    q, k, vs, loc = _case(seed, *shape, **options)
    q, k, vs, loc = q.float(), k.float(), [v.float() for v in vs], loc.float()
    rounded = (q.double(), k.double(), [v.double() for v in vs], loc)
    if layout:
        k = torch.stack((k, torch.full_like(k, float("nan"))), 2).flatten(1, 2)[:, ::2]
        vs = [torch.stack((v, torch.full_like(v, float("nan"))), 3).flatten(2, 3)[:, :, ::2] for v in vs]
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert (k.shape[1] == 1 or not k.is_contiguous()) and not q.is_contiguous()
    return (q, k, vs, loc), rounded


@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", ISA_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + "-".join(sorted(c[1])))
@pytest.mark.parametrize("layout", [False, True], ids=["contiguous", "strided"])
def test_cpu_isa_float32_matches_reference(isa, case, layout, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    shape, options = case
    inputs, rounded = _float32_case(shape, options, sum(shape) + len(options), layout)
    want = H.forward_and_grads(op("reference"), inputs_of(rounded, "cpu"))
    got = H.forward_and_grads(op("cpu"), inputs_of(inputs, "cpu"))
    assert torch.equal(got[0][-1], want[0][-1])
    H.assert_same([t.double() for t in got[0][:-1]], want[0][:-1], **H.tolerance(torch.float32))
    if not options.get("nan"):
        H.assert_same([t.double() for t in got[1]], want[1], **H.tolerance(torch.float32))


@needs_cpu_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_isa_float32_same_bits_for_any_thread_count(isa, monkeypatch):
    """Forward and backward: a token's sums run in its own lane, so the bands (one per
    thread, 16-lane multiples, the last one partial) do not change a bit; the backward's
    recomputed score is the forward's (its gradient coefficients use it)."""
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    (q, k, vs, loc), _ = _float32_case((1, 5, 21, 11, 23), {"outside": True, "dvs": (4, 3)}, 5, False)
    forward, backward = registered_ops("cpu")
    gos = [torch.randn(v.shape[0], v.shape[2], *v.shape[3:]) for v in vs]
    gs = torch.randn(q.shape[0], *q.shape[2:])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            outs, score, index = forward(q, k, vs, loc)
            results.append((*outs, score, index, *H._flatten(backward(gos, gs, q, k, vs, loc, index))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cpu_large_outputs_populated_in_shares(dtype):
    """Outputs of >= 8 MiB (B = 2 here) get the huge-page hint and are faulted in by the
    forward's tasks, one 2 MiB-aligned share each, before they compute: the same values as the
    reference's gather (out is copied, bit for bit) for 1, 2 and 3 threads."""
    q, k, vs, loc = _case(9, 2, 3, 4, 20, 50, outside=True, dvs=(1100, 5))
    q, k, vs = q.to(dtype), k.to(dtype), [v.to(dtype) for v in vs]
    assert vs[0][:, 0].nbytes >= 8 << 20
    want = op("reference")(q, k, *vs, loc)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got = op("cpu")(q, k, *vs, loc)
            assert torch.equal(got[-1], want[-1])
            assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
    finally:
        torch.set_num_threads(threads)


@needs_cpu_kernels
def test_cpu_isa_switch_rejects_unknown(monkeypatch):
    (q, k, vs, loc), _ = _float32_case((1, 2, 3, 2, 3), {}, 1, False)
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="VSR_KERNELS_CPU_ISA must be base, avx2 or avx512"):
        torch.ops.vsr_kernels.trajectory_attention(q, k, vs, loc)
