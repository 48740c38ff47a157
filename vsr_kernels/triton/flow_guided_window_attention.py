"""Flow-guided window attention (IART) in Triton: online-softmax forward and a deterministic,
atomic-free backward.

Registered with `torch.library.custom_op` (an opaque boundary, see DESIGN.md) as
`vsr_kernels::flow_guided_window_attention_triton` and `..._triton_backward`, with the schemas
and semantics of the C++ ops (csrc/kernels/flow_guided_window_attention.h is the per-pixel
specification this file follows). Their fake tensors and autograd are registered by
vsr_kernels.ops when it first imports this module; this module imports nothing from it.

Layout. Feature maps are channels-first and read through their strides (non-contiguous
inputs work, never copied; only the flow is made a contiguous float32/float64 coordinate
tensor and missing biases become (w * w, C) zeros). A program owns BLOCK_P consecutive pixels
of one batch element (flattened y * W + x), one head, and a chunk of BLOCK_D of its channels:
[BLOCK_P, BLOCK_D] tiles, pixels across lanes, so every channel load of the queries is
coalesced along W; the window cells are gathers (flow is arbitrary). Offsets are int64.

Forward: per cell n (in order), the logit over the whole head (looping over its channel
chunks), an online-softmax update, and the program's channel chunk of sum_n P_n (v_n + vb_n)
accumulated in registers; lse (B, heads, H, W) in the accumulation dtype.

Backward (the math of csrc/kernels/flow_guided_window_attention.h):
  1. `_pixel_grad_kernel`, per pixel, head and channel chunk: delta = sum_n P_n dP_n over the
     cells, then per cell dS_n, dq for the chunk; the chunk-0 program writes P_n and dS_n to
     (B, HW, heads, cells) buffers and the cell's key position to a (B, HW, cells) target list
     (b * (HW + 1) + position; HW, sorted last, for pixels with non-finite flow);
  2. host: a stable sort of the target list and a bincount (deterministic);
  3. `_key_value_grad_kernel`, per key position and channel block: grad_key += dS q and
     grad_value += P g over its sorted entries, in order;
  4. `_bias_grad_kernel`, per cell and channel block: a fixed-order reduction over all pixels
     (only when a bias is given).
Accumulation is float32 (float64 for float64 inputs).
"""
import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _bases(flow_ptr, b, p, H, W, mask, WINDOW: tl.constexpr):
    """(by, bx, finite) of pixels p of batch element b: floored coordinates y + dy, x + dx in the
    flow's dtype, clamped to [-(w + 1), size + w] first."""
    HW = H * W
    fb = flow_ptr + b * 2 * HW
    dx = tl.load(fb + p, mask=mask, other=0)
    dy = tl.load(fb + HW + p, mask=mask, other=0)
    finite = (dx - dx == 0) & (dy - dy == 0)
    y = (p // W).to(dy.dtype)
    x = (p % W).to(dx.dtype)
    cy = tl.minimum(tl.maximum(y + dy, -(WINDOW + 1.0)), (H + WINDOW).to(dy.dtype))
    cx = tl.minimum(tl.maximum(x + dx, -(WINDOW + 1.0)), (W + WINDOW).to(dx.dtype))
    cy = tl.where(finite, cy, 0)
    cx = tl.where(finite, cx, 0)
    return tl.floor(cy).to(tl.int64), tl.floor(cx).to(tl.int64), finite & mask


@triton.jit
def _cell(by, bx, n, H, W, WINDOW: tl.constexpr):
    """(row, column) of cell n of the windows based at (by, bx), replicate-clamped."""
    lo = -((WINDOW - 1) // 2)
    cy = tl.minimum(tl.maximum(by + lo + n // WINDOW, 0), H - 1)
    cx = tl.minimum(tl.maximum(bx + lo + n % WINDOW, 0), W - 1)
    return cy, cx


@triton.jit
def _biased_dot(a_ptr, a_off, b_ptr, b_off, bias_ptr, hc, D, sc_a, sc_b, valid,
                ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """<a[hc .. hc + D), p>, b[hc .. hc + D), cell> + bias[hc ..]> per pixel: [BLOCK_P]."""
    d = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_P], ACC)
    for d0 in range(0, D, BLOCK_D):
        c = hc + d0 + d
        cm = (d0 + d) < D
        m = valid[:, None] & cm[None, :]
        a = tl.load(a_ptr + a_off[:, None] + c.to(tl.int64)[None, :] * sc_a, mask=m, other=0).to(ACC)
        bb = tl.load(b_ptr + b_off[:, None] + c.to(tl.int64)[None, :] * sc_b, mask=m, other=0).to(ACC)
        bias = tl.load(bias_ptr + c, mask=cm, other=0).to(ACC)
        total += tl.sum(a * (bb + bias[None, :]), axis=1)
    return total


@triton.jit
def _forward_kernel(
    query_ptr, key_ptr, value_ptr, flow_ptr, key_bias_ptr, value_bias_ptr, out_ptr, lse_ptr,
    C, H, W, heads, D, scale: tl.float64,
    q_sb, q_sc, q_sy, q_sx, k_sb, k_sc, k_sy, k_sx, v_sb, v_sc, v_sy, v_sx,
    ACC: tl.constexpr, WINDOW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    HW = H * W
    blocks = tl.cdiv(HW, BLOCK_P)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = p < HW
    h = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    hc = h * D
    by, bx, valid = _bases(flow_ptr, b, p, H, W, mask, WINDOW)
    q_off = b * q_sb + (p // W).to(tl.int64) * q_sy + (p % W).to(tl.int64) * q_sx
    d = tl.arange(0, BLOCK_D)
    c = hc + d0 + d
    cm = (d0 + d) < D
    m = -float("inf") + tl.zeros([BLOCK_P], ACC)
    s_sum = tl.zeros([BLOCK_P], ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    for n in range(WINDOW * WINDOW):
        cy, cx = _cell(by, bx, n, H, W, WINDOW)
        k_off = b * k_sb + cy * k_sy + cx * k_sx
        s = scale * _biased_dot(query_ptr, q_off, key_ptr, k_off, key_bias_ptr + n * C, hc, D, q_sc, k_sc, valid,
                                ACC, BLOCK_P, BLOCK_D)
        s = s.to(ACC)
        m_new = tl.where(s > m, s, m)
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new)).to(ACC)
        weight = tl.where(s == -float("inf"), 0.0, tl.exp(s - m_new)).to(ACC)
        s_sum = s_sum * alpha + weight
        m = m_new
        v_off = b * v_sb + cy * v_sy + cx * v_sx
        vm = valid[:, None] & cm[None, :]
        v = tl.load(value_ptr + v_off[:, None] + c.to(tl.int64)[None, :] * v_sc, mask=vm, other=0).to(ACC)
        vb = tl.load(value_bias_ptr + n * C + c, mask=cm, other=0).to(ACC)
        acc = acc * alpha[:, None] + weight[:, None] * (v + vb[None, :])
    out = acc / s_sum[:, None]
    out = tl.where(valid[:, None], out, float("nan"))
    out_off = b * C * HW + c.to(tl.int64)[None, :] * HW + p[:, None]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=mask[:, None] & cm[None, :])
    lse = tl.where(valid, m + tl.log(s_sum), float("nan"))
    tl.store(lse_ptr + (b * heads + h) * HW + p, lse.to(lse_ptr.dtype.element_ty), mask=mask & ((p * 0 + d0) == 0))


@triton.jit
def _pixel_grad_kernel(
    grad_out_ptr, query_ptr, key_ptr, value_ptr, flow_ptr, key_bias_ptr, value_bias_ptr, lse_ptr,
    grad_query_ptr, prob_ptr, dscore_ptr, target_ptr,
    C, H, W, heads, D, scale: tl.float64,
    g_sb, g_sc, g_sy, g_sx, q_sb, q_sc, q_sy, q_sx, k_sb, k_sc, k_sy, k_sx, v_sb, v_sc, v_sy, v_sx,
    ACC: tl.constexpr, WINDOW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    HW = H * W
    cells = WINDOW * WINDOW
    blocks = tl.cdiv(HW, BLOCK_P)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = p < HW
    h = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    hc = h * D
    by, bx, valid = _bases(flow_ptr, b, p, H, W, mask, WINDOW)
    py = (p // W).to(tl.int64)
    px = (p % W).to(tl.int64)
    q_off = b * q_sb + py * q_sy + px * q_sx
    g_off = b * g_sb + py * g_sy + px * g_sx
    lse = tl.load(lse_ptr + (b * heads + h) * HW + p, mask=valid, other=0).to(ACC)
    delta = tl.zeros([BLOCK_P], ACC)
    for n in range(cells):
        cy, cx = _cell(by, bx, n, H, W, WINDOW)
        s = scale * _biased_dot(query_ptr, q_off, key_ptr, b * k_sb + cy * k_sy + cx * k_sx, key_bias_ptr + n * C,
                                hc, D, q_sc, k_sc, valid, ACC, BLOCK_P, BLOCK_D)
        P = tl.exp(s.to(ACC) - lse)
        dP = _biased_dot(grad_out_ptr, g_off, value_ptr, b * v_sb + cy * v_sy + cx * v_sx, value_bias_ptr + n * C,
                         hc, D, g_sc, v_sc, valid, ACC, BLOCK_P, BLOCK_D)
        delta += tl.where(valid, P * dP, 0)
    d = tl.arange(0, BLOCK_D)
    c = hc + d0 + d
    cm = (d0 + d) < D
    tile = valid[:, None] & cm[None, :]
    dq = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    first = (p * 0 + d0) == 0
    slot = ((b * HW + p) * heads + h) * cells
    for n in range(cells):
        cy, cx = _cell(by, bx, n, H, W, WINDOW)
        k_off = b * k_sb + cy * k_sy + cx * k_sx
        s = scale * _biased_dot(query_ptr, q_off, key_ptr, k_off, key_bias_ptr + n * C, hc, D, q_sc, k_sc, valid,
                                ACC, BLOCK_P, BLOCK_D)
        P = tl.exp(s.to(ACC) - lse)
        dP = _biased_dot(grad_out_ptr, g_off, value_ptr, b * v_sb + cy * v_sy + cx * v_sx, value_bias_ptr + n * C,
                         hc, D, g_sc, v_sc, valid, ACC, BLOCK_P, BLOCK_D)
        ds = tl.where(valid, scale * P * (dP - delta), 0).to(ACC)
        P = tl.where(valid, P, 0)
        k = tl.load(key_ptr + k_off[:, None] + c.to(tl.int64)[None, :] * k_sc, mask=tile, other=0).to(ACC)
        kb = tl.load(key_bias_ptr + n * C + c, mask=cm, other=0).to(ACC)
        dq += tl.where(tile, ds[:, None] * (k + kb[None, :]), 0)
        tl.store(prob_ptr + slot + n, P.to(prob_ptr.dtype.element_ty), mask=mask & first)
        tl.store(dscore_ptr + slot + n, ds, mask=mask & first)
        target = tl.where(valid, cy * W + cx, HW) + b * (HW + 1)
        tl.store(target_ptr + (b * HW + p) * cells + n, target, mask=mask & first & ((p * 0 + h) == 0))
    gq_off = b * C * HW + c.to(tl.int64)[None, :] * HW + p[:, None]
    tl.store(grad_query_ptr + gq_off, dq.to(grad_query_ptr.dtype.element_ty), mask=mask[:, None] & cm[None, :])


@triton.jit
def _key_value_grad_kernel(
    grad_out_ptr, query_ptr, prob_ptr, dscore_ptr, entries_ptr, offsets_ptr, grad_key_ptr, grad_value_ptr,
    C, H, W, heads, D,
    g_sb, g_sc, g_sy, g_sx, q_sb, q_sc, q_sy, q_sx,
    ACC: tl.constexpr, WINDOW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_key / grad_value of key position t of batch element b, channel block: the sum over
    its entries e = (b * HW + p) * cells + n in sorted (increasing) order."""
    HW = H * W
    cells = WINDOW * WINDOW
    i = tl.program_id(0).to(tl.int64)
    b = i // HW
    t = i % HW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    head = (c // D).to(tl.int64)
    segment = b * (HW + 1) + t
    begin = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    gk = tl.zeros([BLOCK_C], ACC)
    gv = tl.zeros([BLOCK_C], ACC)
    for j in range(begin, end):
        e = tl.load(entries_ptr + j)
        pixel = e // cells  # b * HW + p
        n = e % cells
        p = pixel % HW
        slot = (pixel * heads + head) * cells + n
        ds = tl.load(dscore_ptr + slot, mask=cm, other=0)
        P = tl.load(prob_ptr + slot, mask=cm, other=0)
        py = p // W
        px = p % W
        q = tl.load(query_ptr + b * q_sb + py * q_sy + px * q_sx + c.to(tl.int64) * q_sc, mask=cm, other=0)
        g = tl.load(grad_out_ptr + b * g_sb + py * g_sy + px * g_sx + c.to(tl.int64) * g_sc, mask=cm, other=0)
        gk += ds * q.to(ACC)
        gv += P * g.to(ACC)
    out_off = b * C * HW + c.to(tl.int64) * HW + t
    tl.store(grad_key_ptr + out_off, gk.to(grad_key_ptr.dtype.element_ty), mask=cm)
    tl.store(grad_value_ptr + out_off, gv.to(grad_value_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _bias_grad_kernel(
    grad_out_ptr, query_ptr, prob_ptr, dscore_ptr, grad_key_bias_ptr, grad_value_bias_ptr,
    B, C, H, W, heads, D,
    g_sb, g_sc, g_sy, g_sx, q_sb, q_sc, q_sy, q_sx,
    ACC: tl.constexpr, WINDOW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_key_bias[n, c] = sum over all pixels of dS_n q, grad_value_bias[n, c] of P_n g: a
    fixed-order reduction (BLOCK_P partial sums per channel, then a tree of fixed shape)."""
    HW = H * W
    cells = WINDOW * WINDOW
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    head = (c // D).to(tl.int64)
    gk = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    gv = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    total = B.to(tl.int64) * HW
    for i0 in range(0, total, BLOCK_P):
        i = i0 + tl.arange(0, BLOCK_P).to(tl.int64)
        im = i < total
        b = i // HW
        p = i % HW
        m = im[:, None] & cm[None, :]
        slot = (i[:, None] * heads + head[None, :]) * cells + n
        ds = tl.load(dscore_ptr + slot, mask=m, other=0)
        P = tl.load(prob_ptr + slot, mask=m, other=0)
        live = (ds != 0) | (P != 0)  # pixels with non-finite flow pass nothing
        py = p // W
        px = p % W
        q = tl.load(query_ptr + (b * q_sb + py * q_sy + px * q_sx)[:, None] + c.to(tl.int64)[None, :] * q_sc,
                    mask=m, other=0).to(ACC)
        g = tl.load(grad_out_ptr + (b * g_sb + py * g_sy + px * g_sx)[:, None] + c.to(tl.int64)[None, :] * g_sc,
                    mask=m, other=0).to(ACC)
        gk += tl.where(live, ds * q, 0)
        gv += tl.where(live, P * g, 0)
    tl.store(grad_key_bias_ptr + n * C + c, tl.sum(gk, axis=0).to(grad_key_bias_ptr.dtype.element_ty), mask=cm)
    tl.store(grad_value_bias_ptr + n * C + c, tl.sum(gv, axis=0).to(grad_value_bias_ptr.dtype.element_ty), mask=cm)


# ---------------------------------------------------------------------------------------
# Dispatch.

NUM_WARPS = 4
KERNELS = {
    "forward": _forward_kernel,
    "pixel_grad": _pixel_grad_kernel,
    "key_value_grad": _key_value_grad_kernel,
    "bias_grad": _bias_grad_kernel,
}
# Channel tiles: per-pixel kernels hold [BLOCK_P, 16] tiles (the logits loop over the head's
# 16-channel chunks, the accumulators split the head over the grid); larger tiles spill
# (Triton 3.9, sm_80/sm_90: float64 at 16 x 128, every dtype at 32 x 64 and 64 x 32 in the
# forward; the backward's per-pixel kernel holds twice as many tiles).
HEAD_BLOCK = 16
PIXEL_BLOCKS = {"forward": 64, "pixel_grad": 32}
GATHER_BLOCK_C = (16, 32, 64, 128)
BIAS_BLOCK = {"BLOCK_P": 32, "BLOCK_C": 32}
# Window sizes compiled by compile_all (WINDOW is a constexpr; others compile on first use).
COMPILED_WINDOWS = (1, 2, 3)
SCALAR_TYPES = {"scale": "fp64"}
MAX_WINDOW_SIZE = 1024  # as the C++ kernels (kMaxWindowSize)


def launch_config(kernel: str, window: int, channels: int) -> _launch.LaunchConfig:
    """What `kernel` is launched with: channels = head_dim for the per-pixel kernels, C for the
    gathers."""
    if kernel in ("forward", "pixel_grad"):
        constexprs = {"WINDOW": window, "BLOCK_D": HEAD_BLOCK, "BLOCK_P": PIXEL_BLOCKS[kernel]}
    elif kernel == "key_value_grad":
        block_c = min(max(triton.next_power_of_2(max(channels, 1)), GATHER_BLOCK_C[0]), GATHER_BLOCK_C[-1])
        constexprs = {"WINDOW": window, "BLOCK_C": block_c}
    else:
        constexprs = {"WINDOW": window, **BIAS_BLOCK}
    return _launch.LaunchConfig(kernel, tuple(sorted(constexprs.items())), NUM_WARPS)


def all_launch_configs() -> list:
    configs = set()
    for window in COMPILED_WINDOWS:
        for channels in GATHER_BLOCK_C:
            for kernel in KERNELS:
                configs.add(launch_config(kernel, window, channels))
    return sorted(configs)


launch = _launch.launcher(KERNELS)


def _pointer_types(kernel: str, dtype: torch.dtype) -> list:
    data, acc = str(_launch.TL_DTYPES[dtype]), str(_launch.TL_DTYPES[_launch.accumulation_dtype(dtype)])
    flows = ["fp32", "fp64"] if dtype == torch.float64 else ["fp32"]
    if kernel == "forward":
        return [dict(query_ptr=data, key_ptr=data, value_ptr=data, flow_ptr=f, key_bias_ptr=data,
                     value_bias_ptr=data, out_ptr=data, lse_ptr=acc) for f in flows]
    if kernel == "pixel_grad":
        return [dict(grad_out_ptr=data, query_ptr=data, key_ptr=data, value_ptr=data, flow_ptr=f,
                     key_bias_ptr=data, value_bias_ptr=data, lse_ptr=acc, grad_query_ptr=data, prob_ptr=acc,
                     dscore_ptr=acc, target_ptr="i64") for f in flows]
    if kernel == "key_value_grad":
        return [dict(grad_out_ptr=data, query_ptr=data, prob_ptr=acc, dscore_ptr=acc, entries_ptr="i64",
                     offsets_ptr="i64", grad_key_ptr=data, grad_value_ptr=data)]
    return [dict(grad_out_ptr=data, query_ptr=data, prob_ptr=acc, dscore_ptr=acc, grad_key_bias_ptr=data,
                 grad_value_bias_ptr=data)]


def compile_all(archs=(80, 90), dtype_names=_launch.FLOAT_DTYPE_NAMES) -> list:
    """Compiles every launch of the compiled window sizes for CUDA compute capabilities `archs`
    (see _launch.compile_all). Needs a process without TRITON_INTERPRET=1."""
    return _launch.compile_all(KERNELS, all_launch_configs(), _pointer_types, SCALAR_TYPES, archs, dtype_names)


def _strides(t: torch.Tensor) -> tuple:
    """(batch, channel, y, x) strides of a (B, C, H, W) tensor."""
    return tuple(t.stride())


def _coordinates(flow: torch.Tensor) -> torch.Tensor:
    return flow.to(torch.float64 if flow.dtype == torch.float64 else torch.float32).contiguous()


def _check(op, query, key, value, flow, window_size, num_heads, key_bias, value_bias, grad_out=None, lse=None):
    """What the C++ entry points check (csrc/glue/flow_guided_window_attention.h): the kernels
    index every tensor by query's sizes, so any disagreement is refused before a launch."""
    def fail(message):
        raise ValueError(f"vsr_kernels.{op}: {message}")

    if query.dim() != 4:
        fail(f"query must be 4-D (B, C, H, W), got shape {tuple(query.shape)}")
    B, C, H, W = query.shape
    for name, t in (("key", key), ("value", value), ("grad_out", grad_out)):
        if t is not None and t.shape != query.shape:
            fail(f"{name} must have the shape of query {tuple(query.shape)}, got {tuple(t.shape)}")
    if flow.shape != (B, 2, H, W):
        fail(f"flow must have shape (B, 2, H, W) = {(B, 2, H, W)}, got {tuple(flow.shape)}")
    if not flow.is_floating_point():
        fail(f"flow must have a floating dtype, got {flow.dtype}")
    if not 1 <= window_size <= MAX_WINDOW_SIZE:
        fail(f"window_size must be in [1, {MAX_WINDOW_SIZE}], got {window_size}")
    if num_heads < 1 or C < 1 or C % num_heads:
        fail(f"the channels C = {C} of query must be a positive multiple of num_heads = {num_heads}")
    tensors = {"query": query, "key": key, "value": value, "grad_out": grad_out, "key_bias": key_bias,
               "value_bias": value_bias}
    for name, t in tensors.items():
        if t is not None and (t.dtype != query.dtype or t.device != query.device):
            fail(f"{name} must have dtype {query.dtype} on {query.device} like query, got {t.dtype} on {t.device}")
    if flow.device != query.device:
        fail(f"flow must be on {query.device} like query, got {flow.device}")
    for name, bias in (("key_bias", key_bias), ("value_bias", value_bias)):
        if bias is not None and bias.shape != (window_size * window_size, C):
            fail(f"{name} must have shape (window_size**2, C) = {(window_size * window_size, C)}, "
                 f"got {tuple(bias.shape)}")
    if lse is not None and (lse.shape != (B, num_heads, H, W) or lse.dtype != _launch.accumulation_dtype(query.dtype)):
        fail(f"lse must be a {_launch.accumulation_dtype(query.dtype)} tensor of shape (B, num_heads, H, W) = "
             f"{(B, num_heads, H, W)}, got {lse.dtype} {tuple(lse.shape)}")


def _bias(bias, query, cells):
    return query.new_zeros((cells, query.shape[1])) if bias is None else bias.contiguous()


# ---------------------------------------------------------------------------------------
# The ops.

@torch.library.custom_op("vsr_kernels::flow_guided_window_attention_triton", mutates_args=())
def flow_guided_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, flow: torch.Tensor,
                                 window_size: int, num_heads: int, key_bias: torch.Tensor | None,
                                 value_bias: torch.Tensor | None, scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    _check("flow_guided_window_attention_triton", query, key, value, flow, window_size, num_heads, key_bias,
           value_bias)
    B, C, H, W = query.shape
    D = C // num_heads
    cells = window_size * window_size
    out = query.new_empty((B, C, H, W))
    lse = query.new_empty((B, num_heads, H, W), dtype=_launch.accumulation_dtype(query.dtype))
    if out.numel() == 0:
        return out, lse
    config = launch_config("forward", window_size, D)
    block_p, block_d = dict(config.constexprs)["BLOCK_P"], dict(config.constexprs)["BLOCK_D"]
    with _launch.device_guard(query):
        launch(config, (B * triton.cdiv(H * W, block_p), num_heads, triton.cdiv(D, block_d)),
               query, key, value, _coordinates(flow), _bias(key_bias, query, cells), _bias(value_bias, query, cells),
               out, lse, C, H, W, num_heads, D, scale, *_strides(query), *_strides(key), *_strides(value),
               dtype=query.dtype)
    return out, lse


@torch.library.custom_op("vsr_kernels::flow_guided_window_attention_triton_backward", mutates_args=())
def flow_guided_window_attention_backward(
        grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, flow: torch.Tensor,
        lse: torch.Tensor, window_size: int, num_heads: int, key_bias: torch.Tensor | None,
        value_bias: torch.Tensor | None, scale: float
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("flow_guided_window_attention_triton_backward", query, key, value, flow, window_size, num_heads,
           key_bias, value_bias, grad_out, lse)
    B, C, H, W = query.shape
    D = C // num_heads
    HW = H * W
    cells = window_size * window_size
    acc = _launch.accumulation_dtype(query.dtype)
    grad_query, grad_key, grad_value = (query.new_empty((B, C, H, W)) for _ in range(3))
    grad_key_bias, grad_value_bias = query.new_zeros((cells, C)), query.new_zeros((cells, C))
    if query.numel() == 0:
        return grad_query.zero_(), grad_key.zero_(), grad_value.zero_(), grad_key_bias, grad_value_bias
    prob = torch.empty((B, HW, num_heads, cells), dtype=acc, device=query.device)
    dscore = torch.empty_like(prob)
    target = torch.empty((B * HW * cells,), dtype=torch.int64, device=query.device)
    kb, vb = _bias(key_bias, query, cells), _bias(value_bias, query, cells)
    lse = lse.contiguous()
    with _launch.device_guard(query):
        config = launch_config("pixel_grad", window_size, D)
        block_p, block_d = dict(config.constexprs)["BLOCK_P"], dict(config.constexprs)["BLOCK_D"]
        launch(config, (B * triton.cdiv(HW, block_p), num_heads, triton.cdiv(D, block_d)),
               grad_out, query, key, value, _coordinates(flow), kb, vb, lse, grad_query, prob, dscore, target,
               C, H, W, num_heads, D, scale, *_strides(grad_out), *_strides(query), *_strides(key), *_strides(value),
               dtype=query.dtype)
        # Entries sorted by key position, stably: each position's entries in increasing
        # (pixel, cell) order, whatever the device does in parallel.
        # Segment bounds by binary search (bincount has no deterministic CUDA implementation).
        keys, entries = torch.sort(target, stable=True)
        offsets = torch.searchsorted(keys, torch.arange(B * (HW + 1) + 1, dtype=torch.int64, device=query.device))
        config = launch_config("key_value_grad", window_size, C)
        launch(config, (B * HW, triton.cdiv(C, config.block_c)),
               grad_out, query, prob, dscore, entries, offsets, grad_key, grad_value, C, H, W, num_heads, D,
               *_strides(grad_out), *_strides(query), dtype=query.dtype)
        if key_bias is not None or value_bias is not None:
            config = launch_config("bias_grad", window_size, C)
            launch(config, (cells, triton.cdiv(C, config.block_c)),
                   grad_out, query, prob, dscore, grad_key_bias, grad_value_bias, B, C, H, W, num_heads, D,
                   *_strides(grad_out), *_strides(query), dtype=query.dtype)
    return grad_query, grad_key, grad_value, grad_key_bias, grad_value_bias
