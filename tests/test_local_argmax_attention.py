"""local_argmax_attention on every backend, through the shared harness (tests/_harness.py).

Backends: "reference", "cpu" (C++), "triton" (the interpreter on CPU tensors without a GPU,
real kernels on CUDA tensors) and "cuda" (C++/CUDA, GPU only), each skipped with the reason
when this installation cannot run it. Each property is tested once, parametrised over the
backends:

- the reference against a plain loop (the oracle's oracle);
- every backend against the float64 reference on the fixed and random sweeps, plain and
  with canary inputs (views into NaN-filled buffers: an out-of-bounds read shows as NaN);
- planted ties, NaN, gradcheck, opcheck of every registered op pair, torch.compile, batch 0
  and empty dims, the layout sweep for every input, autocast, bad inputs and size mismatches
  (both directions, every dim that must agree, every input) through the public function and
  through the registered ops called directly;
- Triton specifics (launch configs, low precision) and GPU-only checks (CUDA tensors).

The Triton interpreter is slow: Triton cases keep tiny shapes and their own, shorter sweeps.
"""
import itertools
import random
import zlib
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import vsr_kernels
from vsr_kernels import reference
from vsr_kernels.ops import _backend

import _harness as H

OP = "local_argmax_attention"
NAMES = ("query", "key", "value")
BORDERS = ("exclude", "zeros")
BACKENDS = H.backend_params(OP)
KERNEL_BACKENDS = H.backend_params(OP, ("cpu", "triton", "cuda"))  # backends with registered ops
AVAILABLE = {b.name for b in H.available_backends(OP)}
HAS_CPU_OP = "cpu" in AVAILABLE
needs_cpu_kernels = pytest.mark.skipif(not HAS_CPU_OP, reason=f"backend='cpu': {H.unavailable(OP, 'cpu')}")
needs_triton = pytest.mark.skipif("triton" not in AVAILABLE,
                                  reason=f"backend='triton': {H.unavailable(OP, 'triton')}")
needs_cuda = pytest.mark.skipif(not H.HAS_CUDA, reason="needs a CUDA device")
interpreter_warnings = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

if "triton" in AVAILABLE:
    from vsr_kernels.triton import local_argmax_attention as triton_module
    from vsr_kernels.triton.local_argmax_attention import BLOCK_P, MAX_CHANNEL_BLOCK


# The Triton backend has two forwards (vsr_kernels.triton.local_argmax_attention.formulation):
# "direct" (one pixel per lane) and "tile" (tensor-core scores of a query tile against its key
# halo). Tests of the Triton backend run each property with both, forcing the formulation.
FORMULATIONS = ("direct", "tile")


def with_formulations(params):
    """`params` (pytest.params whose first value is a backend) with a formulation appended: both
    for the Triton backend, None (nothing forced) for the others."""
    out = []
    for p in params:
        for formulation in (FORMULATIONS if str(p.values[0]) == "triton" else (None,)):
            suffix = "" if formulation is None else f"-{formulation}"
            out.append(pytest.param(*p.values, formulation, marks=p.marks, id=f"{p.id}{suffix}"))
    return out


@pytest.fixture
def formulation(request, monkeypatch):
    """Forces the Triton forward's formulation for the test (the parameter of the same name)."""
    name = getattr(request, "param", None)
    if name is not None:
        monkeypatch.setattr(triton_module, "forced_formulation", name)
    return name


def shapes(B, T, C, Cv, H_, W):
    return {"query": (B, C, H_, W), "key": (B, T, C, H_, W), "value": (B, T, Cv, H_, W)}


def make_inputs(B, T, C, Cv, H_, W, dtype=torch.float64, device="cpu", seed=0, integers=False,
                requires_grad=False):
    named = H.make_inputs(shapes(B, T, C, Cv, H_, W), dtype, device, seed, integers, requires_grad)
    return list(named.values())


def op(backend, kernel_size, dilation, scale, border):
    """The public function on one backend (a name or a harness Backend)."""
    return lambda q, k, v: vsr_kernels.local_argmax_attention(q, k, v, kernel_size, dilation, scale, border,
                                                              backend=str(backend))


def reference_op(kernel_size, dilation, scale, border):
    return lambda q, k, v: reference.local_argmax_attention(q, k, v, kernel_size, dilation, scale, border)


def registered_ops(backend):
    """(forward, backward) registered ops of a kernel backend."""
    if backend == "triton":
        _backend.op_for(OP, "triton")  # imports the Triton module and registers its fake and autograd
        return (torch.ops.vsr_kernels.local_argmax_attention_triton,
                torch.ops.vsr_kernels.local_argmax_attention_triton_backward)
    return torch.ops.vsr_kernels.local_argmax_attention, torch.ops.vsr_kernels.local_argmax_attention_backward


