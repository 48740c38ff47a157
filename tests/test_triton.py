"""The Triton backend of local_argmax_attention: the reference (float64), the C++ semantics
(NaN ranking, ties, zero padding), gradients, registration, every kernel configuration and
the low-precision dtypes.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before vsr_kernels is imported), which is slow: shapes stay tiny, and a
frame of at most 128 pixels is a single program. Compilation for real GPU targets is
tested in test_triton_compile.py.
"""
import zlib

import pytest
import torch

pytest.importorskip("triton")

import vsr_kernels  # noqa: E402
from vsr_kernels import reference  # noqa: E402
from vsr_kernels.ops import _backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_UNAVAILABLE = _backend.unavailable("local_argmax_attention", "triton", DEVICE)
pytestmark = pytest.mark.skipif(TRITON_UNAVAILABLE is not None,
                                reason=f"Triton cannot run here: {TRITON_UNAVAILABLE}")

if TRITON_UNAVAILABLE is None:
    # Imports the Triton ops and registers their autograd and fake tensors.
    _backend.op_for("local_argmax_attention", "triton")
    from vsr_kernels.triton import local_argmax_attention as triton_module
    from vsr_kernels.triton.local_argmax_attention import BLOCK_P, MAX_CHANNEL_BLOCK

HAS_CPU_OP = _backend.unavailable("local_argmax_attention", "cpu", torch.device("cpu")) is None


def make_inputs(B, T, C, Cv, H, W, dtype=torch.float64, seed=0, integers=False, requires_grad=False):
    """Random query, key, value; integer-valued ones (in {-1, 0, 1}) are exact in every dtype
    and make many candidates tie."""
    g = torch.Generator().manual_seed(seed)
    make = (lambda *shape: torch.randint(-1, 2, shape, generator=g)) if integers else \
        (lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64))
    tensors = (make(B, C, H, W), make(B, T, C, H, W), make(B, T, Cv, H, W))
    return [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in tensors]


def triton_op(kernel_size, dilation, scale, border):
    return lambda q, k, v: vsr_kernels.local_argmax_attention(q, k, v, kernel_size, dilation, scale, border,
                                                              backend="triton")


def reference_op(kernel_size, dilation, scale, border):
    return lambda q, k, v: reference.local_argmax_attention(q, k, v, kernel_size, dilation, scale, border)


def upstream_grads(out, score, seed=1, integers=False):
    g = torch.Generator().manual_seed(seed)
    make = (lambda t: torch.randint(-1, 2, t.shape, generator=g)) if integers else \
        (lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64))
    return make(out).to(out), make(score).to(score)


def forward_and_grads(fn, q, k, v, seed=1, integers=False):
    """(out, score, index) and the gradients of <out, random> + <score, random>."""
    out, score, index = fn(q, k, v)
    go, gs = upstream_grads(out, score, seed, integers)
    return (out, score, index), torch.autograd.grad((out * go).sum() + (score * gs).sum(), (q, k, v))


def assert_same(got, want, **tol):
    (out, score, index), grads = got
    (want_out, want_score, want_index), want_grads = want
    assert torch.equal(index, want_index)
    for a, b in zip((out, score, *grads), (want_out, want_score, *want_grads)):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


