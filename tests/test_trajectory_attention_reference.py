"""The trajectory_attention reference (TTVSR's grid_sample formulation) against a plain
per-token loop of the op's contract, which never calls grid_sample or torch.round; plus
gradients, value sequences, empty shapes and the public function's argument checks."""
import math

import pytest
import torch

import vsr_kernels
from vsr_kernels.reference import trajectory_attention as reference

EPS = 1e-12


def _round_half_even(x: float) -> int:
    return round(x)  # Python's round() on a float rounds ties to even


def oracle(query, key, values, location):
    """Loop over every (b, i, j) and t, in float64: (outs, score, index)."""
    B, T, D, h, w = key.shape
    q64, k64, l64 = query.double(), key.double(), location.double()
    v64 = [v.double() for v in values]
    outs = [torch.zeros(B, v.shape[2], h, w, dtype=torch.float64) for v in values]
    score = torch.zeros(B, h, w, dtype=torch.float64)
    index = torch.zeros(B, h, w, dtype=torch.int64)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                q = q64[b, :, i, j]
                qnorm = math.sqrt(float((q * q).sum()))
                qn = q / max(qnorm, EPS) if not math.isnan(qnorm) else q / qnorm
                best_t, best = None, None
                cells = []
                for t in range(T):
                    x, y = float(l64[b, t, 0, i, j]), float(l64[b, t, 1, i, j])
                    cell = None
                    if math.isfinite(x) and math.isfinite(y):
                        xr, yr = _round_half_even(x), _round_half_even(y)
                        if 0 <= xr < w and 0 <= yr < h:
                            cell = (yr, xr)
                    cells.append(cell)
                    k = k64[b, t, :, cell[0], cell[1]] if cell else torch.zeros(D, dtype=torch.float64)
                    norm = math.sqrt(float((k * k).sum()))
                    kn = k / max(norm, EPS) if math.isfinite(norm) else k / norm
                    sim = float((qn * kn).sum())
                    # NaN beats everything; among equals the earlier t stays.
                    if best_t is None or (not math.isnan(best) and (math.isnan(sim) or sim > best)):
                        best_t, best = t, sim
                index[b, i, j] = best_t
                score[b, i, j] = best
                cell = cells[best_t]
                if cell:
                    for out, v in zip(outs, v64):
                        out[b, :, i, j] = v[b, best_t, :, cell[0], cell[1]]
    return outs, score, index