def loop_oracle(q, k, v, kernel_size, dilation, scale, border):
    """The definition in the README, one pixel at a time, independent of unfold and gather."""
    B, T, _, H_, W = k.shape
    r = kernel_size // 2
    out = torch.zeros(B, T, v.shape[2], H_, W, dtype=q.dtype)
    score = torch.zeros(B, T, H_, W, dtype=q.dtype)
    index = torch.zeros(B, T, H_, W, dtype=torch.int64)
    for b, t, y, x in itertools.product(range(B), range(T), range(H_), range(W)):
        best = None
        for j in range(kernel_size * kernel_size):
            cy, cx = y + (j // kernel_size - r) * dilation, x + (j % kernel_size - r) * dilation
            inside = 0 <= cy < H_ and 0 <= cx < W
            if not inside and border == "exclude":
                continue
            s = scale * float(q[b, :, y, x] @ k[b, t, :, cy, cx]) if inside else 0.0
            if best is None or s > best[0]:
                best = (s, j, v[b, t, :, cy, cx] if inside else torch.zeros(v.shape[2], dtype=q.dtype))
        score[b, t, y, x], index[b, t, y, x] = best[0], best[1]
        out[b, t, :, y, x] = best[0] * best[2]
    return out, score, index


OUTPUT_NAMES = ("out", "score", "index", "grad_query", "grad_key", "grad_value")
EXACT = dict(rtol=0, atol=0)
FLOAT64 = dict(rtol=1e-12, atol=1e-12)


def check_against_reference(backend, shape, window, scale, border, seed, canary=False, integers=False):
    """Outputs and gradients of `backend` (on its device) equal the float64 reference's. With
    `canary`, the backend reads every input and upstream gradient from a NaN-padded buffer
    (the harness's variant number seed % 3: pixels flat, rows gapped, or rows gapped and
    channels-last): a read outside any of them shows as NaN."""
    q, k, v = make_inputs(*shape, seed=seed, integers=integers, requires_grad=True)
    want = H.forward_and_grads(reference_op(*window, scale, border), [q, k, v])
    inputs = H.leaf_copies([q, k, v], device=backend.device)
    grad_outputs = [None if g is None else g.to(backend.device) for g in H.upstream_grads(want[0])]
    if canary:
        kw = list(H.CANARY_VARIANTS.values())[seed % len(H.CANARY_VARIANTS)]
        inputs = H.canaries(inputs, **kw)
        grad_outputs = [None if g is None else H.canary(g, **kw) for g in grad_outputs]
    got = H.forward_and_grads(op(backend, *window, scale, border), inputs, grad_outputs=grad_outputs)
    H.assert_same(got, want, OUTPUT_NAMES, **FLOAT64)


def same_bits_at_thread_counts(run, counts=(1, 2, 3)):
    """Calls run(n) with n torch threads for each n in `counts` (the thread count restored after)
    and asserts that every call returns the same tensors, bit for bit."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(run(n))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for first, second in zip(results[0], other):
            assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------
# The oracle.

@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (3, 1), (3, 2), (5, 1)])
def test_reference_matches_loop_oracle(border, kernel_size, dilation):
    q, k, v = make_inputs(2, 2, 3, 2, 4, 5, seed=kernel_size * 10 + dilation)
    want = loop_oracle(q, k, v, kernel_size, dilation, 0.5, border)
    got = reference.local_argmax_attention(q, k, v, kernel_size, dilation, 0.5, border)
    H.assert_same(got, want, **FLOAT64)


# ---------------------------------------------------------------------------------------
# Bad inputs and size mismatches through the public function (fast: first). The registered
# ops called directly are tested further down.

def _bad_input_cases():
    q, k, v = make_inputs(2, 3, 4, 5, 6, 7, dtype=torch.float32)
    ok = dict(query=q, key=k, value=v)
    yield "query rank", dict(ok, query=q[0]), ValueError, "query must be 4-D"
    yield "key rank", dict(ok, key=k[0]), ValueError, "key must be 5-D"
    yield "value rank", dict(ok, value=v[:, 0]), ValueError, "value must be 5-D"
    yield "query not a tensor", dict(ok, query=q.numpy()), TypeError, "query must be a torch.Tensor"
    yield "B mismatch", dict(ok, key=k[:1]), ValueError, "key must have B = 2"
    yield "C mismatch", dict(ok, key=k[:, :, :3]), ValueError, "key must have C = 4"
    yield "H mismatch", dict(ok, key=k[:, :, :, :5]), ValueError, "key must have H = 6"
    yield "W mismatch", dict(ok, value=v[..., :6]), ValueError, "value must have W = 7"
    yield "T mismatch", dict(ok, value=v[:, :2]), ValueError, "value must have T = 3"
    yield "even kernel", dict(ok, kernel_size=4), ValueError, "kernel_size must be an odd integer >= 1, got 4"
    yield "zero kernel", dict(ok, kernel_size=0), ValueError, "kernel_size must be an odd integer >= 1"
    yield "float kernel", dict(ok, kernel_size=3.0), TypeError, "kernel_size must be an int"
    yield "dilation", dict(ok, dilation=0), ValueError, "dilation must be an integer >= 1, got 0"
    yield "border", dict(ok, border="reflect"), ValueError, "border must be one of 'exclude', 'zeros'"
    yield "backend", dict(ok, backend="opencl"), ValueError, "backend must be one of"
    yield "scale", dict(ok, scale="1"), TypeError, "scale must be a real number"
    yield "dtype mismatch", dict(ok, key=k.double()), TypeError, \
        "key must have the dtype of query (torch.float32)"
    yield "integer dtype", dict(ok, value=v.long()), TypeError, "value must have a floating-point dtype"
    yield "device mismatch", dict(ok, value=v.to("meta")), ValueError, "value must be on the device of query"
    yield "cuda backend on cpu", dict(ok, backend="cuda"), ValueError, "backend='cuda' cannot run"


@pytest.mark.parametrize("case", list(_bad_input_cases()), ids=lambda c: c[0])
def test_bad_input_raises_before_any_kernel(case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        vsr_kernels.local_argmax_attention(**kwargs)


MISMATCH_SHAPE = (2, 2, 3, 2, 3, 4)  # B, T, C, Cv, H, W: every size >= 2, so one smaller is not empty
FORWARD_AGREE = {
    "B": [("query", 0), ("key", 0), ("value", 0)],
    "T": [("key", 1), ("value", 1)],
    "C": [("query", 1), ("key", 2)],
    "H": [("query", 2), ("key", 3), ("value", 3)],
    "W": [("query", 3), ("key", 4), ("value", 4)],
}
BACKWARD_AGREE = {
    "B": [("grad_out", 0), ("grad_score", 0), ("query", 0), ("key", 0), ("value", 0), ("score", 0),
          ("index", 0)],
    "T": [("grad_out", 1), ("grad_score", 1), ("key", 1), ("value", 1), ("score", 1), ("index", 1)],
    "C": [("query", 1), ("key", 2)],
    "Cv": [("grad_out", 2), ("value", 2)],
    "H": [("grad_out", 3), ("grad_score", 2), ("query", 2), ("key", 3), ("value", 3), ("score", 2),
          ("index", 2)],
    "W": [("grad_out", 4), ("grad_score", 3), ("query", 3), ("key", 4), ("value", 4), ("score", 3),
          ("index", 3)],
}


def _forward_inputs(device="cpu"):
    return dict(zip(NAMES, make_inputs(*MISMATCH_SHAPE, seed=31, device=device)))


def _backward_inputs(device="cpu"):
    q, k, v = make_inputs(*MISMATCH_SHAPE, seed=31)
    out, score, index = reference.local_argmax_attention(q, k, v, 3, 1, 1.0, "zeros")
    go, gs = H.upstream_grads([out, score])
    named = dict(grad_out=go, grad_score=gs, query=q, key=k, value=v, score=score, index=index)
    return {n: t.to(device) for n, t in named.items()}


FORWARD_MISMATCHES = list(H.size_mismatches(_forward_inputs(), FORWARD_AGREE))
BACKWARD_MISMATCHES = list(H.size_mismatches(_backward_inputs(), BACKWARD_AGREE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mismatch", FORWARD_MISMATCHES, ids=[m.id for m in FORWARD_MISMATCHES])
def test_size_mismatch_public_function(backend, mismatch):
    """Every size that must agree, one larger and one smaller, on every input: a ValueError
    naming the size, before any kernel runs."""
    inputs = {n: t.to(backend.device) for n, t in mismatch.inputs.items()}
    letter = next(label for label, members in FORWARD_AGREE.items()
                  if (mismatch.name, mismatch.dim) in members)
    with pytest.raises(ValueError, match=f"must have {letter} = "):
        vsr_kernels.local_argmax_attention(**inputs, kernel_size=3, border="zeros", backend=str(backend))


# ---------------------------------------------------------------------------------------
# Every backend against the reference, float64: fixed and random sweeps, plain and canary.

# Shapes that exercise the borders: windows larger than the frame, 1-pixel frames, T = 1.
SHAPES = [  # B, T, C, Cv, H, W
    (2, 3, 4, 5, 6, 7), (1, 1, 3, 2, 5, 5), (1, 2, 2, 3, 1, 9), (2, 2, 5, 1, 3, 2), (1, 3, 1, 4, 8, 4),
    (1, 2, 3, 2, 5, 1),
]
WINDOWS = [(1, 1), (3, 1), (3, 2), (9, 1), (5, 2)]  # kernel_size, dilation
# The Triton sweep (the interpreter is slow). Together: both borders; kernel 1, 3, 5 and 9,
# also larger than the frame; dilation 2; T = 1; H = 1 or W = 2; rows of more than BLOCK_P
# pixels (programs own runs of one row); every channel tile of the dispatcher (the query in
# registers up to 16 channels, looped over beyond; 32 in the backward) and channel counts
# that are not tile multiples.
TRITON_CASES = [
    ((2, 3, 4, 5, 6, 7), (3, 1), "exclude"),
    ((2, 3, 4, 5, 6, 7), (3, 2), "zeros"),
    ((1, 1, 3, 2, 5, 5), (9, 1), "zeros"),
    ((1, 1, 3, 2, 5, 5), (9, 1), "exclude"),
    ((1, 2, 2, 3, 1, 9), (1, 1), "exclude"),
    ((2, 2, 5, 1, 3, 2), (5, 1), "zeros"),
    ((1, 1, 20, 40, 4, 4), (3, 1), "exclude"),
    ((1, 1, 40, 20, 4, 3), (3, 2), "zeros"),
    ((1, 2, 70, 3, 5, 6), (3, 2), "exclude"),
    ((1, 1, 2, 2, 12, 12), (3, 1), "exclude"),
    ((1, 1, 2, 3, 3, 131), (3, 2), "zeros"),
]
FIXED_CASES = [(s, w, b) for b in BORDERS for s in SHAPES for w in WINDOWS]


def _case_id(case):
    s, w, b = case
    return f"{'x'.join(map(str, s))}-k{w[0]}d{w[1]}-{b}"


def _sweep_params(cases_for):
    params = []
    for param in BACKENDS:
        backend = param.values[0]
        for case in cases_for(backend.name):
            for canary in ("plain", "canary"):
                params.append(pytest.param(backend, case, canary, marks=param.marks,
                                           id=f"{backend}-{_case_id(case)}-{canary}"))
    # The tile forward reads canary inputs only (a superset of the plain check: every value
    # still compared, plus out-of-bounds reads and three layouts), halving its interpreter time.
    return [p for p in with_formulations(params) if p.values[3] != "tile" or p.values[2] == "canary"]


@pytest.mark.parametrize("backend,case,canary,formulation",
                         _sweep_params(lambda b: TRITON_CASES if b == "triton" else FIXED_CASES),
                         indirect=["formulation"])
def test_matches_reference_float64(backend, case, canary, formulation):
    shape, window, border = case
    seed = zlib.crc32(repr((shape, window, border)).encode())
    scale = random.Random(seed).uniform(-2, 2)
    check_against_reference(backend, shape, window, scale, border, seed, canary == "canary")


def _random_case(seed):
    rng = random.Random(seed)
    shape = (rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 8), rng.randint(1, 8), rng.randint(1, 12),
             rng.randint(1, 12))
    return shape, (rng.choice([1, 3, 5, 7, 9]), rng.randint(1, 3)), rng.choice(BORDERS)


# The interpreter is slow: the Triton random sweep takes six of the cheaper seeds (kernel 1, 5
# and 9, both borders, odd ones with canaries); 25 seeds elsewhere.
RANDOM_SEEDS = {"triton": (2, 6, 7, 9, 15, 20)}
TILE_RANDOM_SEEDS = (6, 7, 9, 15)  # the tile forward's: kernels 9 and 1, dilations 2 and 3, both borders


@pytest.mark.parametrize("backend,seed,formulation", [p for p in with_formulations([
    pytest.param(p.values[0], seed, marks=p.marks, id=f"{p.values[0]}-{seed}")
    for p in BACKENDS for seed in RANDOM_SEEDS.get(p.values[0].name, range(25))])
    if p.values[2] != "tile" or p.values[1] in TILE_RANDOM_SEEDS], indirect=["formulation"])
def test_random_sweep_matches_reference(backend, seed, formulation):
    """Odd seeds read canary inputs."""
    shape, window, border = _random_case(seed)
    check_against_reference(backend, shape, window, 0.5, border, seed, canary=seed % 2 == 1)


# ---------------------------------------------------------------------------------------
# The CPU forward's per-instruction-set kernels (csrc/cpu/local_argmax_attention_simd.h):
# VSR_KERNELS_CPU_ISA forces one; each that this CPU runs is checked against the reference
# on the edges of its blocking: W below, at and above a multiple of the vector width (4, 8
# or 16 floats, 2, 4 or 8 doubles), K = 1 and K > 9 (two column blocks), dilation (also
# beyond the frame), both borders, T = 1, non-contiguous (canary) inputs, exact ties.

CPU_ISAS = H.CPU_ISAS
CPU_ONLY = [p for p in BACKENDS if p.values[0].name == "cpu"]
ISA_CASES = [  # (B, T, C, Cv, H, W), (kernel_size, dilation), border
    ((1, 1, 3, 2, 5, 17), (3, 1), "exclude"), ((1, 2, 5, 3, 4, 33), (5, 2), "zeros"),
    ((2, 1, 2, 1, 3, 16), (1, 1), "zeros"), ((1, 2, 4, 2, 9, 8), (9, 1), "exclude"),
    ((1, 1, 2, 2, 12, 15), (11, 1), "zeros"), ((1, 2, 3, 2, 5, 7), (3, 4), "exclude"),
    ((1, 1, 3, 2, 6, 6), (5, 7), "zeros"), ((1, 1, 3, 2, 2, 1), (3, 1), "exclude"),
]


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", ISA_CASES, ids=_case_id)
def test_cpu_isa_matches_reference(backend, isa, case, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    shape, window, border = case
    seed = zlib.crc32(repr(case).encode())
    check_against_reference(backend, shape, window, -0.75, border, seed, canary=seed % 2 == 0)
    check_against_reference(backend, shape, window, 1.0, border, seed, canary=True, integers=True)


# With dilation 1 the forward scores two query rows of one frame per pass over a key row (the
# AVX-512 float kernel shares each shifted key vector between them), else one; a thread's range
# of rows ends its last pair early. 1, 2 and 3 threads put the ranges' ends on even and odd rows,
# mid-frame and at frame ends, so each count pairs the rows differently: float32 integer inputs
# (exact sums and planted ties) must give the float64 reference's outputs exactly, and random
# ones the same bits for every count. Odd H, H = 1, B > 1, both borders, K = 9 reaching past W.
FORWARD_PAIR_CASES = [  # (B, T, C, Cv, H, W), (kernel_size, dilation 1), border
    ((1, 2, 3, 2, 5, 17), (3, 1), "zeros"), ((2, 1, 4, 3, 7, 33), (9, 1), "exclude"),
    ((1, 3, 5, 2, 1, 20), (5, 1), "zeros"), ((1, 1, 6, 4, 10, 7), (9, 1), "zeros"),
]


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", FORWARD_PAIR_CASES, ids=_case_id)
def test_cpu_forward_row_pairs_match_reference_for_any_thread_count(backend, isa, case, monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    shape, (kernel_size, _), border = case
    forward = torch.ops.vsr_kernels.local_argmax_attention
    q, k, v = make_inputs(*shape, seed=11, integers=True)
    want = reference.local_argmax_attention(q, k, v, kernel_size, 1, 1.0, border)
    random = [x.float() for x in make_inputs(*shape, seed=12)]

    def run(_):
        got = forward(q.float(), k.float(), v.float(), kernel_size, 1, 1.0, border == "zeros")
        assert torch.equal(got[2], want[2])
        H.assert_same(got[:2], tuple(w.float() for w in want[:2]), rtol=0, atol=0)
        return forward(*random, kernel_size, 1, 0.3, border == "zeros")

    same_bits_at_thread_counts(run)


# float32 shapes (B, T, C, Cv, H, W), kernel_size: the AVX-512 float kernel reads dilation-1
# windows of K <= 9 columns through aligned loads shifted in registers: W below, at and above
# the 16 lanes, K = 9 wider than W / 2, candidates reaching into both paddings.
LOW_PRECISION_CASES = [((1, 2, 3, 2, 5, 19), 3), ((1, 2, 4, 3, 6, 33), 9), ((1, 1, 5, 2, 7, 16), 7),
                       ((1, 2, 3, 2, 9, 8), 9), ((1, 1, 2, 3, 4, 40), 5)]


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_cpu_isa_low_precision_index_matches_reference(backend, isa, dtype, case, monkeypatch):
    """float32 and bfloat16 go through the float kernel: exact ties (integer inputs) and NaN
    pick what the reference picks, scores equal the float64 reference's on the rounded inputs."""
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    shape, kernel_size = case
    for border in BORDERS:
        q, k, v = make_inputs(*shape, seed=7, integers=True)
        q[0, 1, 2, 3] = float("nan")
        got = op(backend, kernel_size, 1, 1.0, border)(q.to(dtype), k.to(dtype), v.to(dtype))
        want = reference.local_argmax_attention(q, k, v, kernel_size, 1, 1.0, border)
        assert torch.equal(got[2], want[2])
        H.assert_same(got[:2], tuple(w.to(dtype) for w in want[:2]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_zero_padded_selection_ignores_value_pixel_zero(backend, isa, dtype, monkeypatch):
    """A zero-padded candidate's value is 0, not the value plane's pixel 0 (the out gather masks
    sel < 0): with an infinite value there, out stays 0 where the padding wins, not 0 * inf."""
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    # Every inside candidate scores -C, the padding 0: border pixels select the padding,
    # inner ones (tie) their first candidate, which for pixel (1, 1) is the infinite pixel 0.
    q = torch.ones(1, 4, 5, 19, dtype=dtype)
    k = -torch.ones(1, 2, 4, 5, 19, dtype=dtype)
    v = make_inputs(1, 2, 4, 3, 5, 19, dtype=dtype, seed=3)[2]
    v[..., 0, 0] = float("inf")
    got = op(backend, 3, 1, 1.0, "zeros")(q, k, v)
    want = reference.local_argmax_attention(q.double(), k.double(), v.double(), 3, 1, 1.0, "zeros")
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0].double(), want[0], rtol=0, atol=0, equal_nan=False)


# The CPU backward (backward_cpu in csrc/cpu/local_argmax_attention.cpp): phase 1 per (b, t, band
# of rows of about 2048 pixels), phase 2 per (b, block of 8 key and value channels) walking the
# bands in order, each band's terms reaching r * dilation rows beyond it, the gradient rows zeroed
# just before the first term they can receive; whole vectors of pixels through gathers, the rest
# scalar. Per ISA, against the reference and with the same bits for 1, 2 and 3 threads, on: W and
# band sizes no multiple of any vector width, several bands (a halo crossing band boundaries, one
# row per band when W > 2048), channels no multiple of the block (partial last block, C != Cv),
# K = 1, dilation within and beyond the frame, both borders, T = 1 and B = 2.
BACKWARD_TILE_CASES = [  # (B, T, C, Cv, H, W), (kernel_size, dilation), border
    ((1, 2, 5, 3, 7, 70), (3, 1), "exclude"), ((2, 1, 17, 9, 6, 131), (5, 2), "zeros"),
    ((1, 1, 3, 2, 5, 66), (1, 1), "exclude"), ((1, 2, 4, 2, 4, 65), (3, 40), "zeros"),
    ((1, 3, 2, 18, 11, 129), (7, 1), "exclude"), ((1, 1, 16, 16, 9, 16), (9, 1), "zeros"),
    ((1, 2, 5, 3, 40, 70), (5, 1), "exclude"), ((1, 2, 3, 2, 5, 2100), (3, 2), "zeros"),
    ((2, 2, 9, 3, 61, 70), (9, 3), "zeros"),
]


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", BACKWARD_TILE_CASES, ids=_case_id)
def test_cpu_backward_tiles_match_reference_with_the_same_bits_for_any_thread_count(backend, isa, case,
                                                                                       monkeypatch):
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
    shape, window, border = case
    seed = zlib.crc32(repr(case).encode())
    q, k, v = make_inputs(*shape, seed=seed)
    out, score, index = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, *window, 0.5, border == "zeros")
    go, gs = H.upstream_grads([out, score])
    args = (go, gs, q, k, v, score, index, *window, 0.5, border == "zeros")

    def run(n):
        check_against_reference(backend, shape, window, 0.5, border, seed + n, canary=True)
        return torch.ops.vsr_kernels.local_argmax_attention_backward(*args)

    same_bits_at_thread_counts(run)