def leaf_copies(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


# (B, T, C, Cv, H, W), (kernel_size, dilation), border. Together: both borders; kernel 1, 3,
# 5 and 9, also larger than the frame; dilation 2; T = 1; H = 1 or W = 2; rows of more
# than BLOCK_P pixels (programs own runs of one row); every channel tile of the dispatcher
# (the query in registers up to 16 channels, looped over beyond; 32 in the backward) and
# channel counts that are not tile multiples.
CASES = [
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


@pytest.mark.parametrize("shape,window,border", CASES, ids=[f"{s}-k{w[0]}d{w[1]}-{b}" for s, w, b in CASES])
def test_matches_reference_float64(shape, window, border):
    seed = zlib.crc32(repr((shape, window, border)).encode())
    q, k, v = make_inputs(*shape, seed=seed, requires_grad=True)
    scale = (0.5 + seed % 100 / 50) * (-1) ** seed
    got = forward_and_grads(triton_op(*window, scale, border), q, k, v)
    assert_same(got, forward_and_grads(reference_op(*window, scale, border), q, k, v), rtol=1e-12, atol=1e-12)


def test_cases_cover_every_launch_config():
    C, Cv = 2, 3  # positions in a CASES shape
    channels = (("forward", C), ("score_grad", Cv), ("query_grad", C), ("gather_grad", C), ("gather_grad", Cv))
    launched = {triton_module.launch_config(kernel, shape[dim]) for shape, _, _ in CASES for kernel, dim in channels}
    assert launched == set(triton_module.all_launch_configs())
    assert any(H * W > BLOCK_P for (_, _, _, _, H, W), _, _ in CASES)


@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_planted_ties_pick_the_lowest_candidate(border):
    q, k, v = make_inputs(1, 2, 3, 2, 6, 6, seed=3, integers=True, requires_grad=True)
    with torch.no_grad():
        k[..., 1::2] = k[..., 0::2]  # duplicate key columns: neighbours along x tie exactly
    want = forward_and_grads(reference_op(3, 1, 1.0, border), q, k, v)
    assert_same(forward_and_grads(triton_op(3, 1, 1.0, border), q, k, v), want)
    # scale 0 ties every candidate: the first wins, j = 0 with zeros, else the first in the frame
    index = triton_op(3, 2, 0.0, border)(q, k, v)[2]
    assert torch.equal(index, reference_op(3, 2, 0.0, border)(q, k, v)[2])
    assert index[0, 0, 0, 0] == (0 if border == "zeros" else 4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_nan_follows_the_cpu_semantics(border):
    """NaN ranks above every number and the first NaN wins; a NaN or inf query poisons even
    the zero-padded candidates. Gradients are compared with the C++ backend's, which (unlike
    the reference's autograd) never multiply an unselected NaN key by zero."""
    q, k, v = make_inputs(1, 2, 3, 2, 5, 5, seed=9, requires_grad=True)
    with torch.no_grad():
        q[0, 1, 2, 2] = float("nan")
        q[0, 0, 0, 0] = float("inf")
        k[0, 1, 0, 4, 4] = float("nan")
        v[0, 0, 1, 0, 0] = float("nan")
    got = forward_and_grads(triton_op(3, 1, 1.0, border), q, k, v)
    assert got[0][1][0, :, 2, 2].isnan().all()
    assert_same((got[0], ()), (reference_op(3, 1, 1.0, border)(q, k, v), ()))
    if HAS_CPU_OP:
        cpu_op = lambda q, k, v: vsr_kernels.local_argmax_attention(  # noqa: E731
            q, k, v, 3, 1, 1.0, border, backend="cpu")
        want = forward_and_grads(cpu_op, *[t.detach().cpu().requires_grad_() for t in (q, k, v)])
        assert_same(tuple(tuple(t.cpu() for t in part) for part in got), want)


def test_batch_zero_and_empty_frames():
    for shape in ((0, 3, 4, 5, 6, 7), (2, 0, 4, 5, 6, 7), (2, 3, 4, 5, 0, 7)):
        q, k, v = make_inputs(*shape, requires_grad=True)
        out, score, index = triton_op(3, 1, 1.0, "exclude")(q, k, v)
        B, T, _, _, H, W = shape
        assert out.shape == (B, T, 5, H, W) and score.shape == index.shape == (B, T, H, W)
        grads = torch.autograd.grad(out.sum() + score.sum(), (q, k, v))
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
        assert all(bool((g == 0).all()) for g in grads)  # with T = 0, no frame feeds the query


def test_non_contiguous_inputs_match_contiguous():
    q, k, v = make_inputs(2, 2, 4, 5, 7, 6, seed=5)
    # The same values behind transposed, strided and channels-last layouts.
    qn = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    kn = torch.empty(2, 2, 8, 7, 6, dtype=k.dtype, device=DEVICE)[:, :, ::2].copy_(k)
    vn = v.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    fn = triton_op(3, 2, 0.3, "zeros")
    strided = forward_and_grads(fn, *leaf_copies([qn, kn, vn]))
    assert_same(strided, forward_and_grads(fn, *leaf_copies([q, k, v])), rtol=0, atol=0)
    assert all(g.is_contiguous() for g in strided[1])  # gradients are contiguous, like every backend's


def test_non_contiguous_upstream_gradients():
    q, k, v = make_inputs(1, 2, 3, 4, 5, 6, seed=6)
    out, score, index = triton_op(3, 1, 1.0, "zeros")(q, k, v)
    go, gs = upstream_grads(out, score)
    strided_go = go.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    strided_gs = gs.mT.contiguous().mT
    backward = torch.ops.vsr_kernels.local_argmax_attention_triton_backward
    args = (q, k, v, score, index, 3, 1, 1.0, True)
    for got, want in zip(backward(strided_go, strided_gs, *args), backward(go, gs, *args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backward_is_deterministic():
    q, k, v = make_inputs(1, 2, 3, 4, 6, 6, seed=8, integers=True)
    out, score, index = triton_op(5, 1, 0.3, "exclude")(q, k, v)
    go, gs = upstream_grads(out, score)
    backward = torch.ops.vsr_kernels.local_argmax_attention_triton_backward
    args = (go, gs, q, k, v, score, index, 5, 1, 0.3, False)
    for first, second in zip(backward(*args), backward(*args)):
        assert torch.equal(first, second)


@pytest.mark.parametrize("border", ["exclude", "zeros"])
def test_gradcheck(border):
    q, k, v = make_inputs(1, 2, 3, 2, 4, 5, seed=11, requires_grad=True)
    fn = lambda q, k, v: triton_op(3, 2, 0.7, border)(q, k, v)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("zero_border", [False, True])
def test_opcheck(zero_border):
    q, k, v = make_inputs(1, 2, 3, 4, 4, 5, requires_grad=True)
    forward = torch.ops.vsr_kernels.local_argmax_attention_triton
    torch.library.opcheck(forward, (q, k, v, 3, 2, 0.5, zero_border))
    out, score, index = forward(q, k, v, 3, 2, 0.5, zero_border)
    go, gs = upstream_grads(out, score)
    torch.library.opcheck(torch.ops.vsr_kernels.local_argmax_attention_triton_backward,
                          (go, gs, q.detach(), k.detach(), v.detach(), score.detach(), index, 3, 2, 0.5,
                           zero_border))


def test_torch_compile_fullgraph_matches_eager():
    def step(q, k, v):
        out, score, _ = triton_op(3, 1, 0.5, "zeros")(q, k, v)
        return out.sin().sum() + score.square().sum()

    q, k, v = make_inputs(1, 2, 4, 3, 5, 4, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss, compiled_loss = step(q, k, v), compiled(q, k, v)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(torch.autograd.grad(compiled_loss, (q, k, v)),
                         torch.autograd.grad(eager_loss, (q, k, v))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_exact_on_integer_inputs(dtype):
    """Integer-valued inputs make every product and sum exact in float32 accumulation, and
    every output representable: the result must equal the float64 reference, ties included."""
    q, k, v = make_inputs(1, 2, 4, 3, 6, 5, seed=12, integers=True)
    fn = (3, 1, 1.0, "zeros")
    got = forward_and_grads(triton_op(*fn), *leaf_copies([q, k, v], dtype), integers=True)
    want = forward_and_grads(reference_op(*fn), *leaf_copies([q, k, v]), integers=True)
    assert all(t.dtype == dtype for t in (got[0][0], got[0][1], *got[1]))
    assert_same(tuple(tuple(t.double() if t.is_floating_point() else t for t in part) for part in got), want,
                rtol=0, atol=0)


# Relative error of one rounding to the dtype (the interpreter's float32 -> bfloat16 cast
# truncates, a whole unit in the last place) plus float32 accumulation.
LOW_PRECISION_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_RTOL))
def test_low_precision_close_to_float64_reference(dtype):
    q, k, v = make_inputs(1, 2, 24, 6, 6, 7, seed=13)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the reference sees the rounded inputs
    fn = (5, 1, 0.3, "exclude")
    got = forward_and_grads(triton_op(*fn), *leaf_copies([q, k, v], dtype))
    want = forward_and_grads(reference_op(*fn), *leaf_copies([q, k, v]))
    assert torch.equal(got[0][2], want[0][2])  # no near-ties at this seed: the same candidates
    rtol = LOW_PRECISION_RTOL[dtype]
    for a, b in zip((*got[0][:2], *got[1]), (*want[0][:2], *want[1])):
        assert a.dtype == dtype
        # The gradients sum terms of either sign: errors scale with the largest term.
        torch.testing.assert_close(a.double(), b, rtol=2 * rtol, atol=2 * rtol * b.abs().max().item())


def test_channel_tiles_of_the_dispatcher():
    def forward(channels):
        return dict(triton_module.launch_config("forward", channels).constexprs)

    assert forward(1) == {"BLOCK_C": 16, "BLOCK_P": BLOCK_P, "QUERY_IN_REGISTERS": True}
    assert forward(16)["QUERY_IN_REGISTERS"]
    assert forward(17) == forward(64) == {"BLOCK_C": 16, "BLOCK_P": BLOCK_P, "QUERY_IN_REGISTERS": False}
    for kernel, largest in MAX_CHANNEL_BLOCK.items():
        assert dict(triton_module.launch_config(kernel, 1000).constexprs)["BLOCK_C"] == largest
