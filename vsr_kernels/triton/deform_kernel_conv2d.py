"""Triton kernels of deform_kernel_conv2d (depthwise deformable-kernel convolution, DKSAN's DKC).

Registered with `torch.library.custom_op` as "vsr_kernels::deform_kernel_conv2d_triton" and
"vsr_kernels::deform_kernel_conv2d_triton_backward" (the schemas of the C++ ops); fake tensors
and autograd come from vsr_kernels.ops.deform_kernel_conv2d's OpSpec.

The op is depthwise and memory-bound. Channels are processed in blocks that lie inside one
"segment" of L = gcd(C/G, C/Gk) channels: every channel of a block has the same offset group g
and kernel group gk, so the kernel offsets, input offsets and mask of a pixel tile are loaded
(and their sample coordinates and bilinear weights computed) once per block, for BLOCK_C
channels at a time. Tiles are [BLOCK_C channels, BLOCK_P output pixels], pixels across the
lanes (contiguous in every tensor). Both samplings use the shared helpers of _launch
(`bilinear_sample`, `bilinear_sample_grad`: torchvision's rule), accumulating in float32
(float64 for float64).

- `_forward_kernel`, one program per (output-pixel tile, channel block, batch element):
  Σ_taps scope(ky, kx) · mask · input(y, x) (+ bias).
- Backward, deterministic (no atomics: every element is written by one program, sums run in
  a fixed order), both samplings recomputed:
  - `_point_grad_kernel`, one program per (output-pixel tile, batch element), walking every
    channel block and tap in order: grad_kernel_offset, grad_offset and grad_mask (reductions
    over the channels of a kernel / offset group, added block after block into elements only
    this program touches), and the cell of every input sample (the floor of its point; none
    when it reads nothing).
  - `_weight_grad_kernel`, one program per (output-pixel tile, channel block, batch element):
    the tile's weight gradient, per channel a [pixels] x [pixels, scope cells] product with the
    bilinear weights of the kernel points' neighbours (one matrix for the block's channels,
    which share a kernel group), written as a per-tile partial; torch sums the partials.
  - torch sorts the samples of each (batch element, offset group) by cell (a stable sort) and
    finds where each cell's run starts (searchsorted).
  - `_input_grad_kernel`, one program per (input-pixel tile, channel block, batch element): a
    gather. Input pixel q is neighbour n of the points whose floor is q - (n // 2, n % 2); it
    sums, in sorted order, grad_out · scope sample · mask · bilinear weight over the samples of
    those cells (without input offsets: the one sample whose grid point is q, per tap).
The bias gradient is grad_out summed over (B, H_out, W_out) by torch.
"""
import math

import torch
import triton
import triton.language as tl

from . import _cost, _launch