# The float32 backward moves the selected key and value pixels through channels-last tiles of 16
# or 8 channels with AVX-512, 8 with AVX2 (csrc/cpu/local_argmax_attention_tiles.h), wherever that many
# channels are key and value channels alike; the rest take the per-element kernels, as does phase
# 2 when there are fewer tile tasks than threads. All add the same terms in the same order with
# fused multiply-adds, so every ISA and thread count must agree bit for bit: on tiles and leftover
# channels (C != Cv; 8-channel tiles where 16-channel ones leave a remainder), W no multiple of
# 16 or 8, rings of 2 * reach + 1 rows shorter and longer than the frame (K = 1, K = 9,
# dilation), several phase-1 bands, AVX-512's 16- and 8-lane tiles (8 where the channel planes
# are a multiple of 4 KiB apart), grad_query accumulated in tiles (frames up to 512 KiB of
# tiles) or gathered into its planes per frame, the query transposed once into whole-frame tiles
# (up to 256 KiB) or a row at a time, zero-padded selections, and a value and key with
# infinities (NaN gradients where they are selected). More threads than 8-channel tiles runs
# phase 2's per-element kernels on both ISAs.
CHANNEL_TILE_CASES = [  # (B, T, C, Cv, H, W), (kernel_size, dilation), border
    ((1, 2, 16, 16, 9, 16), (9, 1), "zeros"), ((2, 3, 33, 20, 13, 37), (5, 2), "zeros"),
    ((1, 2, 16, 48, 5, 70), (9, 1), "exclude"), ((1, 1, 32, 32, 40, 64), (3, 1), "exclude"),
    ((1, 2, 16, 17, 3, 2100), (3, 1), "zeros"),  # AVX-512: grad_query's frame tiles, not the query's
    ((1, 2, 20, 16, 6, 7), (1, 1), "exclude"),
    ((1, 3, 16, 16, 70, 33), (7, 3), "zeros"), ((1, 2, 48, 64, 12, 40), (9, 1), "exclude"),
    ((1, 2, 16, 16, 33, 260), (5, 1), "zeros"),  # grad_query's tiles too large: gathered per frame
    ((1, 2, 32, 24, 32, 32), (9, 1), "zeros"),  # planes 4 KiB apart: 8-lane tiles with AVX-512 too
]


@pytest.mark.parametrize("case", CHANNEL_TILE_CASES, ids=_case_id)
def test_cpu_backward_channel_tiles_match_the_per_element_kernels_bit_for_bit(case, monkeypatch):
    if not {"avx2", "avx512f", "fma"} <= H.CPU_FLAGS:
        pytest.skip("needs a CPU with AVX2 and AVX-512")
    shape, window, border = case
    seed = zlib.crc32(repr(case).encode())
    q, k, v = make_inputs(*shape, dtype=torch.float32, seed=seed)
    k[..., 0, 1] = float("inf")
    v[..., -1, -1] = float("-inf")
    out, score, index = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, *window, 0.5, border == "zeros")
    go, gs = H.upstream_grads([out, score])
    args = (go, gs, q, k, v, score, index, *window, 0.5, border == "zeros")
    threads = torch.get_num_threads()
    results = {}
    try:
        per_element = shape[0] * min(shape[2], shape[3]) // 8 + 1
        for isa, n in (("avx2", per_element), ("avx2", 1), ("avx2", 2), ("avx512", 1), ("avx512", 2),
                       ("avx512", 3), ("avx512", per_element)):
            monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
            torch.set_num_threads(n)
            results[isa, n] = torch.ops.vsr_kernels.local_argmax_attention_backward(*args)
    finally:
        torch.set_num_threads(threads)
    want = results["avx2", per_element]
    for key, got in results.items():
        for name, g, w in zip(("grad_query", "grad_key", "grad_value"), got, want):
            assert torch.equal(g.isnan(), w.isnan()), (key, name)
            assert torch.equal(g.nan_to_num(), w.nan_to_num()), (key, name)
    # Against the reference on integer inputs: every product and sum is exact in float32, so
    # the selections and the gradients are the float64 reference's exactly.
    q, k, v = make_inputs(*shape, dtype=torch.float32, seed=seed, integers=True)
    out, score, index = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, *window, 0.5, border == "zeros")
    go, gs = H.upstream_grads([out, score], integers=True)
    got = torch.ops.vsr_kernels.local_argmax_attention_backward(go, gs, q, k, v, score, index, *window, 0.5,
                                                                border == "zeros")
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_score, _ = reference.local_argmax_attention(*ref, *window, 0.5, border)
    want = torch.autograd.grad((ref_out, ref_score), ref, (go.double(), gs.double()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=0)


def test_cpu_isa_switch_rejects_unknown_and_unsupported(monkeypatch):
    if not HAS_CPU_OP:
        pytest.skip("no cpu backend")
    q, k, v = make_inputs(1, 1, 2, 2, 3, 3)
    monkeypatch.setenv("VSR_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="VSR_KERNELS_CPU_ISA must be base, avx2 or avx512"):
        torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, False)
    for isa, needs in H.ISA_NEEDS.items():
        if not needs <= H.CPU_FLAGS:
            monkeypatch.setenv("VSR_KERNELS_CPU_ISA", isa)
            with pytest.raises(RuntimeError, match="this CPU lacks it"):
                torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, False)


@pytest.mark.parametrize("backend", H.backend_params(OP, ("reference", "cpu", "cuda")))
@pytest.mark.parametrize("border", BORDERS)
def test_float32_close_to_float64_reference(backend, border):
    q, k, v = make_inputs(2, 3, 16, 8, 12, 10, seed=7)
    want = reference.local_argmax_attention(q, k, v, 5, 1, 0.25, border)
    got = op(backend, 5, 1, 0.25, border)(*(t.float().to(backend.device) for t in (q, k, v)))
    got = [t.cpu() for t in got]
    agree = got[2] == want[2]
    assert agree.float().mean() > 0.99  # float32 rounding may flip near-ties only
    torch.testing.assert_close(got[1][agree].double(), want[1][agree], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Ties, NaN, gradients, registration, compile.

@interpreter_warnings
@pytest.mark.parametrize("backend,formulation", with_formulations(BACKENDS), indirect=["formulation"])
@pytest.mark.parametrize("border", BORDERS)
def test_planted_ties_pick_the_lowest_candidate(backend, border, formulation):
    # Integer-valued inputs make many candidates score exactly the same.
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (2, 2, 6, 6), generator=g).double()
    k = torch.randint(-1, 2, (2, 3, 2, 6, 6), generator=g).double()
    v = torch.randn(2, 3, 3, 6, 6, generator=g, dtype=torch.float64)
    dev = backend.device
    got = op(backend, 3, 1, 1.0, border)(q.to(dev), k.to(dev), v.to(dev))
    H.assert_same(got, loop_oracle(q, k, v, 3, 1, 1.0, border), **FLOAT64)
    # Duplicated key columns: neighbours along x tie exactly; gradients too.
    q, k, v = make_inputs(1, 2, 3, 2, 6, 6, seed=3, integers=True, requires_grad=True)
    with torch.no_grad():
        k[..., 1::2] = k[..., 0::2]
    want = H.forward_and_grads(reference_op(3, 1, 1.0, border), [q, k, v])
    H.assert_same(H.forward_and_grads(op(backend, 3, 1, 1.0, border), H.leaf_copies([q, k, v], device=dev)),
                  want, OUTPUT_NAMES, **FLOAT64)
    # scale 0 ties every candidate: the first wins, j = 0 with zeros, else the first in the frame.
    for dilation in (1, 2):
        index = op(backend, 3, dilation, 0.0, border)(q.to(dev), k.to(dev), v.to(dev))[2].cpu()
        want = loop_oracle(q.detach(), k.detach(), v.detach(), 3, dilation, 0.0, border)[2]
        assert torch.equal(index, want)
        assert index[0, 0, 0, 0] == (0 if border == "zeros" else 4)