def _case(seed, B, T, D, h, w, spread=1.5, halves=False, outside=False, all_outside=False, nan=(),
          ties=False, dvs=(3,)):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, h, w, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, D, h, w, generator=g, dtype=torch.float64)
    vs = [torch.randn(B, T, dv, h, w, generator=g, dtype=torch.float64) for dv in dvs]
    size = torch.tensor([w, h], dtype=torch.float64).view(1, 1, 2, 1, 1)
    # Trajectories that wander around the identity, within about `spread` tokens.
    ident = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), 0).double()
    loc = ident + spread * (2 * torch.rand(B, T, 2, h, w, generator=g, dtype=torch.float64) - 1)
    if halves:  # every location exactly at a .5 tie, both coordinates
        loc = torch.floor(loc) + 0.5
    if outside:  # about a third of the locations beyond some border, some far beyond
        far = torch.rand(B, T, 1, h, w, generator=g) < 1 / 3
        shift = torch.where(torch.rand(B, T, 2, h, w, generator=g) < 0.5, -1.0, 1.0).double()
        reach = torch.tensor([1.0, 7.0], dtype=torch.float64).view(1, 1, 2, 1, 1)
        loc = torch.where(far, loc + shift * size * reach, loc)
    if all_outside:
        loc = loc + size * 3
    if "query" in nan:
        q[0, 0, 0, 0] = float("nan")
    if "key" in nan:
        k[..., 0, 0] = float("nan")  # token (0, 0) of every frame: NaN wherever a trajectory reads it
    if "location" in nan:
        loc[0, 0, 0, 0, 0] = float("nan")
        if loc.shape[-1] > 1:
            loc[0, -1, 1, 0, 1] = float("nan")
    if ties:
        # Key tokens equal up to a power-of-two scale have bit-identical normalisations, and
        # trajectories sharing a location read the same token: exact similarity ties.
        if T > 1:
            k[:, 1::2] = 2.0 * k[:, 0:-1:2].clone()
            loc[:, 1::2] = loc[:, 0:-1:2].clone()
        loc[:, T // 2:] = loc[:, : T - T // 2].clone()
    return q, k, vs, loc


SWEEP = [
    # (B, T, D, h, w), options
    ((1, 1, 4, 3, 5), {}),
    ((2, 1, 3, 4, 4), {"outside": True}),
    ((1, 2, 1, 1, 1), {}),
    ((1, 3, 5, 1, 6), {"outside": True}),
    ((1, 3, 5, 6, 1), {"outside": True}),
    ((2, 4, 8, 5, 7), {}),
    ((1, 5, 16, 4, 6), {"spread": 4.0}),
    ((3, 2, 2, 3, 3), {"halves": True}),
    ((1, 6, 4, 7, 9), {"halves": True}),
    ((2, 3, 6, 8, 12), {"halves": True, "outside": True}),
    ((1, 4, 3, 12, 13), {"halves": True, "spread": 6.0}),
    ((2, 5, 4, 10, 7), {"halves": True}),
    ((1, 4, 7, 5, 5), {"outside": True}),
    ((2, 3, 4, 6, 6), {"outside": True, "spread": 3.0}),
    ((1, 3, 4, 4, 5), {"all_outside": True}),
    ((2, 1, 4, 3, 3), {"all_outside": True}),
    ((1, 3, 4, 4, 4), {"nan": ("query",)}),
    ((2, 3, 4, 4, 5), {"nan": ("key",), "spread": 1.0}),
    ((1, 4, 3, 5, 5), {"nan": ("location",)}),
    ((1, 3, 4, 4, 4), {"nan": ("query", "key", "location"), "outside": True}),
    ((1, 4, 5, 4, 6), {"ties": True}),
    ((2, 6, 3, 5, 5), {"ties": True, "halves": True}),
    ((1, 5, 2, 3, 4), {"ties": True, "outside": True}),
    ((1, 2, 1, 6, 6), {}),
    ((2, 8, 9, 3, 4), {"spread": 2.0}),
    ((1, 3, 32, 2, 3), {}),
    ((1, 7, 4, 9, 2), {"halves": True, "outside": True}),
    ((1, 3, 4, 4, 4), {"dvs": (1, 5, 2)}),
]


@pytest.mark.parametrize("shape,options", SWEEP, ids=[f"{i}-{s}" for i, (s, _) in enumerate(SWEEP)])
def test_reference_matches_loop_float64(shape, options):
    q, k, vs, loc = _case(sum(shape) * 7 + len(options), *shape, **options)
    value = vs if len(vs) > 1 else vs[0]
    out, score, index = reference(q, k, value, loc)
    outs = out if isinstance(out, list) else [out]
    want_outs, want_score, want_index = oracle(q, k, vs, loc)
    assert index.dtype == torch.int64
    assert torch.equal(index, want_index)
    torch.testing.assert_close(score, want_score, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert len(outs) == len(want_outs)
    for got, want in zip(outs, want_outs):
        assert torch.equal(got, want)  # a copy of the chosen token, never arithmetic on it


def test_sweep_exercises_every_case():
    """The sweep above really contains .5 ties, outside and NaN picks and exact ties."""
    picked_outside = picked_nan = tie = 0
    for shape, options in SWEEP:
        q, k, vs, loc = _case(sum(shape) * 7 + len(options), *shape, **options)
        _, score, index = reference(q, k, vs[0], loc)
        picked_outside += int((score == 0).sum())
        picked_nan += int(score.isnan().sum())
        if options.get("ties"):
            # at least one token whose best similarity occurs at several t
            g_loc = loc.gather(1, index[:, None, None].expand(-1, 1, 2, -1, -1))
            tie += int((loc[:, 1:] == g_loc).all(2).any())
    assert picked_outside > 0 and picked_nan > 0 and tie > 0


def test_half_positions_follow_torch_round():
    # one token reading a 1 x 8 row at x = k + .5: torch.round picks the even neighbour
    w = 8
    key = torch.arange(w, dtype=torch.float64).view(1, 1, 1, 1, w).expand(1, w + 1, 1, 1, w).clone() + 1
    query = torch.ones(1, 1, 1, w, dtype=torch.float64)
    xs = torch.arange(w + 1, dtype=torch.float64) - 0.5  # -0.5, 0.5, ..., w - 0.5
    loc = torch.zeros(1, w + 1, 2, 1, w, dtype=torch.float64)
    loc[0, :, 0, 0, 0] = xs
    value = key.clone()
    _, _, index = reference(query, key, value, loc)
    # all sims are 1 (positive 1-D tokens) or 0 outside; pick the first t, then read which
    # column each t reads by asking for one t at a time
    for t, x in enumerate(xs.tolist()):
        out, _, _ = reference(query, key[:, t:t + 1], value[:, t:t + 1], loc[:, t:t + 1])
        col = round(x)
        want = col + 1.0 if 0 <= col < w else 0.0
        assert out[0, 0, 0, 0].item() == want, (x, out[0, 0, 0, 0].item())
    assert index[0, 0, 0].item() == 0


def test_outside_key_under_nan_token_reads_zero():
    # a NaN token under an outside location must not leak through (TTVSR's zero padding)
    q = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    k = torch.full((1, 1, 2, 1, 1), float("nan"), dtype=torch.float64)
    v = torch.full((1, 1, 3, 1, 1), float("nan"), dtype=torch.float64)
    loc = torch.tensor([5.0, 0.0], dtype=torch.float64).view(1, 1, 2, 1, 1)
    out, score, index = reference(q, k, v, loc)
    assert score.item() == 0 and index.item() == 0 and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dims", [(0, 2, 3, 4, 5), (1, 2, 3, 0, 5), (2, 2, 3, 4, 0), (1, 3, 0, 2, 2)])
def test_empty_shapes(dims):
    B, T, D, h, w = dims
    q, k = torch.randn(B, D, h, w), torch.randn(B, T, D, h, w)
    v, loc = torch.randn(B, T, 2, h, w), torch.rand(B, T, 2, h, w) * 2
    out, score, index = vsr_kernels.trajectory_attention(q, k, v, loc)
    assert out.shape == (B, 2, h, w) and score.shape == index.shape == (B, h, w)
    if D == 0:  # a zero query is orthogonal to everything: first frame, score 0
        assert torch.equal(index, torch.zeros_like(index)) and torch.equal(score, torch.zeros_like(score))


def test_gradcheck_query_key_value():
    g = torch.Generator().manual_seed(3)
    B, T, D, h, w = 2, 3, 3, 2, 3
    q = torch.randn(B, D, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, D, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, 2, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    # locations on integers and at .5 ties, some outside; they get no gradient
    ties = 0.5 * (torch.rand(B, T, 2, h, w, generator=g) < 0.3)
    loc = (torch.randint(-1, 5, (B, T, 2, h, w), generator=g) + ties).double().requires_grad_()

    def f(q, k, v):
        out, score, _ = vsr_kernels.trajectory_attention(q, k, v, loc)
        return out, score

    assert torch.autograd.gradcheck(f, (q, k, v))
    out, score, index = vsr_kernels.trajectory_attention(q, k, v, loc)
    (out.sum() + score.sum()).backward()
    assert loc.grad is None or torch.equal(loc.grad, torch.zeros_like(loc))
    assert not index.requires_grad
    assert (index == 0).any() and (index > 0).any() and (score == 0).any()  # outside picks too


def test_value_sequence_shares_the_index():
    q, k, vs, loc = _case(11, 2, 4, 5, 4, 6, dvs=(5, 5, 5), outside=True)
    outs, score, index = vsr_kernels.trajectory_attention(q, k, tuple(vs), loc)
    assert isinstance(outs, list) and len(outs) == 3
    for v, out in zip(vs, outs):
        one, s1, i1 = vsr_kernels.trajectory_attention(q, k, v, loc)
        assert torch.equal(out, one) and torch.equal(s1, score) and torch.equal(i1, index)
    q, k, vs, loc = _case(12, 1, 3, 3, 2, 3, dvs=(2, 1, 2), outside=True)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    vg = [v.clone().requires_grad_() for v in vs]

    def f(q, k, *values):
        outs, score, _ = vsr_kernels.trajectory_attention(q, k, list(values), loc)
        return (*outs, score)

    assert torch.autograd.gradcheck(f, (qg, kg, *vg), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_matches_float64_choice(dtype):
    q, k, vs, loc = _case(21, 2, 4, 8, 5, 6, outside=True)
    q, k, v = (t.to(dtype) for t in (q, k, vs[0]))
    out, score, index = vsr_kernels.trajectory_attention(q, k, v, loc.float())
    assert out.dtype == dtype and score.dtype == dtype and index.dtype == torch.int64
    want, want_score, want_index = reference(q.double(), k.double(), v.double(), loc)
    assert torch.equal(index, want_index)
    assert torch.equal(out, want.to(dtype))
    torch.testing.assert_close(score, want_score.to(dtype))


def test_non_contiguous_inputs():
    q, k, vs, loc = _case(4, 2, 3, 4, 5, 6, outside=True)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    kt = k.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    vt = vs[0].contiguous(memory_format=torch.channels_last_3d)
    lt = loc.transpose(3, 4).contiguous().transpose(3, 4)
    got = vsr_kernels.trajectory_attention(qt, kt, vt, lt)
    want = vsr_kernels.trajectory_attention(q, k, vs[0], loc)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- argument checks


def _good():
    query, key = torch.randn(2, 4, 3, 5), torch.randn(2, 3, 4, 3, 5)
    return query, key, torch.randn(2, 3, 6, 3, 5), torch.rand(2, 3, 2, 3, 5)


def _bad(which, make):
    args = list(_good())
    args[which] = make(args[which])
    return args


BAD = [
    (TypeError, "query", lambda: _bad(0, lambda t: t.numpy())),
    (ValueError, "query", lambda: _bad(0, lambda t: t[0])),
    (ValueError, "key", lambda: _bad(1, lambda t: t[:, 0])),
    (ValueError, "value", lambda: _bad(2, lambda t: t[None])),
    (ValueError, "location", lambda: _bad(3, lambda t: t[:, :, :, None])),
    (ValueError, "key", lambda: _bad(1, lambda t: t[:, :, :3])),  # D mismatch
    (ValueError, "key", lambda: _bad(1, lambda t: t[:1])),  # B mismatch
    (ValueError, "key", lambda: _bad(1, lambda t: t[..., :4])),  # w mismatch
    (ValueError, "key", lambda: _bad(1, lambda t: t[:, :0])),  # T = 0
    (ValueError, "value", lambda: _bad(2, lambda t: t[:, :2])),  # T mismatch
    (ValueError, "value", lambda: _bad(2, lambda t: t[:, :, :, :2])),  # h mismatch
    (ValueError, "location", lambda: _bad(3, lambda t: t[:, :2])),
    (ValueError, "location", lambda: _bad(3, lambda t: t[..., :1, :])),
    (ValueError, "location", lambda: _bad(3, lambda t: t.repeat(1, 1, 2, 1, 1)[:, :, :3])),  # 3 channels
    (TypeError, "location", lambda: _bad(3, lambda t: t.long())),
    (TypeError, "location", lambda: _bad(3, lambda t: t.numpy())),
    (TypeError, "key", lambda: _bad(1, lambda t: t.double())),
    (TypeError, "value", lambda: _bad(2, lambda t: t.double())),
    (TypeError, "query", lambda: _bad(0, lambda t: t.long())),
    (ValueError, "value", lambda: _bad(2, lambda t: [])),
    (TypeError, "value", lambda: _bad(2, lambda t: {"a": t})),
    (TypeError, r"value\[1\]", lambda: _bad(2, lambda t: [t, t.double()])),
    (ValueError, r"value\[2\]", lambda: _bad(2, lambda t: [t, t, t[:, :, :, :2]])),
    (ValueError, r"value\[1\]", lambda: _bad(2, lambda t: [t, t[:, 0]])),
]


@pytest.mark.parametrize("error,name,make", BAD, ids=[f"{i}-{n}" for i, (_, n, _) in enumerate(BAD)])
def test_bad_inputs(error, name, make):
    with pytest.raises(error, match=name):
        vsr_kernels.trajectory_attention(*make())


def test_location_dtype_is_free_and_meta_device_mismatch_is_caught():
    q, k, v, loc = _good()
    vsr_kernels.trajectory_attention(q, k, v, loc.double())  # location keeps its own dtype
    with pytest.raises(ValueError, match="location"):
        vsr_kernels.trajectory_attention(q, k, v, loc.to("meta"))
    with pytest.raises(ValueError, match="key"):
        vsr_kernels.trajectory_attention(q, k.to("meta"), v, loc)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        vsr_kernels.trajectory_attention(*_good(), backend="fast")
    out, score, index = vsr_kernels.trajectory_attention(*_good(), backend="reference")
    assert out.shape == (2, 6, 3, 5) and score.shape == index.shape == (2, 3, 5)