@triton.jit
def _tile_and_block(C, L, BLOCK_C: tl.constexpr):
    """(channel block, pixel tile) of this program: axis 0 enumerates the channel blocks of each
    pixel tile in turn, so the programs sharing a tile's offsets run side by side (L2 reuse)."""
    blocks = (C // L) * tl.cdiv(L, BLOCK_C)
    pid = tl.program_id(0)
    return pid % blocks, pid // blocks


@triton.jit
def _channel_block(pid_c, C, G, Gk, L, BLOCK_C: tl.constexpr):
    """The channels (and their mask) of channel block `pid_c`, its offset group and kernel
    group: blocks of BLOCK_C channels inside segments of L channels."""
    blocks = tl.cdiv(L, BLOCK_C)
    seg = (pid_c // blocks) * L
    c = seg + (pid_c % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < seg + L, seg // (C // G), seg // (C // Gk)


@triton.jit
def _scope_centre(Sh, Sw, KH, KW, ACC: tl.constexpr):
    """((Sh - kh) / 2, (Sw - kw) / 2): where tap (0, 0) reads the scope at zero kernel offset."""
    return tl.cast(Sh - KH, ACC) * 0.5, tl.cast(Sw - KW, ACC) * 0.5


@triton.jit
def _kernel_point(koff_ptr, b64, gk, Gk, K, k, p, p_ok, HoWo, cy, cx, KW, ACC: tl.constexpr):
    """(ky, kx): where tap k of kernel group gk reads the scope at pixels p, and the base
    offset of its (dky, dkx) channels."""
    base = ((b64 * Gk + gk) * K + k) * 2 * HoWo
    kdy = tl.load(koff_ptr + base + p, mask=p_ok, other=0.0).to(ACC)
    kdx = tl.load(koff_ptr + base + HoWo + p, mask=p_ok, other=0.0).to(ACC)
    return ((k // KW + p * 0).to(ACC) + cy) + kdy, ((k % KW + p * 0).to(ACC) + cx) + kdx, base


@triton.jit
def _modulated_sample(input_ptr, offset_ptr, mask_ptr, b64, g, G, K, k, c64, ok, p, p_ok, C, H, W, Wo, HoWo, KW,
                      sh, sw, ph, pw, dh, dw, has_mask, HAS_OFFSET: tl.constexpr, ACC: tl.constexpr):
    """mask · input sample of tap k (offset group g) at pixels p, channels c64: [channels, pixels]."""
    gbase = (b64 * G + g) * K + k
    yb = p // Wo * sh - ph + k // KW * dh
    xb = p % Wo * sw - pw + k % KW * dw
    in_base = input_ptr + b64 * C * H * W
    plane = c64[:, None] * H * W
    if HAS_OFFSET:
        dy = tl.load(offset_ptr + gbase * 2 * HoWo + p, mask=p_ok, other=0.0).to(ACC)
        dx = tl.load(offset_ptr + (gbase * 2 + 1) * HoWo + p, mask=p_ok, other=0.0).to(ACC)
        v = _launch.bilinear_sample(in_base, plane, (yb.to(ACC) + dy)[None, :], (xb.to(ACC) + dx)[None, :], H, W,
                                    ok, ACC)
    else:  # the regular grid: exactly one pixel, zero padding
        inb = (yb >= 0) & (yb < H) & (xb >= 0) & (xb < W)
        v = tl.load(in_base + plane + (yb * W + xb).to(tl.int64)[None, :], mask=ok & inb[None, :],
                    other=0.0).to(ACC)
    if has_mask:
        v = v * tl.load(mask_ptr + gbase * HoWo + p, mask=p_ok, other=0.0).to(ACC)[None, :]
    return v


@triton.jit
def _forward_kernel(input_ptr, weight_ptr, koff_ptr, offset_ptr, mask_ptr, bias_ptr, out_ptr,
                    C, H, W, Sh, Sw, Wo, HoWo, KH, KW, G, Gk, L, sh, sw, ph, pw, dh, dw, has_mask, has_bias,
                    HAS_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid_c, pid_p = _tile_and_block(C, L, BLOCK_C)
    b64 = tl.program_id(1).to(tl.int64)
    c, c_ok, g, gk = _channel_block(pid_c, C, G, Gk, L, BLOCK_C)
    c64 = c.to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HoWo
    ok = c_ok[:, None] & p_ok[None, :]
    K = KH * KW
    cy, cx = _scope_centre(Sh, Sw, KH, KW, ACC)
    scope = c64[:, None] * Sh * Sw
    acc = tl.zeros((BLOCK_C, BLOCK_P), ACC)
    for k in range(K):
        ky, kx, _ = _kernel_point(koff_ptr, b64, gk, Gk, K, k, p, p_ok, HoWo, cy, cx, KW, ACC)
        s = _launch.bilinear_sample(weight_ptr, scope, ky[None, :], kx[None, :], Sh, Sw, ok, ACC)
        v = _modulated_sample(input_ptr, offset_ptr, mask_ptr, b64, g, G, K, k, c64, ok, p, p_ok, C, H, W, Wo,
                              HoWo, KW, sh, sw, ph, pw, dh, dw, has_mask, HAS_OFFSET, ACC)
        acc += s * v
    if has_bias:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(ACC)[:, None]
    tl.store(out_ptr + (b64 * C + c64[:, None]) * HoWo + p[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add(ptr, value, mask):
    """ptr[...] += value on elements only this program touches (a fixed order: no atomics)."""
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _point_grad_kernel(grad_out_ptr, input_ptr, weight_ptr, koff_ptr, offset_ptr, mask_ptr,
                       grad_koff_ptr, grad_offset_ptr, grad_mask_ptr, cell_ptr,
                       C, H, W, Sh, Sw, Wo, HoWo, KH, KW, G, Gk, L, sh, sw, ph, pw, dh, dw, has_mask,
                       HAS_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid_p = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HoWo
    ho = p // Wo
    wo = p % Wo
    K = KH * KW
    cpg = C // G
    cy, cx = _scope_centre(Sh, Sw, KH, KW, ACC)
    ci = tl.arange(0, BLOCK_C)
    no_cell = (H + 1) * (W + 1)
    in_base = input_ptr + b64 * C * H * W
    for seg in range(0, C, L):
        g = seg // cpg
        gk = seg // (C // Gk)
        for cb in range(0, L, BLOCK_C):
            c = seg + cb + ci
            c_ok = c < seg + L
            c64 = c.to(tl.int64)
            ok = c_ok[:, None] & p_ok[None, :]
            go = tl.load(grad_out_ptr + (b64 * C + c64[:, None]) * HoWo + p[None, :], mask=ok, other=0.0).to(ACC)
            # The group's first block writes the cells of its samples.
            first = p_ok & (p * 0 + seg % cpg + cb == 0)
            for k in range(K):
                ky, kx, kbase = _kernel_point(koff_ptr, b64, gk, Gk, K, k, p, p_ok, HoWo, cy, cx, KW, ACC)
                s, s_y, s_x = _launch.bilinear_sample_grad(weight_ptr, c64[:, None] * Sh * Sw, ky[None, :],
                                                           kx[None, :], Sh, Sw, ok, ACC)
                gbase = (b64 * G + g) * K + k
                yb = ho * sh - ph + k // KW * dh
                xb = wo * sw - pw + k % KW * dw
                if HAS_OFFSET:
                    dy = tl.load(offset_ptr + gbase * 2 * HoWo + p, mask=p_ok, other=0.0).to(ACC)
                    dx = tl.load(offset_ptr + (gbase * 2 + 1) * HoWo + p, mask=p_ok, other=0.0).to(ACC)
                    y = yb.to(ACC) + dy
                    x = xb.to(ACC) + dx
                    v, v_y, v_x = _launch.bilinear_sample_grad(in_base, c64[:, None] * H * W, y[None, :],
                                                               x[None, :], H, W, ok, ACC)
                    sampled = (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
                    y0 = tl.where(sampled, tl.floor(y), 0.0).to(tl.int32)
                    x0 = tl.where(sampled, tl.floor(x), 0.0).to(tl.int32)
                    cell = tl.where(sampled, (y0 + 1) * (W + 1) + x0 + 1, no_cell)
                else:
                    inb = (yb >= 0) & (yb < H) & (xb >= 0) & (xb < W)
                    v = tl.load(in_base + c64[:, None] * H * W + (yb * W + xb).to(tl.int64)[None, :],
                                mask=ok & inb[None, :], other=0.0).to(ACC)
                    cell = tl.where(inb, (yb + 1) * (W + 1) + xb + 1, no_cell)
                tl.store(cell_ptr + gbase * HoWo + p, cell, mask=first)
                if has_mask:
                    m = tl.load(mask_ptr + gbase * HoWo + p, mask=p_ok, other=0.0).to(ACC)
                else:
                    m = tl.full((BLOCK_P,), 1.0, ACC)
                g_s = go * (v * m[None, :])  # d out / d scope sample (Σ over pixels: _weight_grad_kernel)
                g_mv = go * s  # d out / d (mask * input sample)
                if has_mask:
                    _add(grad_mask_ptr + gbase * HoWo + p, tl.sum(g_mv * v, axis=0), p_ok)
                if HAS_OFFSET:
                    g_v = g_mv * m[None, :]
                    _add(grad_offset_ptr + gbase * 2 * HoWo + p, tl.sum(g_v * v_y, axis=0), p_ok)
                    _add(grad_offset_ptr + (gbase * 2 + 1) * HoWo + p, tl.sum(g_v * v_x, axis=0), p_ok)
                _add(grad_koff_ptr + kbase + p, tl.sum(g_s * s_y, axis=0), p_ok)
                _add(grad_koff_ptr + kbase + HoWo + p, tl.sum(g_s * s_x, axis=0), p_ok)
                tl.debug_barrier()  # the next block's read-modify-writes see these


@triton.jit
def _weight_grad_kernel(grad_out_ptr, input_ptr, koff_ptr, offset_ptr, mask_ptr, weight_part_ptr,
                        C, H, W, Sh, Sw, Wo, HoWo, KH, KW, G, Gk, L, sh, sw, ph, pw, dh, dw, has_mask,
                        HAS_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                        SCOPE: tl.constexpr, ACC: tl.constexpr):
    """The weight gradient of one tile of output pixels and one channel block: Σ over the tile's
    pixels and the taps of grad_out · mask · input sample times the bilinear weights of the
    kernel point's neighbours in the scope, written to the tile's partial (B * tiles, C, SCOPE)."""
    pid_c, pid_p = _tile_and_block(C, L, BLOCK_C)
    b64 = tl.program_id(1).to(tl.int64)
    c, c_ok, g, gk = _channel_block(pid_c, C, G, Gk, L, BLOCK_C)
    c64 = c.to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HoWo
    ok = c_ok[:, None] & p_ok[None, :]
    K = KH * KW
    cy, cx = _scope_centre(Sh, Sw, KH, KW, ACC)
    ci = tl.arange(0, BLOCK_C)
    cells = tl.arange(0, SCOPE)
    go = tl.load(grad_out_ptr + (b64 * C + c64[:, None]) * HoWo + p[None, :], mask=ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_C, SCOPE), ACC)
    for k in range(K):
        ky, kx, _ = _kernel_point(koff_ptr, b64, gk, Gk, K, k, p, p_ok, HoWo, cy, cx, KW, ACC)
        v = _modulated_sample(input_ptr, offset_ptr, mask_ptr, b64, g, G, K, k, c64, ok, p, p_ok, C, H, W, Wo,
                              HoWo, KW, sh, sw, ph, pw, dh, dw, has_mask, HAS_OFFSET, ACC)
        g_s = go * v  # d out / d scope sample
        # g_s times the bilinear weights of the kernel point's neighbours: a [pixels, scope cells]
        # matrix shared by the block's channels (one kernel group), multiplied channel by channel.
        k_in = p_ok & (ky > -1.0) & (ky < Sh) & (kx > -1.0) & (kx < Sw)
        ky0f = tl.floor(ky)
        kx0f = tl.floor(kx)
        ly = ky - ky0f
        lx = kx - kx0f
        ky0 = tl.where(k_in, ky0f, 0.0).to(tl.int32)
        kx0 = tl.where(k_in, kx0f, 0.0).to(tl.int32)
        spread = tl.zeros((BLOCK_P, SCOPE), ACC)
        hit = cells[None, :] < 0
        for n in tl.static_range(4):
            yy = ky0 + n // 2
            xx = kx0 + n % 2
            wy = ly if n // 2 == 1 else 1.0 - ly
            wx = lx if n % 2 == 1 else 1.0 - lx
            on = (k_in & (yy >= 0) & (yy < Sh) & (xx >= 0) & (xx < Sw))[:, None] & \
                ((yy * Sw + xx)[:, None] == cells[None, :])
            spread += tl.where(on, (wy * wx)[:, None], 0.0)
            hit = hit | on
        for q in tl.static_range(BLOCK_C):
            row = tl.sum(tl.where(ci[:, None] == q, g_s, 0.0), axis=0)
            # A neighbour in the scope takes row * weight even at weight 0 (NaN spreads as in
            # the reference); the other cells take nothing.
            cell_sum = tl.sum(tl.where(hit, row[:, None] * spread, 0.0), axis=0)
            acc += tl.where(ci[:, None] == q, cell_sum[None, :], 0.0)
    part = weight_part_ptr + (b64 * tl.cdiv(HoWo, BLOCK_P) + pid_p) * C * SCOPE
    tl.store(part + c64[:, None] * SCOPE + cells[None, :], acc, mask=c_ok[:, None])


@triton.jit
def _input_grad_kernel(grad_out_ptr, weight_ptr, koff_ptr, offset_ptr, mask_ptr, order_ptr, start_ptr,
                       grad_input_ptr,
                       C, H, W, Sh, Sw, Wo, HoWo, KH, KW, G, Gk, L, sh, sw, ph, pw, dh, dw, has_mask,
                       HAS_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, ACC: tl.constexpr):
    pid_c, pid_q = _tile_and_block(C, L, BLOCK_C)
    b64 = tl.program_id(1).to(tl.int64)
    c, c_ok, g, gk = _channel_block(pid_c, C, G, Gk, L, BLOCK_C)
    c64 = c.to(tl.int64)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < H * W
    iy = q // W
    ix = q % W
    K = KH * KW
    cy, cx = _scope_centre(Sh, Sw, KH, KW, ACC)
    bg = b64 * G + g
    starts = start_ptr + bg * ((H + 1) * (W + 1) + 1)
    order = order_ptr + bg * K * HoWo
    acc = tl.zeros((BLOCK_C, BLOCK_Q), ACC)
    for n in tl.static_range(4 if HAS_OFFSET else 1):
        # q is neighbour n of the points whose floor is q - (n // 2, n % 2).
        cell = (iy - n // 2 + 1) * (W + 1) + ix - n % 2 + 1
        lo = tl.load(starts + cell, mask=q_ok, other=0)
        count = tl.load(starts + cell + 1, mask=q_ok, other=0) - lo
        for t in range(0, tl.max(count, axis=0)):
            live = q_ok & (t < count)
            idx = tl.load(order + lo + t, mask=live, other=0)
            k = idx // HoWo
            p = idx % HoWo
            gbase = bg * K + k
            if HAS_OFFSET:
                dy = tl.load(offset_ptr + gbase * 2 * HoWo + p, mask=live, other=0.0).to(ACC)
                dx = tl.load(offset_ptr + (gbase * 2 + 1) * HoWo + p, mask=live, other=0.0).to(ACC)
                y = (p // Wo * sh - ph + k // KW * dh).to(ACC) + dy
                x = (p % Wo * sw - pw + k % KW * dw).to(ACC) + dx
                ly = y - tl.floor(y)
                lx = x - tl.floor(x)
                wb = (ly if n // 2 == 1 else 1.0 - ly) * (lx if n % 2 == 1 else 1.0 - lx)
            if has_mask:
                m = tl.load(mask_ptr + gbase * HoWo + p, mask=live, other=0.0).to(ACC)
            else:
                m = tl.full((BLOCK_Q,), 1.0, ACC)
            ky, kx, _ = _kernel_point(koff_ptr, b64, gk, Gk, K, k, p, live, HoWo, cy, cx, KW, ACC)
            ok = c_ok[:, None] & live[None, :]
            s = _launch.bilinear_sample(weight_ptr, c64[:, None] * Sh * Sw, ky[None, :], kx[None, :], Sh, Sw, ok,
                                        ACC)
            go = tl.load(grad_out_ptr + (b64 * C + c64[:, None]) * HoWo + p[None, :], mask=ok, other=0.0).to(ACC)
            g_v = (go * s) * m[None, :]
            if HAS_OFFSET:
                g_v = g_v * wb[None, :]
            acc += tl.where(ok, g_v, 0.0)
    tl.store(grad_input_ptr + (b64 * C + c64[:, None]) * H * W + q[None, :], acc,
             mask=c_ok[:, None] & q_ok[None, :])


# ---------------------------------------------------------------------------------------
# Dispatch.

KERNELS = {"forward": _forward_kernel, "point_grad": _point_grad_kernel, "weight_grad": _weight_grad_kernel,
           "input_grad": _input_grad_kernel}
_H, _B, _F, _D = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (_H, _B, _F, _D)
# Warps per program and pixel tiles (BLOCK_P output pixels, BLOCK_Q input pixels) by kernel
# and dtype: what compiles without spills on sm_80 and sm_90 (tools/check_gpu_build.py), with
# the exceptions of SPILL_FREE below. Tests may shrink the tiles (module attributes, read at
# each launch).
NUM_WARPS = {"forward": {_H: 8, _B: 8, _F: 8, _D: 8}, "point_grad": {_H: 4, _B: 4, _F: 4, _D: 8},
             "weight_grad": {_H: 4, _B: 4, _F: 4, _D: 4}, "input_grad": {_H: 4, _B: 4, _F: 4, _D: 4}}
TILES = {"forward": dict(BLOCK_P=128), "point_grad": dict(BLOCK_P=64), "weight_grad": dict(BLOCK_P=32),
         "input_grad": dict(BLOCK_Q=64)}
TILES_FLOAT64 = {"forward": dict(BLOCK_P=64), "point_grad": dict(BLOCK_P=32), "weight_grad": dict(BLOCK_P=32),
                 "input_grad": dict(BLOCK_Q=32)}
# (kernel, dtype name, BLOCK_C, HAS_OFFSET, SCOPE) -> (pixel tile, warps) where the defaults
# spill a few bytes (found by compiling every config for sm_80 and sm_90).
SPILL_FREE = {
    ("point_grad", "float16", 8, False, None): (64, 8), ("point_grad", "float16", 8, True, None): (32, 4),
    ("point_grad", "bfloat16", 8, False, None): (64, 8), ("point_grad", "bfloat16", 8, True, None): (32, 4),
    ("point_grad", "float64", 1, False, None): (32, 4),
    ("weight_grad", "float64", 4, False, 16): (32, 8), ("weight_grad", "float64", 8, False, 32): (32, 8),
    ("input_grad", "float32", 8, True, None): (64, 8), ("input_grad", "float64", 4, True, None): (32, 8),
}
# Channel blocks: the smallest of CHANNEL_BLOCKS covering a segment (L channels of one offset
# and kernel group), else the largest.
CHANNEL_BLOCKS = (1, 4, 8)
# Scope cells of the weight gradient's one-hot product: Sh*Sw rounded up to a power of two, at
# least 16. compile_all compiles these (scopes up to 8x8); larger scopes compile on demand.
SCOPE_CELLS = (16, 32, 64)
SCALAR_TYPES = {}


def _block_c(segment: int) -> int:
    return next((b for b in CHANNEL_BLOCKS if b >= segment), CHANNEL_BLOCKS[-1])


def _scope_cells(Sh: int, Sw: int) -> int:
    return max(SCOPE_CELLS[0], triton.next_power_of_2(Sh * Sw))


def launch_config(kernel: str, dtype: torch.dtype, has_offset: bool, block_c: int,
                  scope_cells: int | None = None) -> _launch.LaunchConfig:
    tiles = TILES_FLOAT64 if dtype == torch.float64 else TILES
    constexprs = dict(tiles[kernel], HAS_OFFSET=has_offset, BLOCK_C=block_c)
    if kernel == "weight_grad":
        constexprs["SCOPE"] = scope_cells
    warps = NUM_WARPS[kernel][dtype]
    override = SPILL_FREE.get((kernel, str(dtype).removeprefix("torch."), block_c, has_offset, scope_cells))
    if override is not None:
        tile, warps = override
        constexprs["BLOCK_Q" if kernel == "input_grad" else "BLOCK_P"] = tile
    return _launch.LaunchConfig(kernel, tuple(sorted(constexprs.items())), warps)


def _dtype_configs(dtype: torch.dtype) -> set:
    """Every config compile_all compiles in `dtype`."""
    configs = set()
    for kernel in KERNELS:
        for has_offset in (False, True):
            for block_c in CHANNEL_BLOCKS:
                for scope in (SCOPE_CELLS if kernel == "weight_grad" else (None,)):
                    configs.add(launch_config(kernel, dtype, has_offset, block_c, scope))
    return configs


all_launch_configs, config_dtype_names = _launch.configs_by_dtype(_dtype_configs, DTYPES)


launch = _launch.launcher(KERNELS)


def _pointer_types(kernel: str, dtype: torch.dtype) -> list:
    data, acc = str(_launch.TL_DTYPES[dtype]), str(_launch.TL_DTYPES[_launch.accumulation_dtype(dtype)])
    if kernel == "forward":
        return [dict(input_ptr=data, weight_ptr=data, koff_ptr=data, offset_ptr=data, mask_ptr=data, bias_ptr=data,
                     out_ptr=data)]
    if kernel == "point_grad":
        return [dict(grad_out_ptr=data, input_ptr=data, weight_ptr=data, koff_ptr=data, offset_ptr=data,
                     mask_ptr=data, grad_koff_ptr=acc, grad_offset_ptr=acc, grad_mask_ptr=acc, cell_ptr="i32")]
    if kernel == "weight_grad":
        return [dict(grad_out_ptr=data, input_ptr=data, koff_ptr=data, offset_ptr=data, mask_ptr=data,
                     weight_part_ptr=acc)]
    return [dict(grad_out_ptr=data, weight_ptr=data, koff_ptr=data, offset_ptr=data, mask_ptr=data, order_ptr="i32",
                 start_ptr="i32", grad_input_ptr=acc)]


def compile_all(archs=(80, 90), dtype_names=_launch.FLOAT_DTYPE_NAMES) -> list:
    """Compiles every launch config in the dtypes it is launched in (of `dtype_names`) for
    `archs`. See _launch.compile_all."""
    return _launch.compile_all(KERNELS, all_launch_configs(), _pointer_types, SCALAR_TYPES, archs, dtype_names,
                               config_dtype_names)


def predicted_work(dtype_name: str, B: int, C: int, H: int, W: int, kernel_size=(3, 3), scope=(5, 5), G: int = 1,
                   Gk: int = 1, has_offset: bool = True, has_mask: bool = True) -> _cost.Work:
    """What `_forward_kernel` must do (stride 1, 'same' padding: H_out = H, W_out = W), counted
    from the kernel (see _cost.py for how it becomes a time). DRAM: input, offsets, mask, output
    once. L2: each channel block re-reads its group's offsets and mask (the blocks of a pixel
    tile run side by side); the input gather pulls two rows of sectors per tap and element (the
    x neighbours share sectors when offsets are smooth), the regular grid one; the scope stays
    in L1. Loads: one element per lane (data-dependent addresses)."""
    e = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
    kh, kw = kernel_size
    K, P = kh * kw, B * H * W
    L = _segment(C, G, Gk)
    block_c = _block_c(L)
    blocks = (C // L) * -(-L // block_c)
    lanes = blocks * block_c  # channels computed, padding included
    per_point = 2 + (2 if has_offset else 0) + (1 if has_mask else 0)  # loads per pixel and tap
    maps = P * K * (2 * Gk + (2 * G if has_offset else 0) + (G if has_mask else 0)) * e
    dram = 2 * B * C * H * W * e + maps + C * scope[0] * scope[1] * e
    l2 = B * C * H * W * e * (1 + K * (2 if has_offset else 1)) + P * K * per_point * e * blocks
    loads = (P * K * per_point * blocks + B * lanes * H * W * (K * (4 + (4 if has_offset else 1)) + 1)) / 32
    # Per pixel, tap and block: the two samplings' geometry (floor, compares, weights, index:
    # ~25 ops each). Per element and tap: per neighbour read an int64 address add (2) and a
    # select; conversions of non-float32 data (one per read).
    reads = 4 + (4 if has_offset else 1)
    convert = 0 if dtype_name in ("float32", "float64") else reads
    alu = P * K * blocks * 50 + B * lanes * H * W * K * (reads * 3 + convert)
    fma = 2 * B * lanes * H * W * K * (reads + 2) * (2 if dtype_name == "float64" else 1)
    return _cost.Work(dram, l2, loads, 0, dtype_name, fma, alu)


def predict(dtype_name: str, *args, hardware: _cost.Hardware = _cost.H100, **kwargs) -> _cost.Prediction:
    """The cost model's forward time (see predicted_work)."""
    return _cost.predict(predicted_work(dtype_name, *args, **kwargs), hardware)


def _pair(op, name, v, lo):
    if len(v) != 2 or min(v) < lo or max(v) > 2**31 - 1:
        raise ValueError(f"{op}: {name} must be two integers in [{lo}, 2**31 - 1], got {list(v)}")
    return tuple(int(i) for i in v)


def _check(op, input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation,
           grad_out=None):
    """What the kernels index by, checked: a direct torch.ops call bypasses the public checks.
    Raises ValueError (sizes, values) or TypeError (dtypes, devices) naming the argument.
    Returns the geometry."""
    named = {"input": input, "weight": weight, "kernel_offset": kernel_offset, "offset": offset, "mask": mask,
             "bias": bias, "grad_out": grad_out}
    for name, t in named.items():
        if t is not None and t.dim() != (1 if name == "bias" else 4):
            raise ValueError(f"{op}: {name} must be {1 if name == 'bias' else 4}-D, got shape {tuple(t.shape)}")
    (kh, kw) = _pair(op, "kernel_size", kernel_size, 1)
    stride, padding, dilation = (_pair(op, n, v, lo) for n, v, lo in
                                 (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)))
    for name, t in named.items():
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            raise TypeError(f"{op}: {name} must have input's dtype and device ({input.dtype}, {input.device}), "
                            f"got {t.dtype}, {t.device}")
    if input.dtype not in _launch.TL_DTYPES:
        raise TypeError(f"{op}: input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    B, C, H, W = input.shape
    if C < 1 or tuple(weight.shape[:2]) != (C, 1) or weight.shape[2] < kh or weight.shape[3] < kw:
        raise ValueError(f"{op}: weight must have shape (C, 1, Sh, Sw) with C = {C} >= 1, Sh >= {kh}, Sw >= {kw}, "
                         f"got {tuple(weight.shape)}")
    K = kh * kw
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{op}: the dilated kernel does not fit the padded input (output {Ho} x {Wo})")

    def groups(name, t, per_group):
        n = t.shape[1] // per_group
        if n < 1 or t.shape[1] != n * per_group or C % n:
            raise ValueError(f"{op}: {name} channels ({t.shape[1]}) must be {per_group} x groups, the groups "
                             f"dividing C = {C}")
        return n

    Gk = groups("kernel_offset", kernel_offset, 2 * K)
    G = groups("offset", offset, 2 * K) if offset is not None else groups("mask", mask, K) if mask is not None else 1
    want = {"kernel_offset": (B, 2 * K * Gk, Ho, Wo), "offset": (B, 2 * K * G, Ho, Wo), "mask": (B, K * G, Ho, Wo),
            "bias": (C,), "grad_out": (B, C, Ho, Wo)}
    for name, shape in want.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if (H + 1) * (W + 1) >= 2**31 or K * Ho * Wo >= 2**31:
        raise ValueError(f"{op}: input of {H} x {W} with {K} taps of {Ho} x {Wo} outputs is too large for the "
                         "int32 sample indices of the backward")
    Sh, Sw = weight.shape[2], weight.shape[3]
    return B, C, H, W, Sh, Sw, Ho, Wo, kh, kw, G, Gk, (*stride, *padding, *dilation)


def _segment(C, G, Gk):
    """Channels per segment: a run of channels with one offset group and one kernel group."""
    return math.gcd(C // G, C // Gk)


_FORWARD_SCHEMA = ("(Tensor input, Tensor weight, Tensor kernel_offset, Tensor? offset, Tensor? mask, Tensor? bias, "
                   "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor")
_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor input, Tensor weight, Tensor kernel_offset, Tensor? offset, "
                    "Tensor? mask, Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) "
                    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_kernel_offset, Tensor grad_offset, "
                    "Tensor grad_mask, Tensor grad_bias)")


@torch.library.custom_op("vsr_kernels::deform_kernel_conv2d_triton", mutates_args=(), schema=_FORWARD_SCHEMA)
def deform_kernel_conv2d(input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation):
    B, C, H, W, Sh, Sw, Ho, Wo, kh, kw, G, Gk, hyper = _check(
        "vsr_kernels.deform_kernel_conv2d_triton", input, weight, kernel_offset, offset, mask, bias, kernel_size,
        stride, padding, dilation)
    out = input.new_empty((B, C, Ho, Wo))
    if out.numel() == 0:
        return out
    x, w, ko = input.contiguous(), weight.contiguous(), kernel_offset.contiguous()
    off = offset.contiguous() if offset is not None else ko
    m = mask.contiguous() if mask is not None else ko
    bi = bias.contiguous() if bias is not None else w
    L = _segment(C, G, Gk)
    config = launch_config("forward", input.dtype, offset is not None, _block_c(L))
    t = dict(config.constexprs)
    grid = (triton.cdiv(Ho * Wo, t["BLOCK_P"]) * (C // L) * triton.cdiv(L, t["BLOCK_C"]), B)
    with _launch.device_guard(input):
        launch(config, grid, x, w, ko, off, m, bi, out, C, H, W, Sh, Sw, Wo, Ho * Wo, kh, kw, G, Gk, L, *hyper,
               int(mask is not None), int(bias is not None), dtype=input.dtype)
    return out


@torch.library.custom_op("vsr_kernels::deform_kernel_conv2d_triton_backward", mutates_args=(),
                         schema=_BACKWARD_SCHEMA)
def deform_kernel_conv2d_backward(grad_out, input, weight, kernel_offset, offset, mask, bias, kernel_size, stride,
                                  padding, dilation):
    B, C, H, W, Sh, Sw, Ho, Wo, kh, kw, G, Gk, hyper = _check(
        "vsr_kernels.deform_kernel_conv2d_triton_backward", input, weight, kernel_offset, offset, mask, bias,
        kernel_size, stride, padding, dilation, grad_out)
    acc = _launch.accumulation_dtype(input.dtype)
    opts = dict(dtype=acc, device=input.device)
    K, HoWo = kh * kw, Ho * Wo
    grad_input = torch.zeros((B, C, H, W), **opts)
    grad_koff = torch.zeros(kernel_offset.shape, **opts)
    grad_offset = torch.zeros(offset.shape if offset is not None else (0,), **opts)
    grad_mask = torch.zeros(mask.shape if mask is not None else (0,), **opts)
    grad_weight = torch.zeros(weight.shape, **opts)
    go = grad_out.contiguous()
    grad_bias = go.to(acc).sum((0, 2, 3)) if go.numel() else torch.zeros((C,), **opts)
    if B > 0:
        x, w, ko = input.contiguous(), weight.contiguous(), kernel_offset.contiguous()
        has_offset, has_mask = offset is not None, mask is not None
        off = offset.contiguous() if has_offset else ko
        m = mask.contiguous() if has_mask else ko
        L = _segment(C, G, Gk)
        sizes = (C, H, W, Sh, Sw, Wo, HoWo, kh, kw, G, Gk, L, *hyper, int(has_mask))
        config = launch_config("point_grad", input.dtype, has_offset, _block_c(L))
        tiles = triton.cdiv(HoWo, dict(config.constexprs)["BLOCK_P"])
        cells = torch.empty((B * G, K * HoWo), dtype=torch.int32, device=input.device)
        with _launch.device_guard(input):
            launch(config, (tiles, B), go, x, w, ko, off, m, grad_koff, grad_offset if has_offset else grad_koff,
                   grad_mask if has_mask else grad_koff, cells, *sizes, dtype=input.dtype)
            config = launch_config("weight_grad", input.dtype, has_offset, _block_c(L),
                                   _scope_cells(Sh, Sw))
            t = dict(config.constexprs)
            tiles = triton.cdiv(HoWo, t["BLOCK_P"])
            weight_part = torch.empty((B * tiles, C, t["SCOPE"]), **opts)
            launch(config, (tiles * (C // L) * triton.cdiv(L, t["BLOCK_C"]), B), go, x, ko, off, m, weight_part,
                   *sizes, dtype=input.dtype)
            grad_weight = weight_part.sum(0)[:, :Sh * Sw].reshape(C, 1, Sh, Sw).contiguous()
            # The samples of each (batch element, offset group) in cell order, and where each
            # cell's run starts ((H + 1) * (W + 1) cells: floors from -1; the last, "no cell",
            # gathers nothing).
            sorted_cells, order = torch.sort(cells, dim=1, stable=True)
            n_cells = (H + 1) * (W + 1)
            bounds = torch.arange(n_cells + 1, dtype=torch.int32, device=input.device).expand(B * G, n_cells + 1)
            starts = torch.searchsorted(sorted_cells, bounds.contiguous(), out_int32=True)
            order = order.to(torch.int32)
            config = launch_config("input_grad", input.dtype, has_offset, _block_c(L))
            t = dict(config.constexprs)
            grid = (triton.cdiv(H * W, t["BLOCK_Q"]) * (C // L) * triton.cdiv(L, t["BLOCK_C"]), B)
            launch(config, grid, go, w, ko, off, m, order, starts, grad_input, *sizes, dtype=input.dtype)
    dtype = input.dtype
    return (grad_input.to(dtype), grad_weight.to(dtype), grad_koff.to(dtype), grad_offset.to(dtype),
            grad_mask.to(dtype), grad_bias.to(dtype))