@interpreter_warnings
@pytest.mark.parametrize("backend,formulation", with_formulations(BACKENDS), indirect=["formulation"])
@pytest.mark.parametrize("border", BORDERS)
def test_nan_propagates(backend, border, formulation):
    """NaN ranks above every number and the first NaN wins; a NaN or inf query poisons even
    the zero-padded candidates. Gradients are compared with the C++ CPU backend's, which
    (unlike the reference's autograd) never multiply an unselected NaN key by zero."""
    dev = backend.device
    q, k, v = make_inputs(1, 2, 3, 2, 6, 6, seed=9)
    q[0, 1, 2, 2] = float("nan")  # one query pixel: every candidate of it scores NaN, no other
    out, score, _ = op(backend, 3, 1, 1.0, border)(q.to(dev), k.to(dev), v.to(dev))
    assert score[0, :, 2, 2].isnan().all() and out[0, :, :, 2, 2].isnan().all()
    assert score.isnan().sum() == 2
    k[0, 1, 0, 4, 4] = float("nan")  # one key pixel of frame 1
    v[0, 0, 1, 0, 0] = float("nan")  # one value pixel of frame 0
    q[0, 0, 0, 0] = float("inf")
    for poison_corner in (False, True):
        if poison_corner:  # with zero padding a NaN query poisons even the zero candidates
            q[0, 0, 0, 0] = float("nan")
        inputs = H.leaf_copies([q, k, v], device=dev)
        got = H.forward_and_grads(op(backend, 3, 1, 1.0, border), inputs)
        H.assert_same(got[0], reference.local_argmax_attention(q, k, v, 3, 1, 1.0, border), **FLOAT64)
        assert got[0][1][0, :, 2, 2].isnan().all()  # the NaN query poisons its scores in every frame
        assert got[0][1][0, 1, 3:6, 3:6].isnan().all()  # every window holding the NaN key selects it
        if HAS_CPU_OP and backend.name != "cpu" and backend.name != "reference":
            want = H.forward_and_grads(op("cpu", 3, 1, 1.0, border), H.leaf_copies([q, k, v]))
            H.assert_same(got, want, OUTPUT_NAMES, **FLOAT64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("window", [(3, 1), (3, 2)])
def test_gradcheck(backend, border, window):
    if backend.name == "triton" and window != (3, 2):
        pytest.skip("the interpreter is slow: one window")
    q, k, v = make_inputs(2, 2, 3, 2, 4, 5, seed=11, device=backend.device, requires_grad=True)
    if backend.name == "triton":
        q, k, v = H.leaf_copies([q[:1], k[:1], v[:1]])
    fn = lambda q, k, v: op(backend, *window, 0.7, border)(q, k, v)[:2]  # noqa: E731
    # fast_mode where the full Jacobian is slow to build: the interpreter, and the reference's unfold
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=backend.name in ("triton", "reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_is_not_differentiable(backend):
    q, k, v = make_inputs(1, 2, 3, 2, 4, 4, device=backend.device, requires_grad=True)
    out, score, index = op(backend, 3, 1, 1.0, "exclude")(q, k, v)
    assert out.requires_grad and score.requires_grad and not index.requires_grad
    assert index.dtype == torch.int64


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("zero_border", [False, True])
def test_opcheck(backend, zero_border):
    forward, backward = registered_ops(backend.name)
    shape = (1, 2, 3, 4, 4, 5) if backend.name == "triton" else (2, 2, 3, 4, 5, 6)
    q, k, v = make_inputs(*shape, device=backend.device, requires_grad=True)
    torch.library.opcheck(forward, (q, k, v, 3, 2, 0.5, zero_border))
    out, score, index = forward(q, k, v, 3, 2, 0.5, zero_border)
    go, gs = H.upstream_grads([out, score])
    torch.library.opcheck(backward,
                          (go, gs, q.detach(), k.detach(), v.detach(), score.detach(), index, 3, 2, 0.5,
                           zero_border))


def _compile_backend(backend):
    return "aot_eager" if backend.name == "triton" else "inductor"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    def step(q, k, v):
        out, score, _ = op(backend, 3, 1, 0.5, "zeros")(q, k, v)
        return out.sin().sum() + score.square().sum()

    q, k, v = make_inputs(1, 2, 4, 3, 6, 5, device=backend.device, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend=_compile_backend(backend))
    eager_loss, compiled_loss = step(q, k, v), compiled(q, k, v)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(torch.autograd.grad(compiled_loss, (q, k, v)),
                         torch.autograd.grad(eager_loss, (q, k, v))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_with_channels_last_query(backend):
    # Inductor checks the real gradients' strides against the fake ones: they must agree
    # whatever the inputs' layout.
    def step(q, k, v):
        out, score, _ = op(backend, 3, 1, 0.5, "exclude")(q, k, v)
        return out.sum() + score.sum()

    q, k, v = make_inputs(2, 2, 6, 3, 5, 4, device=backend.device)
    q = q.contiguous(memory_format=torch.channels_last).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend=_compile_backend(backend))
    for got, want in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)),
                         torch.autograd.grad(step(q, k, v), (q, k, v))):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------
# Empty inputs, layouts, determinism.

