"""Trajectory-aware attention (TTVSR) in Triton: forward and deterministic backward.

Registered with `torch.library.custom_op` as `vsr_kernels::trajectory_attention_triton` and
`..._triton_backward`, with the schemas and semantics of the C++ ops
(csrc/kernels/trajectory_attention.h is the per-token specification this file follows). Their
fake tensors and autograd are the C++ ops', registered by vsr_kernels.ops when it first imports
this module. Tensors are read through their strides, never copied (non-contiguous inputs work).

Forward, one program per BLOCK_P consecutive tokens of one batch element, one token per lane:
  1. |q|^2 and the poison sum_c q_c * 0 over channel tiles;
  2. per frame t: the location rounded to nearest, ties to even (floor and the fraction, in
     float64, where every float location is exact), the inside test (NaN fails), then
     <q, k_t> and |k_t|^2 over channel tiles, gathering the key at the token (masked
     outside); the running selection with the C++ `beats` (NaN wins, ties keep the lower t);
  3. score, index and the chosen token (-1 outside) stored; then one gather kernel per value
     reads the chosen frame's value only.
Each key element on a trajectory is read once; the query tile is re-read per frame from cache.

Backward, deterministic without atomics:
  1. per token: the chosen key's sums again, the coefficients of
     kernels/trajectory_attention.h (grad_q = gain * k + q_self * q, grad_k = gain * q +
     k_self * k), grad_query written (each token owns its column), and the key token it
     adds into (a flat (b, t, token) number, or a sentinel past the end);
  2. a stable torch.sort of those numbers: the tokens adding into one key token become a run,
     in increasing token order;
  3. one lane per run sums its tokens' contributions in that order and writes the key (and,
     by the same kernel, value) gradient of its token; every other gradient element is zero.
Accumulation is float32 (float64 for float64 inputs).
"""
import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _round_half_even(v):
    """Nearest integer, ties to even, of a float64 tensor (NaN stays NaN)."""
    f = tl.floor(v)
    d = v - f  # exact: see the module docstring
    half = f * 0.5
    even = tl.floor(half) == half
    return tl.where(d > 0.5, f + 1, tl.where(d < 0.5, f, tl.where(even, f, f + 1)))


@triton.jit
def _token_at(loc_ptr, l_st, l_sc, ly_off, t, h, w, mask):
    """The token read by frame t's location at offsets ly_off, and whether it is inside."""
    lx = tl.load(loc_ptr + t * l_st + ly_off, mask=mask, other=float("nan")).to(tl.float64)
    ly = tl.load(loc_ptr + t * l_st + l_sc + ly_off, mask=mask, other=float("nan")).to(tl.float64)
    x = _round_half_even(lx)
    y = _round_half_even(ly)
    inside = (x >= 0) & (x <= (w - 1).to(tl.float64)) & (y >= 0) & (y <= (h - 1).to(tl.float64)) & mask
    xi = tl.where(inside, x, 0).to(tl.int64)
    yi = tl.where(inside, y, 0).to(tl.int64)
    return yi, xi, inside


@triton.jit
def _divisor(squares):
    n = tl.sqrt(squares)
    return tl.where(n > 1e-12, n, 1e-12)