EMPTY_SHAPES = {"B0": (0, 3, 4, 5, 6, 7), "T0": (2, 0, 4, 5, 6, 7), "H0": (2, 3, 4, 5, 0, 7)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", list(EMPTY_SHAPES))
def test_empty_batch_frames_and_rows(backend, empty):
    shape = EMPTY_SHAPES[empty]
    q, k, v = make_inputs(*shape, device=backend.device, requires_grad=True)
    out, score, index = op(backend, 3, 1, 1.0, "exclude")(q, k, v)
    B, T, _, Cv, H_, W = shape
    assert out.shape == (B, T, Cv, H_, W) and score.shape == index.shape == (B, T, H_, W)
    grads = torch.autograd.grad(out.sum() + score.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(bool((g == 0).all()) for g in grads)  # with T = 0, no frame feeds the query


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_match_contiguous(backend):
    q, k, v = make_inputs(2, 2, 4, 5, 7, 6, seed=5, device=backend.device)
    # The same values behind transposed, strided and permuted (channels-last) layouts.
    qn = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    kn = torch.empty(2, 2, 8, 7, 6, dtype=k.dtype, device=k.device)[:, :, ::2].copy_(k)
    vn = v.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    fn = op(backend, 3, 2, 0.3, "zeros")
    strided = H.forward_and_grads(fn, H.leaf_copies([qn, kn, vn]))
    H.assert_same(strided, H.forward_and_grads(fn, H.leaf_copies([q, k, v])), OUTPUT_NAMES, **EXACT)
    if backend.name != "reference":  # autograd's gradients follow the inputs' layout
        assert all(g.is_contiguous() for g in strided[1])  # gradients are contiguous, like every backend's


LAYOUT_CASES = H.layout_assignments(NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("assignment", [a for _, a in LAYOUT_CASES], ids=[i for i, _ in LAYOUT_CASES])
def test_layout_sweep(backend, assignment):
    """Each input alone, then all mixed, in every layout of the sweep (channels-last, H/W
    strides swapped, stride 0 along B, a sliced view with stride 2 and an offset): the
    backend equals itself on contiguous copies and the float64 reference, and its gradients
    are contiguous (the kernel backends')."""
    inputs = make_inputs(2, 2, 3, 2, 4, 5, seed=21, device=backend.device, requires_grad=True)
    laid = [H.apply_layout(t, assignment[n]) for n, t in zip(NAMES, inputs)]
    dense = H.leaf_copies([t.contiguous() for t in laid])
    fn = op(backend, 3, 1, -0.7, "zeros")
    got = H.forward_and_grads(fn, laid)
    H.assert_same(got, H.forward_and_grads(fn, dense), OUTPUT_NAMES, **FLOAT64)
    want = H.forward_and_grads(reference_op(3, 1, -0.7, "zeros"), H.leaf_copies(dense, device="cpu"))
    H.assert_same(got, want, OUTPUT_NAMES, **FLOAT64)
    if backend.name != "reference":
        assert all(g.is_contiguous() for g in got[1])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_upstream_gradients(backend):
    q, k, v = make_inputs(1, 2, 3, 4, 5, 6, seed=6, device=backend.device)
    out, score, index = op(backend, 3, 1, 1.0, "zeros")(q, k, v)
    go, gs = H.upstream_grads([out, score])
    strided_go = go.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    strided_gs = gs.mT.contiguous().mT
    backward = registered_ops(backend.name)[1]
    args = (q, k, v, score, index, 3, 1, 1.0, True)
    H.assert_same(backward(strided_go, strided_gs, *args), backward(go, gs, *args), **EXACT)
    H.assert_same(backward(H.canary(go), H.canary(gs), *args), backward(go, gs, *args), **EXACT)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_is_deterministic(backend):
    q, k, v = make_inputs(1, 2, 3, 4, 6, 6, seed=8, integers=True, device=backend.device)
    out, score, index = op(backend, 5, 1, 0.3, "exclude")(q, k, v)
    go, gs = H.upstream_grads([out, score])
    backward = registered_ops(backend.name)[1]
    args = (go, gs, q, k, v, score, index, 5, 1, 0.3, False)
    for first, second in zip(backward(*args), backward(*args)):
        assert torch.equal(first, second)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_backward_same_bits_for_any_thread_count(dtype):
    # Uneven splits: 3 key and 2 value channel blocks of the second pass, 3 row blocks of the first.
    q, k, v = make_inputs(2, 2, 40, 20, 17, 13, dtype=dtype, seed=9)
    backward = torch.ops.vsr_kernels.local_argmax_attention_backward
    out, score, index = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 2, 0.3, False)
    go, gs = H.upstream_grads([out, score])
    args = (go, gs, q, k, v, score, index, 3, 2, 0.3, False)
    same_bits_at_thread_counts(lambda _: backward(*args))


@needs_cpu_kernels
def test_auto_backend_on_cpu_is_the_cpu_kernel():
    q, k, v = make_inputs(1, 2, 3, 4, 5, 6)
    H.assert_same(vsr_kernels.local_argmax_attention(q, k, v, 3),
                  vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu"), **EXACT)


# ---------------------------------------------------------------------------------------
# Autocast.

@needs_cpu_kernels
def test_cpu_autocast_runs_mixed_half_precision_inputs_in_float32():
    q, k, v = (t.bfloat16().requires_grad_() for t in make_inputs(1, 2, 4, 3, 5, 6, dtype=torch.float32))
    kf = k.detach().float().requires_grad_()  # an input from a float32 part of the network
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vsr_kernels.local_argmax_attention(q, kf, v, 3, backend="cpu")
    want = vsr_kernels.local_argmax_attention(q.float(), k.float(), v.float(), 3, backend="cpu")
    assert got[0].dtype == got[1].dtype == torch.float32
    H.assert_same(got, want, **EXACT)
    gq, gk, gv = torch.autograd.grad(got[0].sum() + got[1].sum(), (q, kf, v))
    assert (gq.dtype, gk.dtype, gv.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    with pytest.raises(TypeError, match="key must have the dtype of query"):  # no autocast: no casts
        vsr_kernels.local_argmax_attention(q, kf, v, 3, backend="cpu")


@needs_cpu_kernels
def test_cpu_autocast_leaves_float64_alone():
    q, k, v = make_inputs(1, 2, 4, 3, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, score, _ = vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu")
    assert out.dtype == score.dtype == torch.float64


def _assert_rejected(outcome, mismatch):
    assert outcome.kind == "raised", f"{mismatch.id}: the op {outcome.kind} {outcome.error}".rstrip() + \
        " instead of rejecting mismatched sizes"
    assert outcome.error in ("RuntimeError", "ValueError"), \
        f"{mismatch.id}: {outcome.error}: {outcome.message}"
    assert any(name in outcome.message for name in mismatch.group), \
        f"{mismatch.id}: the error names none of {mismatch.group}: {outcome.message}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mismatch", FORWARD_MISMATCHES, ids=[m.id for m in FORWARD_MISMATCHES])
def test_size_mismatch_registered_forward_op(backend, mismatch):
    """The registered forward op called directly (no Python checks in front) rejects it too.
    Run in a forked child: an unchecked kernel may read out of bounds and fault."""
    forward, _ = registered_ops(backend.name)
    inputs = {n: t.to(backend.device) for n, t in mismatch.inputs.items()}
    outcome = H.call_isolated(
        lambda: forward(inputs["query"], inputs["key"], inputs["value"], 3, 1, 1.0, True))
    _assert_rejected(outcome, mismatch)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mismatch", BACKWARD_MISMATCHES, ids=[m.id for m in BACKWARD_MISMATCHES])
def test_size_mismatch_registered_backward_op(backend, mismatch):
    _, backward = registered_ops(backend.name)
    i = {n: t.to(backend.device) for n, t in mismatch.inputs.items()}
    args = [i[name] for name in ("grad_out", "grad_score", "query", "key", "value", "score", "index")]
    outcome = H.call_isolated(lambda: backward(*args, 3, 1, 1.0, True))
    _assert_rejected(outcome, mismatch)


# ---------------------------------------------------------------------------------------
# Triton specifics: launch configurations and low precision.

@needs_triton
def test_triton_cases_cover_every_launch_config():
    C, Cv = 2, 3  # positions in a TRITON_CASES shape
    channels = (("forward", C), ("score_grad", Cv), ("query_grad", C), ("gather_grad", C),
                ("gather_grad", Cv))
    launched = {triton_module.launch_config(kernel, shape[dim]) for shape, _, _ in TRITON_CASES
                for kernel, dim in channels}
    # The sweep forces the tile forward too (float64: the cost model's tile for the sizes).
    # The sweep forces the tile forward too (in float64, with float32's blocks; the half
    # precision blocks run in the low-precision tests).
    launched |= {triton_module.launch_config("tile_forward", shape[C], tile=triton_module.best_tile(
        dtype, shape[C], window[0]), dtype_name=dtype) for shape, window, _ in TRITON_CASES
        for dtype in ("float64", "bfloat16")}
    assert launched == set(triton_module.all_launch_configs())
    assert any(H_ * W > BLOCK_P for (_, _, _, _, H_, W), _, _ in TRITON_CASES)


@needs_triton
def test_triton_channel_tiles_of_the_dispatcher():
    def forward(channels):
        return dict(triton_module.launch_config("forward", channels).constexprs)

    assert forward(1) == {"BLOCK_C": 16, "BLOCK_P": BLOCK_P, "QUERY_IN_REGISTERS": True}
    assert forward(16)["QUERY_IN_REGISTERS"]
    assert forward(17) == forward(64) == {"BLOCK_C": 16, "BLOCK_P": BLOCK_P, "QUERY_IN_REGISTERS": False}
    for kernel, largest in MAX_CHANNEL_BLOCK.items():
        assert dict(triton_module.launch_config(kernel, 1000).constexprs)["BLOCK_C"] == largest


def _as_double(result):
    return tuple(tuple(t.double() if t.is_floating_point() else t for t in part) for part in result)


@needs_triton
@pytest.mark.parametrize("formulation", FORMULATIONS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_low_precision_exact_on_integer_inputs(dtype, formulation):
    """Integer-valued inputs make every product and sum exact in float32 accumulation, and
    every output representable: the result must equal the float64 reference, ties included."""
    q, k, v = make_inputs(1, 2, 4, 3, 6, 5, seed=12, integers=True, device=H.DEVICE)
    fn = (3, 1, 1.0, "zeros")
    got = H.forward_and_grads(op("triton", *fn), H.leaf_copies([q, k, v], dtype), integers=True)
    want = H.forward_and_grads(reference_op(*fn), H.leaf_copies([q, k, v]), integers=True)
    assert all(t.dtype == dtype for t in (got[0][0], got[0][1], *got[1]))
    H.assert_same(_as_double(got), want, **EXACT)

# The tile forward's argmax scans halo columns in row-major order, BLOCK_N at a time. Integer
# inputs (exact in every dtype) with planted equal maxima: key -1 everywhere but +1 at a few
# pixels, query 1, so a window's best score is reached at each planted pixel it holds, often
# several, in different halo rows and different column chunks. The lowest candidate must win.
TILE_TIE_CASES = [  # B, T, C, Cv, H, W, kernel_size, dilation
    (1, 2, 3, 2, 12, 13, 9, 1),  # halo 16 x 16 of an 8 x 8 tile: 4 chunks of 64 columns
    (1, 1, 17, 2, 9, 20, 5, 2),  # two channel steps, a dilated halo
]


@needs_triton
@interpreter_warnings
@pytest.mark.parametrize("formulation", ["tile"], indirect=True)  # the direct kernel: the ties test above
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case", TILE_TIE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_triton_planted_ties_across_halo_rows_and_chunks(case, border, dtype, formulation):
    B, T, C, Cv, H_, W, kernel_size, dilation = case
    g = torch.Generator().manual_seed(sum(case))
    q = torch.ones(B, C, H_, W, dtype=torch.float64)
    k = -torch.ones(B, T, C, H_, W, dtype=torch.float64)
    k[:, :, :, torch.rand(H_, W, generator=g) < 0.15] = 1.0
    v = torch.randint(-8, 9, (B, T, Cv, H_, W), generator=g).double()
    got = op("triton", kernel_size, dilation, 1.0, border)(q.to(dtype), k.to(dtype), v.to(dtype))
    want = reference.local_argmax_attention(q, k, v, kernel_size, dilation, 1.0, border)
    assert (want[1] == C).float().mean() > 0.5  # most windows hold a planted maximum
    H.assert_same(_as_double((got,))[0], tuple(want), **EXACT)


@needs_triton
def test_triton_formulation_of_the_dispatcher(monkeypatch):
    """float16/bfloat16 take the tile forward where the cost model predicts it faster (kernel 9
    at 64 channels); float32 only with allow_tf32; float64 never; a forced one wins."""
    pick = triton_module.formulation
    assert pick(torch.bfloat16, 64, 9) == pick(torch.float16, 64, 9) == "tile"
    assert pick(torch.bfloat16, 64, 1) == "direct"  # a 1 x 1 window: nothing to share
    assert pick(torch.float32, 64, 9) == pick(torch.float64, 64, 9) == "direct"
    monkeypatch.setattr(triton_module, "allow_tf32", True)
    assert pick(torch.float32, 64, 9) == "tile" and pick(torch.float64, 64, 9) == "direct"
    monkeypatch.setattr(triton_module, "forced_formulation", "direct")
    assert pick(torch.bfloat16, 64, 9) == "direct"
    monkeypatch.setattr(triton_module, "forced_formulation", "tile")
    assert pick(torch.float64, 64, 1) == "tile"
    monkeypatch.setattr(triton_module, "forced_formulation", "tiles")
    with pytest.raises(ValueError, match="forced_formulation"):
        pick(torch.float64, 64, 1)
    # The cost model: the tile forward is predicted faster and DRAM-bound at the benchmark shape.
    shape = (4, 7, 64, 64, 180, 320, 9)
    tile, direct = (triton_module.predict(f, "bfloat16", *shape, tile=(8, 8)) for f in ("tile", "direct"))
    assert tile.dram_seconds == direct.dram_seconds and tile.seconds < direct.seconds
    assert tile.dram_fraction >= 0.5


# Relative error of one rounding to the dtype (the interpreter's float32 -> bfloat16 cast
# truncates, a whole unit in the last place) plus float32 accumulation.
LOW_PRECISION_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@needs_triton
@pytest.mark.parametrize("formulation", FORMULATIONS, indirect=True)
@pytest.mark.parametrize("dtype", list(LOW_PRECISION_RTOL))
def test_triton_low_precision_close_to_float64_reference(dtype, formulation):
    q, k, v = make_inputs(1, 2, 24, 6, 6, 7, seed=13, device=H.DEVICE)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the reference sees the rounded inputs
    fn = (5, 1, 0.3, "exclude")
    got = H.forward_and_grads(op("triton", *fn), H.leaf_copies([q, k, v], dtype))
    want = H.forward_and_grads(reference_op(*fn), H.leaf_copies([q, k, v]))
    assert torch.equal(got[0][2], want[0][2])  # no near-ties at this seed: the same candidates
    rtol = LOW_PRECISION_RTOL[dtype]
    for a, b in zip((*got[0][:2], *got[1]), (*want[0][:2], *want[1])):
        assert a.dtype == dtype
        # The gradients sum terms of either sign: errors scale with the largest term.
        torch.testing.assert_close(a.double(), b, rtol=2 * rtol, atol=2 * rtol * b.abs().max().item())


# ---------------------------------------------------------------------------------------
# GPU only: the CUDA and Triton backends on CUDA tensors, in every dtype, against the
# float64 reference, and what only a GPU shows (streams, devices, large tensors).
#
# Scores rounded differently may order a near-tie differently from float64. So each pixel's
# selection must score within tolerance of the float64 maximum, most selections must equal
# the reference's, out and score are compared where they do, and gradients are compared with
# the float64 gradients of the selection the backend made.

GPU_SCALE = 0.5  # exact in every dtype
# dtype: (rtol, atol, least fraction of indices equal to the float64 reference's)
GPU_TOLERANCES = {
    torch.float64: (1e-10, 1e-10, 1.0),
    torch.float32: (1e-5, 1e-4, 0.999),
    torch.float16: (2e-3, 2e-3, 0.99),
    torch.bfloat16: (1.6e-2, 1.6e-2, 0.99),
}
GPU_SHAPES = [  # (B, T, C, Cv, H, W, kernel_size, dilation)
    pytest.param((2, 3, 16, 8, 11, 13, 1, 1), id="kernel1"),
    pytest.param((2, 3, 16, 8, 11, 13, 3, 1), id="kernel3"),
    pytest.param((2, 3, 16, 8, 11, 13, 9, 1), id="kernel9"),
    pytest.param((2, 3, 16, 8, 11, 13, 3, 2), id="dilation2"),
    pytest.param((2, 3, 16, 8, 4, 3, 9, 1), id="frame_smaller_than_window"),
    pytest.param((3, 1, 8, 5, 9, 17, 9, 2), id="one_frame"),
]
# Triton runs each GPU test twice, with its direct and its tile forward side by side (in
# float32 the tile forward is tf32: see test_gpu_tf32_tiles_are_opt_in).
GPU_BACKENDS = [pytest.param(("cuda", None), marks=[pytest.mark.gpu, needs_cuda], id="cuda")] + [
    pytest.param(("triton", f), marks=[pytest.mark.gpu, needs_cuda], id=f"triton-{f}") for f in FORMULATIONS]


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request, monkeypatch):
    torch.manual_seed(0)
    name, formulation = request.param
    reason = H.unavailable(OP, name)
    if reason is not None:
        pytest.skip(f"backend={name!r} cannot run: {reason}")
    if formulation is not None:
        monkeypatch.setattr(triton_module, "forced_formulation", formulation)
    return name


def _gpu_inputs(B, T, C, Cv, H_, W, dtype, device="cuda"):
    """query, key, value: standard normal (never zero), requiring grad."""
    sizes = ((B, C, H_, W), (B, T, C, H_, W), (B, T, Cv, H_, W))
    return [torch.randn(s, dtype=torch.float64, device=device).to(dtype).requires_grad_() for s in sizes]


class Result(NamedTuple):
    out: torch.Tensor
    score: torch.Tensor
    index: torch.Tensor
    grad_out: torch.Tensor
    grad_score: torch.Tensor
    grad_query: torch.Tensor
    grad_key: torch.Tensor
    grad_value: torch.Tensor


def _run(backend, query, key, value, kernel_size, dilation, border, grad_out=None, grad_score=None):
    out, score, index = vsr_kernels.local_argmax_attention(query, key, value, kernel_size, dilation, GPU_SCALE,
                                                           border, backend=backend)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    grad_score = torch.randn_like(score) if grad_score is None else grad_score
    grads = torch.autograd.grad((out, score), (query, key, value), (grad_out, grad_score))
    return Result(out, score, index, grad_out, grad_score, *grads)


def _selected(frames, index, kernel_size, dilation):
    """frames[b, t, :, candidate index[b, t, y, x] of (y, x)], zero outside the frame."""
    B, T, C, H_, W = frames.shape
    cols = F.unfold(frames.reshape(B * T, C, H_, W), kernel_size, dilation=dilation,
                    padding=kernel_size // 2 * dilation).view(B, T, C, kernel_size**2, H_, W)
    return cols.gather(3, index[:, :, None, None].expand(B, T, C, 1, H_, W)).squeeze(3)


def _selection_score(query, key, index, kernel_size, dilation):
    return GPU_SCALE * (query[:, None] * _selected(key, index, kernel_size, dilation)).sum(2)


def _gradients_of_selection(query, key, value, index, stored_score, grad_out, grad_score, kernel_size,
                            dilation):
    """float64 gradients of out and score for the candidates `index` selects; the value's
    gradient uses the score the backend stored (rounded to its dtype)."""
    q, k, v = (x.detach().double().requires_grad_() for x in (query, key, value))
    score = _selection_score(q, k, index, kernel_size, dilation)
    as_stored = score + (stored_score.double() - score).detach()
    out = as_stored[:, :, None] * _selected(v, index, kernel_size, dilation)
    return torch.autograd.grad((out, score), (q, k, v), (grad_out.double(), grad_score.double()))


# float32 through the tile forward multiplies in tf32 (10-bit mantissas): about float16's
# rounding per product, more near-ties ordered differently.
TF32_TOLERANCES = (5e-3, 5e-3, 0.98)


def _gpu_tolerances(dtype):
    tf32 = dtype == torch.float32 and "triton" in AVAILABLE and triton_module.forced_formulation == "tile"
    return TF32_TOLERANCES if tf32 else GPU_TOLERANCES[dtype]


def _assert_forward_matches(out, score, index, query, key, value, kernel_size, dilation, border):
    rtol, atol, agreement = _gpu_tolerances(query.dtype)
    q, k, v = (x.detach().double() for x in (query, key, value))
    ref_out, ref_score, ref_index = reference.local_argmax_attention(q, k, v, kernel_size, dilation, GPU_SCALE,
                                                                     border)
    assert (out.dtype, score.dtype, index.dtype) == (query.dtype, query.dtype, torch.int64)
    assert (out.shape, score.shape, index.shape) == (ref_out.shape, ref_score.shape, ref_index.shape)
    assert ((index >= 0) & (index < kernel_size**2)).all(), "index out of range"
    torch.testing.assert_close(_selection_score(q, k, index, kernel_size, dilation), ref_score, rtol=rtol,
                               atol=atol, msg=lambda m: f"a selection is not a maximum: {m}")
    same = index == ref_index
    agreeing = same.double().mean().item()
    assert agreeing >= agreement, f"only {agreeing:.4f} of the indices agree with the reference"
    torch.testing.assert_close(score.double()[same], ref_score[same], rtol=rtol, atol=atol)
    torch.testing.assert_close(out.double().movedim(2, -1)[same], ref_out.movedim(2, -1)[same], rtol=rtol,
                               atol=atol)


def _assert_close_in_dtype(name, got, expected, dtype):
    rtol, atol, _ = GPU_TOLERANCES[dtype]
    assert got.dtype == dtype, f"grad of {name} has dtype {got.dtype}"
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"grad of {name}: {m}")


def _assert_same_results(got: Result, expected: Result, **tolerances):
    for name, g, e in zip(Result._fields, got, expected):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}", **tolerances)


@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCES))
def test_gpu_matches_reference_in_every_dtype(gpu_backend, dtype, border, shape):
    *sizes, kernel_size, dilation = shape
    query, key, value = _gpu_inputs(*sizes, dtype)
    r = _run(gpu_backend, query, key, value, kernel_size, dilation, border)
    _assert_forward_matches(r.out, r.score, r.index, query, key, value, kernel_size, dilation, border)
    expected = _gradients_of_selection(query, key, value, r.index, r.score, r.grad_out, r.grad_score, kernel_size,
                                       dilation)
    for name, got, want in zip(("query", "key", "value"), (r.grad_query, r.grad_key, r.grad_value), expected):
        _assert_close_in_dtype(name, got, want, dtype)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_tf32_tiles_are_opt_in(monkeypatch):
    """float32 runs the direct forward unless allow_tf32; then the tile forward, in tf32."""
    query, key, value = _gpu_inputs(2, 3, 16, 8, 11, 13, torch.float32)
    assert triton_module.formulation(torch.float32, 16, 9) == "direct"
    monkeypatch.setattr(triton_module, "allow_tf32", True)
    assert triton_module.formulation(torch.float32, 16, 9) == "tile"
    monkeypatch.setattr(triton_module, "forced_formulation", "tile")  # for _gpu_tolerances
    r = _run("triton", query, key, value, 9, 1, "zeros")
    _assert_forward_matches(r.out, r.score, r.index, query, key, value, 9, 1, "zeros")


def _every_other(x, dim):
    """x copied into every other slice of a tensor twice as long along dim."""
    shape = list(x.shape)
    shape[dim] *= 2
    return x.new_empty(shape)[(slice(None),) * dim + (slice(None, None, 2),)].copy_(x)


def test_gpu_non_contiguous_inputs_and_upstream_gradients(gpu_backend):
    query, key, value = _gpu_inputs(2, 3, 16, 8, 11, 13, torch.float32)
    expected = _run(gpu_backend, query, key, value, 5, 2, "zeros")
    layouts = (
        lambda q: q.contiguous(memory_format=torch.channels_last),
        lambda k: _every_other(k, 2),
        lambda v: v.transpose(-1, -2).contiguous().transpose(-1, -2),
    )
    strided = [layout(x.detach()).requires_grad_() for layout, x in zip(layouts, (query, key, value))]
    assert not any(x.is_contiguous() for x in strided)
    grad_out = _every_other(expected.grad_out, 1)
    grad_score = expected.grad_score.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = _run(gpu_backend, *strided, 5, 2, "zeros", grad_out, grad_score)
    _assert_same_results(got, expected)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gpu_autocast_runs_in_the_region_dtype(gpu_backend, dtype):
    query, key, value = _gpu_inputs(2, 3, 16, 8, 11, 13, torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        got = _run(gpu_backend, query, key, value, 3, 1, "exclude")
    low = [x.detach().to(dtype).requires_grad_() for x in (query, key, value)]
    expected = _run(gpu_backend, *low, 3, 1, "exclude", got.grad_out, got.grad_score)
    assert got.out.dtype == got.score.dtype == dtype
    assert got.grad_query.dtype == torch.float32  # the cast is differentiable, back to the input dtype
    for name in ("out", "score", "index"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)


@pytest.mark.parametrize("border", BORDERS)
def test_gpu_and_cpu_agree(gpu_backend, border):
    if not HAS_CPU_OP:
        pytest.skip(f"backend='cpu' cannot run: {H.unavailable(OP, 'cpu')}")
    query, key, value = _gpu_inputs(2, 3, 16, 8, 11, 13, torch.float64)
    gpu = _run(gpu_backend, query, key, value, 5, 2, border)
    on_cpu = [x.detach().cpu().requires_grad_() for x in (query, key, value)]
    cpu = _run("cpu", *on_cpu, 5, 2, border, gpu.grad_out.cpu(), gpu.grad_score.cpu())
    _assert_same_results(Result(*(x.cpu() for x in gpu)), cpu, rtol=1e-12, atol=1e-12)


def test_gpu_runs_on_the_current_stream(gpu_backend):
    """Inputs written on a side stream kept busy first: a kernel launched on any other stream
    than the current one would run before they are written, and read zeros."""
    query, key, value = _gpu_inputs(2, 3, 16, 8, 11, 13, torch.float32)
    expected = _run(gpu_backend, query, key, value, 3, 1, "exclude")
    sources = (query, key, value, expected.grad_out, expected.grad_score)
    blanks = [torch.zeros_like(x, requires_grad=False) for x in sources]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for blank, source in zip(blanks, sources):
            blank.copy_(source.detach())
        q, k, v, grad_out, grad_score = blanks
        leaves = (x.requires_grad_() for x in (q, k, v))
        got = _run(gpu_backend, *leaves, 3, 1, "exclude", grad_out, grad_score)
    torch.cuda.current_stream().wait_stream(side)
    _assert_same_results(got, expected)


@pytest.mark.skipif(not H.HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_runs_on_the_device_of_the_inputs(gpu_backend):
    inputs = _gpu_inputs(2, 3, 16, 8, 11, 13, torch.float32)
    expected = _run(gpu_backend, *inputs, 3, 1, "exclude")
    with torch.cuda.device(0):
        on_1 = [x.detach().to("cuda:1").requires_grad_() for x in inputs]
        got = _run(gpu_backend, *on_1, 3, 1, "exclude", expected.grad_out.to("cuda:1"),
                   expected.grad_score.to("cuda:1"))
    assert all(x.device == torch.device("cuda:1") for x in got)
    _assert_same_results(Result(*(x.to(expected.out.device) for x in got)), expected)


def _assert_frame_matches(r: Result, query, key, value, b, t, kernel_size, dilation, border):
    """Forward and key/value gradients of frame t of batch element b, checked alone; returns
    that frame's float64 share of the query gradient."""
    at, frame = slice(b, b + 1), slice(t, t + 1)
    q, k, v = query[at], key[at, frame], value[at, frame]
    index = r.index[at, frame]
    _assert_forward_matches(r.out[at, frame], r.score[at, frame], index, q, k, v, kernel_size, dilation,
                            border)
    grad_q, grad_k, grad_v = _gradients_of_selection(q, k, v, index, r.score[at, frame], r.grad_out[at, frame],
                                                     r.grad_score[at, frame], kernel_size, dilation)
    _assert_close_in_dtype("key", r.grad_key[at, frame], grad_k, query.dtype)
    _assert_close_in_dtype("value", r.grad_value[at, frame], grad_v, query.dtype)
    return grad_q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_benchmark_shape(gpu_backend, dtype):
    """The CUDA benchmark shape, checked frame by frame at both ends of the batch: wrong grid
    sizing or offsets show up there first. bfloat16 is where the dispatcher tiles."""
    B, T, C, H_, W = 4, 7, 64, 180, 320
    query, key, value = _gpu_inputs(B, T, C, C, H_, W, dtype)
    r = _run(gpu_backend, query, key, value, 9, 1, "exclude")
    for b in (0, B - 1):
        grad_query = sum(_assert_frame_matches(r, query, key, value, b, t, 9, 1, "exclude") for t in range(T))
        _assert_close_in_dtype("query", r.grad_query[b:b + 1], grad_query, dtype)


@pytest.mark.slow
def test_gpu_more_than_2_31_elements(gpu_backend):
    """key holds more than 2**31 elements, so its last frame lies past any 32-bit offset."""
    C, H_, W = 64, 64, 64
    T = 2**31 // (C * H_ * W) + 1
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    query = torch.randn(1, C, H_, W, dtype=torch.float16, device="cuda", requires_grad=True)
    key = torch.randn(1, T, C, H_, W, dtype=torch.float16, device="cuda", requires_grad=True)
    value = torch.randn(1, T, 1, H_, W, dtype=torch.float16, device="cuda", requires_grad=True)
    assert key.numel() > 2**31
    r = _run(gpu_backend, query, key, value, 3, 1, "zeros")
    _assert_frame_matches(r, query, key, value, 0, T - 1, 3, 1, "zeros")


# --- issue 5 regression tests (Python) ---

import doctest  # noqa: E402
import inspect  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402

import re  # noqa: E402

from vsr_kernels import _extension  # noqa: E402


def assert_same_outputs(got, want, **tol):
    H.assert_same(got, want, ("out", "score", "index"), **tol)


def grads(fn, q, k, v, seed=1):
    """Gradients of a random linear function of out and score."""
    return H.forward_and_grads(fn, [q, k, v], seed=seed)[1]

ALL_BACKENDS = ["reference", "cpu", "triton"]
ALL_BACKEND_FORMULATIONS = with_formulations([pytest.param(b, id=b) for b in ALL_BACKENDS])


def _skip_unless_available(backend):
    reason = _backend.unavailable(OP, backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend={backend!r} cannot run: {reason}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_double_backward_raises_naming_the_op(backend):
    _skip_unless_available(backend)
    q, k, v = make_inputs(1, 2, 3, 2, 4, 4, requires_grad=True)
    out, score, _ = vsr_kernels.local_argmax_attention(q, k, v, 3, scale=0.5, backend=backend)
    first = torch.autograd.grad(out.square().sum() + score.square().sum(), (q, k, v), create_graph=True)
    second_loss = sum(g.square().sum() for g in first)
    if backend == "reference":  # plain autograd: second-order gradients exist
        assert all(g is not None for g in torch.autograd.grad(second_loss, (q, k, v), allow_unused=True))
        return
    with pytest.raises(RuntimeError, match=f"vsr_kernels.{OP}: double backward is not supported"):
        torch.autograd.grad(second_loss, (q, k, v))


def test_meta_tensors_give_shapes_on_every_path():
    q, k, v = (t.to("meta") for t in make_inputs(2, 3, 4, 5, 6, 7, dtype=torch.float32))
    shapes = [(2, 3, 5, 6, 7), (2, 3, 6, 7), (2, 3, 6, 7)]
    _backend.op_for(OP, "triton")  # registers the Triton ops' fake implementations
    calls = [lambda: vsr_kernels.local_argmax_attention(q, k, v, 3),  # "auto" is the reference on meta
             lambda: vsr_kernels.local_argmax_attention(q, k, v, 3, backend="reference"),
             lambda: torch.ops.vsr_kernels.local_argmax_attention_triton(q, k, v, 3, 1, 1.0, False)]
    if _extension.LOAD_ERROR is None:
        calls.append(lambda: torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, True))
    for call in calls:
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                outputs = call()
            assert [tuple(t.shape) for t in outputs] == shapes
            assert all(t.device.type == "meta" for t in outputs) and outputs[2].dtype == torch.int64


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend,formulation", ALL_BACKEND_FORMULATIONS, indirect=["formulation"])
@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_every_in_frame_score_minus_inf_picks_the_first_in_frame_candidate(backend, border, formulation):
    _skip_unless_available(backend)
    q, k, v = make_inputs(1, 2, 1, 2, 5, 6, seed=4)
    q = torch.full_like(q, float("-inf"))
    k = k.abs() + 0.5  # every in-frame score is -inf; zero-padded ones are NaN (-inf * 0)
    # The loop oracle scores zero-padded candidates 0, not NaN: with zeros, compare to the reference.
    want = (lambda q: loop_oracle(q, k, v, 3, 1, 1.0, border)) if border == "exclude" else \
        (lambda q: reference.local_argmax_attention(q, k, v, 3, 1, 1.0, border))
    got = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 1.0, border, backend=backend)
    assert_same_outputs(got, want(q))
    # Top-left and bottom-right corners: the first in-frame candidate, or the first (NaN) padded one.
    assert (got[2][0, 0, 0, 0], got[2][0, 0, -1, -1]) == ((4, 0) if border == "exclude" else (0, 2))
    # A mix: -inf scores in some pixels only, finite elsewhere, the same rule throughout.
    q2 = torch.where(torch.rand(q.shape, generator=torch.Generator().manual_seed(1)) < 0.5, q, 1.0)
    got = vsr_kernels.local_argmax_attention(q2, k, v, 3, 1, 1.0, border, backend=backend)
    assert_same_outputs(got, want(q2))


@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("shape", [(2, 3, 0, 2, 4, 5), (2, 3, 3, 0, 4, 5), (2, 3, 3, 2, 0, 5),
                                   (2, 3, 3, 2, 4, 0), (2, 0, 3, 2, 4, 5)],
                         ids=["C=0", "Cv=0", "H=0", "W=0", "T=0"])
def test_reference_takes_empty_dimensions(border, shape):
    q, k, v = make_inputs(*shape, requires_grad=True)
    got = vsr_kernels.local_argmax_attention(q, k, v, 3, 2, 0.5, border, backend="reference")
    assert_same_outputs(got, loop_oracle(q.detach(), k.detach(), v.detach(), 3, 2, 0.5, border))
    grads = torch.autograd.grad(got[0].sum() + got[1].sum(), (q, k, v), allow_unused=True)
    for g, x in zip(grads, (q, k, v)):
        assert g is None or (g.shape == x.shape and (x.numel() == 0 or g.isfinite().all()))


def test_auto_on_cpu_falls_back_to_the_reference_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(_extension, "LOAD_ERROR", ImportError("vsr_kernels._C is not built (a test)"))
    monkeypatch.setattr(_backend, "_WARNED", set())
    q, k, v = make_inputs(1, 2, 3, 2, 5, 5)
    with pytest.warns(RuntimeWarning, match=r"falls back to the slow reference.*_C is not built \(a test\)"):
        got = vsr_kernels.local_argmax_attention(q, k, v, 3)
    assert_same_outputs(got, reference.local_argmax_attention(q, k, v, 3))
    with warnings.catch_warnings():  # once only
        warnings.simplefilter("error")
        vsr_kernels.local_argmax_attention(q, k, v, 3)
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run: .*_C is not built \(a test\)"):
        vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu")


def _run_python(code: str) -> str:
    """Runs `code` in a fresh interpreter importing this checkout's vsr_kernels; returns stdout."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_build_compatibility_compares_releases_and_cuda():
    from vsr_kernels._extension import version_mismatch

    assert version_mismatch("2.13.0+cpu", "2.13.0+cu128") is None  # one release: one C++ ABI
    assert version_mismatch("2.13.0+cu128", "2.13.0") is None
    assert "built against torch 2.13.0" in version_mismatch("2.13.0", "2.14.1+cpu")
    assert "has no CUDA" in version_mismatch("2.13.0+cu128", "2.13.0+cpu", built_with_cuda=True,
                                             installed_has_cuda=False)


def test_a_build_for_another_torch_is_refused_with_how_to_rebuild():
    out = _run_python("""
        import sys, types, warnings
        info = types.ModuleType("vsr_kernels._build_info")
        info.TORCH_VERSION, info.CUDA = "1.0.0+test", False
        sys.modules["vsr_kernels._build_info"] = info
        import torch, vsr_kernels
        from vsr_kernels import _extension
        assert isinstance(_extension.LOAD_ERROR, ImportError)
        print("LOAD_ERROR:", _extension.LOAD_ERROR)
        assert not hasattr(torch.ops.vsr_kernels, "local_argmax_attention_backward"), "_C was loaded"
        q, k, v = torch.randn(1, 2, 4, 4), torch.randn(1, 1, 2, 4, 4), torch.randn(1, 1, 2, 4, 4)
        try:
            vsr_kernels.local_argmax_attention(q, k, v, 3, backend="cpu")
        except ValueError as error:
            print("cpu:", error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vsr_kernels.local_argmax_attention(q, k, v, 3)
        print("auto:", caught[0].message)
    """)
    expected = (f"vsr_kernels was built against torch 1.0.0+test but torch {torch.__version__} is installed; "
                "rebuild with: pip install --no-build-isolation --force-reinstall")
    for prefix in ("LOAD_ERROR:", "cpu:", "auto:"):
        assert any(line.startswith(prefix) and expected in line for line in out.splitlines()), out


def test_an_extension_that_fails_to_load_gets_the_rebuild_advice():
    out = _run_python("""
        import importlib.abc, importlib.util, sys

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                raise ImportError("_C.so: undefined symbol: _ZN3c1015SmallVectorBaseIjE8grow_podEPKvmm")

            def exec_module(self, module):
                pass

        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "vsr_kernels._C":
                    return importlib.util.spec_from_loader(name, Loader())

        sys.meta_path.insert(0, Finder())
        from vsr_kernels import _extension
        print(_extension.LOAD_ERROR)
    """)
    assert "undefined symbol" in out
    assert "rebuild with: pip install --no-build-isolation --force-reinstall" in out
    assert f"torch {torch.__version__} is installed" in out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_backend_takes_half_precision_outside_autocast(dtype):
    _skip_unless_available("cpu")
    q, k, v = (t.to(dtype) for t in make_inputs(1, 2, 8, 3, 6, 7, dtype=torch.float32, seed=2))
    got = vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 0.25, backend="cpu")
    want = reference.local_argmax_attention(q.double(), k.double(), v.double(), 3, 1, 0.25)
    assert got[0].dtype == got[1].dtype == dtype
    agree = got[2] == want[2]
    assert agree.float().mean() > 0.95  # float32 accumulation of the same rounded inputs: near-ties only
    torch.testing.assert_close(got[1][agree].double(), want[1][agree], rtol=1e-2, atol=1e-2)


def test_window_parameters_take_pairs_and_are_bounded():
    q, k, v = make_inputs(1, 2, 3, 2, 5, 6, dtype=torch.float32)
    call = lambda **kw: vsr_kernels.local_argmax_attention(q, k, v, **kw, backend="reference")  # noqa: E731
    assert_same_outputs(call(kernel_size=(3, 3), dilation=[2, 2]), call(kernel_size=3, dilation=2))
    for kwargs, error, message in [
        (dict(kernel_size=(3, 5)), ValueError, r"kernel_size must be an int or a pair of equal ints.*(3, 5)"),
        (dict(dilation=(1, 2)), ValueError, r"dilation must be an int or a pair of equal ints"),
        (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a pair"),
        (dict(kernel_size=(3, 3.0)), TypeError, r"kernel_size must be an int"),
        (dict(kernel_size=32769), ValueError, r"kernel_size must be an odd integer <= 32767 .*got 32769"),
        (dict(dilation=2**31), ValueError, r"dilation must be an integer <= 2147483647 .*got 2147483648"),
        (dict(dilation=2**32 + 1), ValueError, r"dilation must be an integer <= 2147483647"),
    ]:
        with pytest.raises(error, match=message):
            call(**kwargs)


@pytest.mark.parametrize("backend,formulation", ALL_BACKEND_FORMULATIONS, indirect=["formulation"])
@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_the_largest_dilation_is_exact(backend, border, formulation):
    # (j // K - r) * dilation passes 2**31 for K = 5: in int32 the step -2 * (2**31 - 1) wraps to 2.
    _skip_unless_available(backend)
    q, k, v = make_inputs(1, 2, 3, 2, 4, 5, seed=6, requires_grad=True)
    window = (5, 2**31 - 1)
    got = vsr_kernels.local_argmax_attention(q, k, v, *window, 0.5, border, backend=backend)
    assert_same_outputs(got, loop_oracle(q.detach(), k.detach(), v.detach(), *window, 0.5, border))
    if formulation == "tile":  # the backward is the direct formulation's, checked there
        return
    call = lambda backend: lambda q, k, v: vsr_kernels.local_argmax_attention(  # noqa: E731
        q, k, v, *window, 0.5, border, backend=backend)
    for a, b in zip(grads(call(backend), q, k, v), grads(call("reference"), q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _public_callables():
    from vsr_kernels.nn import CrossFrameNonLocalAttention, MemoryAugmentedAttention

    return [vsr_kernels.local_argmax_attention, reference.local_argmax_attention,
            CrossFrameNonLocalAttention.__init__, CrossFrameNonLocalAttention.forward,
            MemoryAugmentedAttention.__init__, MemoryAugmentedAttention.forward]


@pytest.mark.parametrize("function", _public_callables(), ids=lambda f: f.__qualname__)
def test_public_functions_are_typed(function):
    signature = inspect.signature(function)
    untyped = [name for name, p in signature.parameters.items()
               if name != "self" and p.annotation is inspect.Parameter.empty]
    assert untyped == [] and signature.return_annotation is not inspect.Signature.empty


@pytest.mark.parametrize("module", ["vsr_kernels.ops.local_argmax_attention",
                                    "vsr_kernels.reference.local_argmax_attention", "vsr_kernels.nn.mana"])
def test_docstring_examples_run(module):
    import importlib

    module = importlib.import_module(module)
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
    from vsr_kernels.nn import CrossFrameNonLocalAttention, MemoryAugmentedAttention

    for obj in (vsr_kernels.local_argmax_attention, reference.local_argmax_attention,
                CrossFrameNonLocalAttention, MemoryAugmentedAttention):
        assert "Examples:" in obj.__doc__


def test_layers_reject_empty_frames_and_non_positive_channels():
    from vsr_kernels.nn import CrossFrameNonLocalAttention, MemoryAugmentedAttention

    cross, memory = CrossFrameNonLocalAttention(32, 3, 3), MemoryAugmentedAttention(4, 8)
    for frames in (torch.randn(1, 3, 32, 0, 5), torch.randn(1, 3, 32, 5, 0)):
        with pytest.raises(ValueError, match=r"frames must have frames of at least one pixel"):
            cross(frames, 1)
    with pytest.raises(ValueError, match=r"frames must have T = num_frames = 3"):
        cross(torch.randn(1, 0, 32, 5, 5), 0)
    with pytest.raises(ValueError, match=r"x must have frames of at least one pixel"):
        memory(torch.randn(1, 4, 0, 3))
    for channels in (0, -32):
        with pytest.raises(ValueError, match=r"channels must be an integer >= 1"):
            CrossFrameNonLocalAttention(channels, 3)
        with pytest.raises(ValueError, match=r"channels must be an integer >= 1"):
            MemoryAugmentedAttention(channels)
    assert CrossFrameNonLocalAttention(32, 3, kernel_size=(5, 5), dilation=(2, 2)).kernel_size == 5


def test_torch_compile_traces_the_first_call_of_a_lazily_imported_backend():
    # op_for imports the Triton module and registers its ops on first use, even inside a trace.
    out = _run_python("""
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
        import sys, torch, vsr_kernels
        from vsr_kernels.ops import _backend
        if _backend.unavailable("local_argmax_attention", "triton", torch.device("cpu")) is not None:
            print("skip"); sys.exit()
        assert "vsr_kernels.triton.local_argmax_attention" not in sys.modules

        def step(q, k, v):
            out, score, _ = vsr_kernels.local_argmax_attention(q, k, v, 3, backend="triton")
            return out.sum() + score.sum()

        q, k, v = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 4, 4), torch.randn(1, 2, 2, 4, 4)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
        torch.testing.assert_close(compiled, step(q, k, v))
        print("ok")
    """)
    if out.strip().endswith("skip"):
        pytest.skip("Triton cannot run on CPU tensors here")
    assert out.strip().endswith("ok")


# --- issue 5 regression tests (C++ entry points) ---
# Direct torch.ops calls bypass the Python checks: the C++ entry points must refuse whatever
# would read or write out of bounds, and take the empty and half-precision inputs the Python
# function documents.

def _has_kernel(dispatch_key):
    try:
        name = torch.ops.vsr_kernels.local_argmax_attention.default.name()
    except (AttributeError, RuntimeError):  # vsr_kernels._C is not loaded
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)


# The C++ entry points share their checks and per-pixel code: on a GPU machine the CUDA ones
# run the checks and index tests too.
_DIRECT_DEVICES = [d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                   if _has_kernel(key) and (d == "cpu" or torch.cuda.is_available())]
_SIZES = dict(B=2, T=3, C=4, Cv=5, H=6, W=7)
# The dimension names of every tensor argument of the forward and the backward.
_FORWARD_DIMS = dict(query="B C H W", key="B T C H W", value="B T Cv H W")
_BACKWARD_DIMS = dict(grad_out="B T Cv H W", grad_score="B T H W", query="B C H W", key="B T C H W",
                      value="B T Cv H W", score="B T H W", index="B T H W")


def _direct_args(dims, perturbed=None, dim=None, delta=0, dtype=torch.float64, device="cpu"):
    """The tensor arguments named in `dims`, random, with dimension `dim` of `perturbed` made
    `delta` larger."""
    g = torch.Generator().manual_seed(0)
    args = {}
    for name, names in dims.items():
        shape = [_SIZES[n] for n in names.split()]
        if name == perturbed:
            shape[dim] += delta
        if name == "index":
            args[name] = torch.randint(0, 9, shape, generator=g)
        else:
            args[name] = torch.randn(shape, generator=g, dtype=dtype)
    return {name: t.to(device) for name, t in args.items()}


def _size_cases(dims, skip=()):
    return [(name, dim, delta) for name, names in dims.items() for dim, size in enumerate(names.split())
            if (name, size) not in skip for delta in (1, -1)]


def _raises_naming(name, call):
    with pytest.raises(RuntimeError) as info:
        call()
    assert re.search(rf"\b{name}\b", str(info.value)), f"the error does not name {name}: {info.value}"
    return str(info.value)


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
@pytest.mark.parametrize("name, dim, delta", _size_cases(_FORWARD_DIMS, skip={("value", "Cv")}),
                         ids=lambda x: str(x))
def test_direct_forward_rejects_every_size_mismatch(name, dim, delta, device):
    args = _direct_args(_FORWARD_DIMS, name, dim, delta, device=device)
    message = _raises_naming(name, lambda: torch.ops.vsr_kernels.local_argmax_attention(
        args["query"], args["key"], args["value"], 3, 1, 0.5, False))
    assert "vsr_kernels.local_argmax_attention" in message and "got" in message


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
@pytest.mark.parametrize("name, dim, delta", _size_cases(_BACKWARD_DIMS), ids=lambda x: str(x))
def test_direct_backward_rejects_every_size_mismatch(name, dim, delta, device):
    a = _direct_args(_BACKWARD_DIMS, name, dim, delta, device=device)
    message = _raises_naming(name, lambda: torch.ops.vsr_kernels.local_argmax_attention_backward(
        a["grad_out"], a["grad_score"], a["query"], a["key"], a["value"], a["score"], a["index"], 3, 1, 0.5,
        False))
    assert "vsr_kernels.local_argmax_attention_backward" in message and "got" in message


def _backward_with(device, **changes):
    a = dict(_direct_args(_BACKWARD_DIMS, device=device), **changes)
    return lambda: torch.ops.vsr_kernels.local_argmax_attention_backward(
        a["grad_out"], a["grad_score"], a["query"], a["key"], a["value"], a["score"], a["index"], 3, 1, 0.5,
        False)


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
def test_direct_ops_reject_bad_ranks_dtypes_and_index(device):
    f = _direct_args(_FORWARD_DIMS, device=device)
    forward = torch.ops.vsr_kernels.local_argmax_attention
    _raises_naming("query", lambda: forward(f["key"], f["key"], f["value"], 3, 1, 0.5, False))
    _raises_naming("key", lambda: forward(f["query"], f["query"], f["value"], 3, 1, 0.5, False))
    _raises_naming("value", lambda: forward(f["query"], f["key"], f["value"][:, 0], 3, 1, 0.5, False))
    _raises_naming("key", lambda: forward(f["query"], f["key"].float(), f["value"], 3, 1, 0.5, False))
    integers = [f[name].long() for name in ("query", "key", "value")]
    _raises_naming("query", lambda: forward(*integers, 3, 1, 0.5, False))
    b = _direct_args(_BACKWARD_DIMS, device=device)
    _raises_naming("index", _backward_with(device, index=b["index"].int()))
    _raises_naming("index", _backward_with(device, index=b["index"][..., None]))
    _raises_naming("score", _backward_with(device, score=b["score"].float()))
    _raises_naming("grad_out", _backward_with(device, grad_out=b["grad_out"].float()))
    if device == "cuda":  # a CPU tensor among CUDA ones dispatches to the CUDA kernel
        _raises_naming("value", lambda: forward(f["query"], f["key"], f["value"].cpu(), 3, 1, 0.5, False))
        _raises_naming("index", _backward_with(device, index=b["index"].cpu()))


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
@pytest.mark.parametrize("kernel_size, dilation, bad", [
    (0, 1, "kernel_size"), (-1, 1, "kernel_size"), (2, 1, "kernel_size"), (32769, 1, "kernel_size"),
    (2**31 + 1, 1, "kernel_size"), (2**32 + 3, 1, "kernel_size"),  # was truncated to 3 silently
    (3, 0, "dilation"), (3, -1, "dilation"), (3, 2**31, "dilation"), (3, 2**32 + 1, "dilation"),  # was 1
])
def test_direct_ops_bound_kernel_size_and_dilation(kernel_size, dilation, bad, device):
    f = _direct_args(_FORWARD_DIMS, device=device)
    _raises_naming(bad, lambda: torch.ops.vsr_kernels.local_argmax_attention(
        f["query"], f["key"], f["value"], kernel_size, dilation, 0.5, False))
    b = _direct_args(_BACKWARD_DIMS, device=device)
    _raises_naming(bad, lambda: torch.ops.vsr_kernels.local_argmax_attention_backward(
        b["grad_out"], b["grad_score"], b["query"], b["key"], b["value"], b["score"], b["index"], kernel_size,
        dilation, 0.5, False))


@needs_cpu_kernels
def test_direct_ops_take_the_largest_dilation():
    q, k, v = make_inputs(1, 2, 3, 2, 4, 5)
    out, score, index = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 2**31 - 1, 0.5, False)
    assert (index == 4).all()  # every other candidate lies outside the frame
    torch.testing.assert_close(out, score[:, :, None] * v, rtol=0, atol=0)


@needs_cpu_kernels
@pytest.mark.parametrize("device", _DIRECT_DEVICES)
@pytest.mark.parametrize("border", [False, True])
def test_direct_backward_ignores_indices_outside_the_window(border, device):
    # An index no forward produces (only a direct call can pass one) selects nothing, in every
    # gradient alike; it used to be truncated to int for the query gradient (2**32 + 4 -> 4)
    # and wrapped into the window for negative ones.
    q, k, v = (t.to(device) for t in make_inputs(1, 2, 3, 2, 4, 5))
    out, score, _ = torch.ops.vsr_kernels.local_argmax_attention(q, k, v, 3, 1, 0.5, border)
    go, gs = torch.randn_like(out), torch.randn_like(score)
    for bad in (2**32 + 4, -1, 9, -(2**40)):
        index = torch.full(score.shape, bad, dtype=torch.int64, device=device)
        grads = torch.ops.vsr_kernels.local_argmax_attention_backward(
            go, gs, q, k, v, score, index, 3, 1, 0.5, border)
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad)), bad


_EMPTY_SHAPES = {"C": (2, 3, 0, 2, 4, 5), "T": (2, 0, 3, 2, 4, 5), "Cv": (2, 3, 3, 0, 4, 5),
                 "H": (2, 3, 3, 2, 0, 5), "W": (2, 3, 3, 2, 4, 0)}


@needs_cpu_kernels
@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("empty", list(_EMPTY_SHAPES))
def test_cpu_empty_dimensions(empty, border):
    """Empty C, T, Cv, H or W: empty or zero results, never "expected adjacent channels".
    With C = 0 every score is scale * 0 = 0 and the first admissible candidate wins."""
    B, T, C, Cv, H, W = _EMPTY_SHAPES[empty]
    q, k, v = make_inputs(B, T, C, Cv, H, W, seed=3)
    zero_border = border == "zeros"
    forward = torch.ops.vsr_kernels.local_argmax_attention
    backward = torch.ops.vsr_kernels.local_argmax_attention_backward
    out, score, index = forward(q, k, v, 3, 1, 0.5, zero_border)
    assert_same_outputs((out, score, index), loop_oracle(q, k, v, 3, 1, 0.5, border), rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(4)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gs = torch.randn(score.shape, generator=g, dtype=score.dtype)
    grads = backward(go, gs, q, k, v, score, index, 3, 1, 0.5, zero_border)
    for grad, x in zip(grads, (q, k, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype and grad.is_contiguous()
    # What the empty dimension leaves, computed by the same op on a non-empty equivalent:
    # C = 0 is C = 1 with zero query and key; Cv = 0 is Cv = 1 with a zero grad_out.
    if empty == "C":
        q1, k1 = torch.zeros(B, 1, H, W, dtype=q.dtype), torch.zeros(B, T, 1, H, W, dtype=q.dtype)
        assert_same_outputs(forward(q1, k1, v, 3, 1, 0.5, zero_border), (out, score, index), rtol=0, atol=0)
        want = backward(go, gs, q1, k1, v, score, index, 3, 1, 0.5, zero_border)[2]
        torch.testing.assert_close(grads[2], want, rtol=0, atol=0)
    elif empty == "Cv":
        v1 = torch.randn(B, T, 1, H, W, generator=g, dtype=v.dtype)
        go1 = torch.zeros(B, T, 1, H, W, dtype=v.dtype)
        want = backward(go1, gs, q, k, v1, score, index, 3, 1, 0.5, zero_border)
        torch.testing.assert_close(grads[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[1], want[1], rtol=0, atol=0)
    else:  # T, H or W = 0: nothing selects anything
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad))


@needs_cpu_kernels
@pytest.mark.parametrize("border", ["exclude", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_matches_float64_reference(dtype, border):
    """float16 and bfloat16 on the cpu kernels accumulate in float32 and round once: with
    small integer inputs every float32 sum is exact, so each result is the float64
    reference's rounded once to dtype (ties included: exact scores tie exactly)."""
    g = torch.Generator().manual_seed(5)
    B, T, C, Cv, H, W = 2, 3, 6, 5, 7, 6
    q = torch.randint(-2, 3, (B, C, H, W), generator=g).double()
    k = torch.randint(-2, 3, (B, T, C, H, W), generator=g).double()
    v = torch.randint(-3, 4, (B, T, Cv, H, W), generator=g).double()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, score, index = vsr_kernels.local_argmax_attention(q, k, v, 3, 2, 0.5, border, backend="reference")
    go = torch.randint(-2, 3, out.shape, generator=g).double()
    gs = torch.randint(-2, 3, score.shape, generator=g).double()
    want_grads = torch.autograd.grad((out * go).sum() + (score * gs).sum(), (q, k, v))

    zero_border = border == "zeros"
    half = [t.detach().to(dtype) for t in (q, k, v)]
    got = torch.ops.vsr_kernels.local_argmax_attention(*half, 3, 2, 0.5, zero_border)
    assert got[0].dtype == got[1].dtype == dtype
    assert_same_outputs(got, (out.detach().to(dtype), score.detach().to(dtype), index), rtol=0, atol=0)
    got_grads = torch.ops.vsr_kernels.local_argmax_attention_backward(
        go.to(dtype), gs.to(dtype), *half, got[1], got[2], 3, 2, 0.5, zero_border)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert got_grad.dtype == dtype and got_grad.is_contiguous()
        torch.testing.assert_close(got_grad, want_grad.to(dtype), rtol=0, atol=0)