@triton.jit
def _forward_kernel(
    query_ptr, key_ptr, loc_ptr, score_ptr, index_ptr, chosen_ptr,
    T, D, h, w,
    q_sb, q_sc, q_sy, q_sx,
    k_sb, k_st, k_sc, k_sy, k_sx,
    l_sb, l_st, l_sc, l_sy, l_sx,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    N = h * w
    blocks = tl.cdiv(N, BLOCK_P)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < N
    py = (p // w).to(tl.int64)
    px = (p % w).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    q_base = query_ptr + b * q_sb + py * q_sy + px * q_sx
    qq = tl.zeros([BLOCK_P], ACC)
    poison = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, D, BLOCK_C):
        cm = (c0 + c) < D
        q = tl.load(q_base[None, :] + (c0 + c).to(tl.int64)[:, None] * q_sc,
                    mask=cm[:, None] & valid[None, :], other=0).to(ACC)
        qq += tl.sum(q * q, axis=0)
        poison += tl.sum(q * 0, axis=0)
    l_off = b * l_sb + py * l_sy + px * l_sx
    best = tl.zeros([BLOCK_P], ACC)
    best_t = tl.full([BLOCK_P], -1, tl.int64)
    best_pos = tl.full([BLOCK_P], -1, tl.int64)
    for t in range(T):
        ky, kx, inside = _token_at(loc_ptr + l_off, l_st, l_sc, 0, t, h, w, valid)
        k_base = key_ptr + b * k_sb + t * k_st + ky * k_sy + kx * k_sx
        qk = tl.zeros([BLOCK_P], ACC)
        kk = tl.zeros([BLOCK_P], ACC)
        for c0 in range(0, D, BLOCK_C):
            cm = (c0 + c) < D
            c64 = (c0 + c).to(tl.int64)[:, None]
            q = tl.load(q_base[None, :] + c64 * q_sc, mask=cm[:, None] & valid[None, :], other=0).to(ACC)
            k = tl.load(k_base[None, :] + c64 * k_sc, mask=cm[:, None] & inside[None, :], other=0).to(ACC)
            qk += tl.sum(q * k, axis=0)
            kk += tl.sum(k * k, axis=0)
        s = tl.where(inside, qk / (_divisor(qq) * _divisor(kk)), poison)
        beats = (s > best) | ((s != s) & (best == best))  # the C++ `beats`: NaN wins, ties keep
        take = (best_t < 0) | beats
        best = tl.where(take, s, best)
        best_t = tl.where(take, t, best_t)
        best_pos = tl.where(take, tl.where(inside, ky * w + kx, -1), best_pos)
    out_off = b * N + p
    tl.store(score_ptr + out_off, best.to(score_ptr.dtype.element_ty), mask=valid)
    tl.store(index_ptr + out_off, best_t, mask=valid)
    tl.store(chosen_ptr + out_off, best_pos, mask=valid)


@triton.jit
def _gather_value_kernel(
    value_ptr, index_ptr, chosen_ptr, out_ptr,
    Dv, h, w,
    v_sb, v_st, v_sc, v_sy, v_sx,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, c, p] = value[b, index, c, chosen] (0 where chosen < 0); out contiguous."""
    N = h * w
    blocks = tl.cdiv(N, BLOCK_P)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < N
    t = tl.load(index_ptr + b * N + p, mask=valid, other=0)
    pos = tl.load(chosen_ptr + b * N + p, mask=valid, other=-1)
    picked = valid & (pos >= 0)
    pos = tl.where(picked, pos, 0)
    v_base = value_ptr + b * v_sb + t * v_st + (pos // w) * v_sy + (pos % w) * v_sx
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (c < Dv)[:, None]
    v = tl.load(v_base[None, :] + c.to(tl.int64)[:, None] * v_sc, mask=cm & picked[None, :], other=0)
    tl.store(out_ptr + b * Dv * N + c.to(tl.int64)[:, None] * N + p[None, :], v, mask=cm & valid[None, :])


@triton.jit
def _query_grad_kernel(
    query_ptr, key_ptr, loc_ptr, index_ptr, grad_score_ptr, grad_query_ptr, target_ptr, gain_ptr, kself_ptr,
    T, D, h, w,
    q_sb, q_sc, q_sy, q_sx,
    k_sb, k_st, k_sc, k_sy, k_sx,
    l_sb, l_st, l_sc, l_sy, l_sx,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_query (contiguous), per token the key token it adds into (B*T*N: none) and its
    coefficients."""
    N = h * w
    blocks = tl.cdiv(N, BLOCK_P)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < N
    py = (p // w).to(tl.int64)
    px = (p % w).to(tl.int64)
    t = tl.load(index_ptr + b * N + p, mask=valid, other=-1)
    has_frame = valid & (t >= 0) & (t < T)
    t = tl.where(has_frame, t, 0)
    ky, kx, inside = _token_at(loc_ptr + b * l_sb + py * l_sy + px * l_sx + t * l_st, 0, l_sc, 0, 0, h, w,
                               has_frame)
    c = tl.arange(0, BLOCK_C)
    q_base = query_ptr + b * q_sb + py * q_sy + px * q_sx
    k_base = key_ptr + b * k_sb + t * k_st + ky * k_sy + kx * k_sx
    qq = tl.zeros([BLOCK_P], ACC)
    qk = tl.zeros([BLOCK_P], ACC)
    kk = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, D, BLOCK_C):
        cm = (c0 + c) < D
        c64 = (c0 + c).to(tl.int64)[:, None]
        q = tl.load(q_base[None, :] + c64 * q_sc, mask=cm[:, None] & valid[None, :], other=0).to(ACC)
        k = tl.load(k_base[None, :] + c64 * k_sc, mask=cm[:, None] & inside[None, :], other=0).to(ACC)
        qq += tl.sum(q * q, axis=0)
        qk += tl.sum(q * k, axis=0)
        kk += tl.sum(k * k, axis=0)
    gs = tl.load(grad_score_ptr + b * N + p, mask=inside, other=0).to(ACC)
    dq = _divisor(qq)
    dk = _divisor(kk)
    s = qk / (dq * dk)
    gain = tl.where(inside, gs / (dq * dk), 0)
    q_self = tl.where(inside & (tl.sqrt(qq) >= 1e-12), -gs * s / (dq * dq), 0)
    k_self = tl.where(inside & (tl.sqrt(kk) >= 1e-12), -gs * s / (dk * dk), 0)
    for c0 in range(0, D, BLOCK_C):
        cm = (c0 + c) < D
        c64 = (c0 + c).to(tl.int64)[:, None]
        q = tl.load(q_base[None, :] + c64 * q_sc, mask=cm[:, None] & valid[None, :], other=0).to(ACC)
        k = tl.load(k_base[None, :] + c64 * k_sc, mask=cm[:, None] & inside[None, :], other=0).to(ACC)
        g = tl.where(inside[None, :], gain[None, :] * k + q_self[None, :] * q, 0)
        tl.store(grad_query_ptr + b * D * N + c64 * N + p[None, :], g.to(grad_query_ptr.dtype.element_ty),
                 mask=cm[:, None] & valid[None, :])
    total = (b * 0 + tl.num_programs(0) // blocks) * T * N  # B * T * N: no key token
    target = tl.where(inside, (b * T + t) * N + ky * w + kx, total)
    tl.store(target_ptr + b * N + p, target, mask=valid)
    tl.store(gain_ptr + b * N + p, gain, mask=valid)
    tl.store(kself_ptr + b * N + p, k_self, mask=valid)


@triton.jit
def _run_sum_kernel(
    starts_ptr, lengths_ptr, keys_ptr, tokens_ptr, gain_ptr, kself_ptr, source_ptr, self_ptr, grad_ptr,
    runs, max_length, C, T, N, w,
    s_sb, s_sc, s_sy, s_sx,
    k_sb, k_st, k_sc, k_sy, k_sx,
    HAS_SELF: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For every run r of equal sorted keys (a key token (b, t, pos)), in token order:
    grad[b, t, c, pos] = sum over its tokens (b, p) of gain[p] * source[b, c, p]
    (+ k_self[p] * self[b, t, c, pos] when HAS_SELF); grad contiguous (B, T, C, h, w)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < runs
    start = tl.load(starts_ptr + r, mask=rm, other=0)
    length = tl.load(lengths_ptr + r, mask=rm, other=0)
    key = tl.load(keys_ptr + start, mask=rm, other=0)
    bt = key // N
    pos = key % N
    b = bt // T
    t = bt % T
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (c < C)[:, None]
    c64 = c.to(tl.int64)[:, None]
    if HAS_SELF:
        own = tl.load(self_ptr + (b * k_sb + t * k_st + (pos // w) * k_sy + (pos % w) * k_sx)[None, :]
                      + c64 * k_sc, mask=cm & rm[None, :], other=0).to(ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_R], ACC)
    for j in range(max_length):
        m = rm & (j < length)
        token = tl.load(tokens_ptr + start + j, mask=m, other=0)
        p = token % N
        src = tl.load(source_ptr + (b * s_sb + (p // w) * s_sy + (p % w) * s_sx)[None, :] + c64 * s_sc,
                      mask=cm & m[None, :], other=0).to(ACC)
        g = tl.load(gain_ptr + token, mask=m, other=0).to(ACC)
        term = g[None, :] * src
        if HAS_SELF:
            ks = tl.load(kself_ptr + token, mask=m, other=0).to(ACC)
            term += ks[None, :] * own
        acc += tl.where(m[None, :], term, 0)
    tl.store(grad_ptr + bt[None, :] * C * N + c64 * N + pos[None, :], acc.to(grad_ptr.dtype.element_ty),
             mask=cm & rm[None, :])


# ---------------------------------------------------------------------------------------
# Launch configurations.

BLOCK_P = 64  # tokens per program (4 warps: a [BLOCK_C, BLOCK_P] tile is 8 values per lane at BLOCK_C 16)
BLOCK_R = 32  # runs per program of the gradient sums
NUM_WARPS = 4
KERNELS = {
    "forward": _forward_kernel,
    "gather_value": _gather_value_kernel,
    "query_grad": _query_grad_kernel,
    "run_sum": _run_sum_kernel,
}
MIN_CHANNEL_BLOCK, MAX_CHANNEL_BLOCK = 16, 16
SCALAR_TYPES = {"HAS_SELF": "constexpr"}


def launch_config(kernel: str, channels: int, has_self: bool = False) -> _launch.LaunchConfig:
    block_c = min(max(triton.next_power_of_2(max(channels, 1)), MIN_CHANNEL_BLOCK), MAX_CHANNEL_BLOCK)
    constexprs = {"BLOCK_C": block_c}
    if kernel == "run_sum":
        constexprs.update(BLOCK_R=BLOCK_R, HAS_SELF=has_self)
    else:
        constexprs["BLOCK_P"] = BLOCK_P
    return _launch.LaunchConfig(kernel, tuple(sorted(constexprs.items())), NUM_WARPS)


def all_launch_configs() -> list:
    configs = set()
    for channels in (1, 16, 17):
        for kernel in KERNELS:
            configs.add(launch_config(kernel, channels))
        configs.add(launch_config("run_sum", channels, True))
    return sorted(configs)


launch = _launch.launcher(KERNELS)


def _pointer_types(kernel: str, dtype: torch.dtype) -> list:
    data, acc = str(_launch.TL_DTYPES[dtype]), str(_launch.TL_DTYPES[_launch.accumulation_dtype(dtype)])
    if kernel == "forward":
        return [dict(query_ptr=data, key_ptr=data, loc_ptr=loc, score_ptr=data, index_ptr="i64",
                     chosen_ptr="i64") for loc in ("fp32", "fp64")]
    if kernel == "gather_value":
        return [dict(value_ptr=data, index_ptr="i64", chosen_ptr="i64", out_ptr=data)]
    if kernel == "query_grad":
        return [dict(query_ptr=data, key_ptr=data, loc_ptr=loc, index_ptr="i64", grad_score_ptr=data,
                     grad_query_ptr=acc, target_ptr="i64", gain_ptr=acc, kself_ptr=acc)
                for loc in ("fp32", "fp64")]
    return [dict(starts_ptr="i64", lengths_ptr="i64", keys_ptr="i64", tokens_ptr="i64", gain_ptr=acc,
                 kself_ptr=acc, source_ptr=data, self_ptr=data, grad_ptr=acc)]


def compile_all(archs=(80, 90), dtype_names=_launch.FLOAT_DTYPE_NAMES) -> list:
    """Compiles every launch the ops can make for the CUDA compute capabilities `archs`."""
    return _launch.compile_all(KERNELS, all_launch_configs(), _pointer_types, {}, archs, dtype_names)


def _grid(B: int, N: int) -> int:
    return B * triton.cdiv(N, BLOCK_P)


def _strides4(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


# ---------------------------------------------------------------------------------------
# The ops. They check every size the kernels index by (a direct torch.ops call bypasses the
# public function's checks): a mismatch is a ValueError naming the size, never a wild read.

_OP = "vsr_kernels.trajectory_attention_triton"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_size(name, t, dim, letter, ref_name, ref, ref_dim):
    if t.shape[dim] != ref.shape[ref_dim]:
        raise ValueError(f"{_OP}: {name} must have {letter} = {ref.shape[ref_dim]} like {ref_name}, "
                         f"got shape {tuple(t.shape)}")


def _check_rank(name, t, rank):
    if t.dim() != rank:
        raise ValueError(f"{_OP}: {name} must be {rank}-D, got shape {tuple(t.shape)}")


def _check_same(name, t, query):
    if t.dtype != query.dtype or t.device != query.device:
        raise ValueError(f"{_OP}: {name} must have query's dtype {query.dtype} and device {query.device}, "
                         f"got {t.dtype} on {t.device}")


def _check(query, key, values, location):
    _check_rank("query", query, 4)
    _check_rank("key", key, 5)
    _check_rank("location", location, 5)
    if query.dtype not in _FLOATS:
        raise ValueError(f"{_OP}: query must have a floating dtype, got {query.dtype}")
    for dim, letter in ((0, "B"), (2, "D"), (3, "h"), (4, "w")):
        _check_size("key", key, dim, letter, "query", query, dim - (dim > 0))
    if key.shape[1] < 1:
        raise ValueError(f"{_OP}: key must hold T >= 1 frames, got shape {tuple(key.shape)}")
    for dim, letter in ((0, "B"), (1, "T"), (3, "h"), (4, "w")):
        _check_size("location", location, dim, letter, "key", key, dim)
    if location.shape[2] != 2:
        raise ValueError(f"{_OP}: location must have 2 channels in dim 2, got shape {tuple(location.shape)}")
    if location.dtype not in _FLOATS or location.device != query.device:
        raise ValueError(f"{_OP}: location must be floating point on {query.device}, got {location.dtype} on "
                         f"{location.device}")
    if not values:
        raise ValueError(f"{_OP}: values must hold at least one tensor")
    _check_same("key", key, query)
    for i, v in enumerate(values):
        _check_rank(f"values[{i}]", v, 5)
        for dim, letter in ((0, "B"), (1, "T"), (3, "h"), (4, "w")):
            _check_size(f"values[{i}]", v, dim, letter, "key", key, dim)
        _check_same(f"values[{i}]", v, query)


def _check_backward(grad_outs, grad_score, query, key, values, location, index):
    _check(query, key, values, location)
    if len(grad_outs) != len(values):
        raise ValueError(f"{_OP}_backward: grad_outs must hold one tensor per value ({len(values)}), "
                         f"got {len(grad_outs)}")
    B, _, _, h, w = key.shape
    for i, (g, v) in enumerate(zip(grad_outs, values)):
        if tuple(g.shape) != (B, v.shape[2], h, w):
            raise ValueError(f"{_OP}_backward: grad_outs[{i}] must have shape (B, Dv, h, w) = "
                             f"{(B, v.shape[2], h, w)}, got {tuple(g.shape)}")
        _check_same(f"grad_outs[{i}]", g, query)
    for name, t in (("grad_score", grad_score), ("index", index)):
        if tuple(t.shape) != (B, h, w):
            raise ValueError(f"{_OP}_backward: {name} must have shape (B, h, w) = {(B, h, w)}, "
                             f"got {tuple(t.shape)}")
    _check_same("grad_score", grad_score, query)
    if index.dtype != torch.int64 or index.device != query.device:
        raise ValueError(f"{_OP}_backward: index must be int64 on {query.device}, got {index.dtype} on "
                         f"{index.device}")


@torch.library.custom_op("vsr_kernels::trajectory_attention_triton", mutates_args=())
def trajectory_attention(query: torch.Tensor, key: torch.Tensor, values: list[torch.Tensor],
                         location: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    _check(query, key, values, location)
    B, T, D, h, w = key.shape
    N = h * w
    outs = [v.new_empty((B, v.shape[2], h, w)) for v in values]
    score = query.new_empty((B, h, w))
    index = query.new_empty((B, h, w), dtype=torch.int64)
    if B * N == 0:
        return outs, score, index
    chosen = torch.empty((B, h, w), dtype=torch.int64, device=query.device)
    with _launch.device_guard(query):
        launch(launch_config("forward", D), (_grid(B, N),), query, key, location, score, index, chosen,
               T, D, h, w, *_strides4(query), *key.stride(), *location.stride(), dtype=query.dtype)
        for v, out in zip(values, outs):
            config = launch_config("gather_value", v.shape[2])
            launch(config, (_grid(B, N), triton.cdiv(v.shape[2], config.block_c)), v, index, chosen, out,
                   v.shape[2], h, w, *v.stride(), dtype=query.dtype)
    return outs, score, index


@torch.library.custom_op("vsr_kernels::trajectory_attention_triton_backward", mutates_args=())
def trajectory_attention_backward(grad_outs: list[torch.Tensor], grad_score: torch.Tensor,
                                  query: torch.Tensor, key: torch.Tensor, values: list[torch.Tensor],
                                  location: torch.Tensor, index: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    _check_backward(grad_outs, grad_score, query, key, values, location, index)
    B, T, D, h, w = key.shape
    N = h * w
    acc = _launch.accumulation_dtype(query.dtype)
    grad_query = torch.empty(query.shape, dtype=acc, device=query.device)
    grad_key = torch.zeros(key.shape, dtype=acc, device=query.device)
    grad_values = [torch.zeros(v.shape, dtype=acc, device=query.device) for v in values]

    def finish():
        return (grad_query.to(query.dtype), grad_key.to(query.dtype),
                [g.to(query.dtype) for g in grad_values])

    if B * N == 0:
        grad_query.zero_()
        return finish()
    index = index.contiguous()
    grad_score = grad_score.contiguous()
    target = torch.empty((B, N), dtype=torch.int64, device=query.device)
    coef = torch.empty((2, B, N), dtype=acc, device=query.device)
    with _launch.device_guard(query):
        launch(launch_config("query_grad", D), (_grid(B, N),), query, key, location, index, grad_score,
               grad_query, target, coef[0], coef[1], T, D, h, w, *_strides4(query), *key.stride(),
               *location.stride(), dtype=query.dtype)
        # Runs of tokens adding into one key token, in increasing token order (a stable sort).
        keys, tokens = torch.sort(target.flatten(), stable=True)
        inside = int((keys < B * T * N).sum())
        if inside == 0:
            return finish()
        keys, tokens = keys[:inside], tokens[:inside]
        heads = torch.cat([keys.new_ones(1, dtype=torch.bool), keys[1:] != keys[:-1]])
        starts = torch.nonzero(heads).flatten()
        lengths = torch.diff(starts, append=starts.new_tensor([inside]))
        runs, max_length = starts.numel(), int(lengths.max())
        ones = torch.ones((B * N,), dtype=acc, device=query.device)
        jobs = [(grad_key, D, coef[0], query, key, True)]
        jobs += [(g, v.shape[2], ones, go, key, False) for g, v, go in zip(grad_values, values, grad_outs)]
        for grad, channels, gain, source, own, has_self in jobs:
            config = launch_config("run_sum", channels, has_self)
            launch(config, (triton.cdiv(runs, BLOCK_R), triton.cdiv(channels, config.block_c)),
                   starts, lengths, keys, tokens, gain, coef[1], source, own, grad, runs, max_length,
                   channels, T, N, w, *_strides4(source), *own.stride(), dtype=query.dtype)
    return finish()
