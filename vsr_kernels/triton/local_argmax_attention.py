"""Local argmax attention (MANA) in Triton: forward and gather-formulated backward.

Registered with `torch.library.custom_op` (an opaque boundary, see DESIGN.md) as
`vsr_kernels::local_argmax_attention_triton` and `..._triton_backward`, with the schemas and
semantics of the C++ ops (csrc/kernels/local_argmax_attention.h is the per-pixel
specification this file follows). Their fake tensors and autograd are the C++ ops', registered
by vsr_kernels.ops when it first imports this module (ops._backend.op_for): this module
imports nothing from vsr_kernels.ops. The generic launch machinery is in _launch.py.

Layout. Feature maps are channels-first, so one program owns BLOCK_P consecutive pixels of
one row of one frame, one pixel per lane: every load of a channel is a run of consecutive addresses
along W (coalesced), however the candidate shifts it. Tensors are read through their
strides, never copied: non-contiguous and channels-last inputs work (channels-last then
loses the coalescing). Only the small (B, T, H, W) maps the backward receives are made
contiguous. Offsets are int64 (tensors may pass 2**31 elements); pixel coordinates within
one frame are int32, and so are candidate numbers j < K*K (K <= 32767), but the window's
steps (j // K - r) * dilation and the coordinates they move to are int64 (dilation may be
up to 2**31 - 1).

Forward, two formulations; `formulation()` picks one per dtype, C and K (see Dispatch).

Direct (local_argmax_attention_forward_kernel), per pixel: the K*K candidates in increasing j,
each a dot product over C on the FMA units; the query's channels stay in registers across the
candidates when C <= 16 (else they are re-read per channel block from L1). Running argmax with
the C++ ranking: NaN beats every number, a tie keeps the earlier (lower) j. Then
out = score * value[selected].

Tile (local_argmax_attention_tile_forward_kernel), per program: an 8 x 8 tile of query pixels
of one frame against the (8 + K - 1) x (8 + K - 1) halo of key pixels holding all their
windows, BLOCK_N halo columns at a time: S = Q (64 x C) @ K_halo (C x BLOCK_N) with tl.dot
(mma.sync on sm_80, wgmma on sm_90) over 16-channel steps, float32 accumulation. Each query
row of S is masked to its own K x K band (and, with border="exclude", to in-frame columns;
with "zeros" an out-of-frame column is a zero key, multiplied for real, so a NaN or inf query
scores NaN there as in the direct kernel), then reduced: the band's maximum (NaN ranks highest)
and the lowest band column holding it. Halo columns are numbered row-major, so for every query
j grows with the column and "lowest j among equal maxima" is "lowest column"; chunks come in
increasing column order and a later chunk replaces the best only if it beats it. With
dilation d the tile lives on one lattice y = residue + d * i (x likewise): its halo is the
same tile strided by d, and tiles cover each of the min(d, size) residues. float16/bfloat16
multiply exactly on the tensor cores; float32 would run in tf32 (allow_tf32, off by default);
the scale is applied to the accumulated dot in the accumulation type.

Backward, three gather kernels, deterministic and atomic-free:
  1. score grad: g[t, p] = scale * (grad_score + <grad_out[t, :, p], value[t, :, sel_t(p)]>),
     a (B, T, H, W) map in the accumulation type, computed once and read by 2 and 3;
  2. query grad, per query pixel: sum over t, in order, of g[t, p] * key[t, :, sel_t(p)];
  3. key and value grad, per key pixel k of frame t: the same kernel twice, gathering
     weight[p] * source[:, p] over the <= K*K pixels p whose candidate j is k and whose
     index is j (key: weight g, source query; value: weight score, source grad_out).
Accumulation is float32 (float64 for float64 inputs).
Why the backward stays gathers (no tile form): it touches only the selected candidate of each
pixel, 2*(2C + 2Cv) FLOPs a pixel against the forward's 2*C*K*K, so it has no dot products
to put on tensor cores; its bytes are grad_out, the selected key/value rows and the three
gradients, about 2.5x the forward's minimal traffic. A tile form would have to scatter into
a key halo (a sparse one-hot S^T @ G product, 1/81 dense at K = 9): 81x the FLOPs of the
gathers for the same bytes, and overlapping halos need atomics or a second pass. The gathers
are memory-bound already; the part worth tiling later is their index re-reads (kernel 3
reads the index map K*K times per channel tile, from cache).

Launch shape: BLOCK_P = 128 pixels per program on 4 warps, one pixel per lane, so a warp's
load of one channel is 32 consecutive pixels (128 bytes in fp32); channel tiles of 16 or 32
(see MAX_CHANNEL_BLOCK). The tile forward: 8 x 8 queries by 64 halo columns, 4 warps,
16-channel steps (8 for tf32). Registers and spills per config are printed by
tests/test_gpu_build.py and tools/check_gpu_build.py: none spills with this machine's Triton
3.9 (the direct kernels were checked once by hand with the GPU image's 3.6, which allocates
about twice the registers, 144-178 in the forward).

Expected cost: predicted by the cost model (_cost.py, predicted_work below; printed by
tools/triton_cost_model.py) until a GPU run replaces it. At the benchmark shape (B=4, T=7,
C=Cv=64, 180 x 320, K=9) in bfloat16 on H100 the minimal traffic is 0.67 GB (0.22 ms at the
measured 3.0 TB/s copy rate). The direct kernel issues a scalar load per channel and candidate
(K*K*C*2 loads a pixel): about 2.0 ms, load/store-issue bound, 11% of the DRAM roofline. The
tile forward does 256 score elements a pixel (the 16 x 16 halo) on tensor cores (0.13 ms at
half the measured bf16 rate) plus ~13 ALU operations per element for the band mask and the
argmax (~0.3 ms): about 0.44 ms, math (epilogue) bound, 51% of the DRAM roofline.
"""
import functools

import torch
import triton
import triton.language as tl

from . import _cost, _launch
# Aliased: the kernels name their own in-frame masks `in_frame`.
from ._launch import channel_block as _channel_block
from ._launch import dot_operand as _dot_operand
from ._launch import in_frame as _in_frame
from ._launch import map_offset as _map_offset
from ._launch import offsets as _offsets
from ._launch import pixel_block as _pixel_block


@triton.jit
def _window_step(j, kernel_size, dilation):
    """(dy, dx) * dilation of candidate j = (dy + r) * kernel_size + (dx + r), r = kernel_size // 2,
    in int64: |dy| * dilation can pass 2**31."""
    r = kernel_size // 2
    return (j // kernel_size - r).to(tl.int64) * dilation, (j % kernel_size - r).to(tl.int64) * dilation


@triton.jit
def _candidate(y, x, j, kernel_size, dilation, H, W, sign):
    """(y, x) moved by candidate j's step (sign 1) or back from it (sign -1), in int64, and
    whether it is in the frame."""
    dy, dx = _window_step(j, kernel_size, dilation)
    cy = y + sign * dy
    cx = x + sign * dx
    return cy, cx, _in_frame(cy, cx, H, W)


@triton.jit
def local_argmax_attention_forward_kernel(
    query_ptr, key_ptr, value_ptr, out_ptr, score_ptr, index_ptr,
    T, C, Cv, H, W, kernel_size, dilation, scale: tl.float64, zero_border,
    q_sb, q_sc, q_sy, q_sx,
    k_sb, k_st, k_sc, k_sy, k_sx,
    v_sb, v_st, v_sc, v_sy, v_sx,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, QUERY_IN_REGISTERS: tl.constexpr,
):
    frame, y, x, in_frame = _pixel_block(tl.program_id(0), H, W, BLOCK_P)
    b = (frame // T).to(tl.int64)
    t = (frame % T).to(tl.int64)
    query_ptr += b * q_sb
    key_ptr += b * k_sb + t * k_st
    c = tl.arange(0, BLOCK_C)
    q_off = _offsets(c, y, x, q_sc, q_sy, q_sx)
    k_off = _offsets(c, y, x, k_sc, k_sy, k_sx)
    if QUERY_IN_REGISTERS:
        q = tl.load(query_ptr + q_off, mask=(c < C)[:, None] & in_frame[None, :], other=0).to(ACC)

    best = tl.zeros([BLOCK_P], ACC)
    best_j = tl.full([BLOCK_P], -1, tl.int32)
    for j in range(kernel_size * kernel_size):
        dy, dx = _window_step(j, kernel_size, dilation)
        inside = in_frame & _in_frame(y + dy, x + dx, H, W)
        shifted_key_ptr = key_ptr + dy * k_sy + dx * k_sx
        # Outside the frame the key reads as 0 and is multiplied for real, as with F.unfold's
        # zero padding: a NaN or inf query then gives a NaN score.
        if QUERY_IN_REGISTERS:
            k = tl.load(shifted_key_ptr + k_off, mask=(c < C)[:, None] & inside[None, :], other=0).to(ACC)
            dot = tl.sum(q * k, axis=0)
        else:
            dot = tl.zeros([BLOCK_P], ACC)
            for c0 in range(0, C, BLOCK_C):
                mask = (c0 + c < C)[:, None]
                q = tl.load(_channel_block(query_ptr, c0, q_sc) + q_off, mask=mask & in_frame[None, :],
                            other=0)
                k = tl.load(_channel_block(shifted_key_ptr, c0, k_sc) + k_off, mask=mask & inside[None, :],
                            other=0)
                dot += tl.sum(q.to(ACC) * k.to(ACC), axis=0)
        s = (scale * dot).to(ACC)
        beats = (s > best) | ((s != s) & (best == best))  # the C++ `beats`: NaN wins, ties keep
        take = (inside | zero_border) & ((best_j < 0) | beats)
        best = tl.where(take, s, best)
        best_j = tl.where(take, j, best_j)

    map_off = _map_offset(frame, y, x, H, W)
    tl.store(score_ptr + map_off, best.to(score_ptr.dtype.element_ty), mask=in_frame)
    tl.store(index_ptr + map_off, best_j.to(tl.int64), mask=in_frame)
    sy, sx, selected = _candidate(y, x, best_j, kernel_size, dilation, H, W, 1)
    selected &= in_frame
    value_ptr += b * v_sb + t * v_st
    v_off = _offsets(c, sy, sx, v_sc, v_sy, v_sx)
    frame_size = tl.cast(H, tl.int64) * W
    out_ptr += frame.to(tl.int64) * Cv * frame_size
    out_off = _offsets(c, y, x, frame_size, W, 1)
    for c0 in range(0, Cv, BLOCK_C):
        mask = (c0 + c < Cv)[:, None]
        v = tl.load(_channel_block(value_ptr, c0, v_sc) + v_off, mask=mask & selected[None, :], other=0)
        tl.store(_channel_block(out_ptr, c0, frame_size) + out_off,
                 (best[None, :] * v.to(ACC)).to(out_ptr.dtype.element_ty), mask=mask & in_frame[None, :])


# ---------------------------------------------------------------------------------------
# The tile forward: tensor-core scores of a query tile against its key halo.

# Sentinel halo column of "no candidate yet": above every column a halo can have.
NO_COLUMN = tl.constexpr(2**30)


@triton.jit
def _nan_max(a, b):
    """max that returns NaN when either side is NaN: NaN ranks above every number."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _lattice_tile(tile, rows, TILE: tl.constexpr):
    """(residue, first lattice row) of tile number `tile` along one axis. With dilation d the
    pixels of one residue class y % d form a lattice y = residue + d * i whose windows stay on
    it, so a tile covers TILE consecutive lattice rows i of one residue: min(d, size) residues
    (the others hold no pixel) of cdiv(rows, TILE) tiles each, rows = cdiv(size, d). Tiles of
    one residue are adjacent in the numbering, so neighbours share their halo in L2."""
    return tile // tl.cdiv(rows, TILE), (tile % tl.cdiv(rows, TILE)) * TILE


@triton.jit
def local_argmax_attention_tile_forward_kernel(
    query_ptr, key_ptr, value_ptr, out_ptr, score_ptr, index_ptr,
    T, C, Cv, H, W, kernel_size, dilation, scale: tl.float64, zero_border,
    q_sb, q_sc, q_sy, q_sx,
    k_sb, k_st, k_sc, k_sy, k_sx,
    v_sb, v_st, v_sc, v_sy, v_sx,
    ACC: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr = False,
):
    """One program: a TILE_H x TILE_W tile of query pixels of one frame (on one dilation
    lattice) against the (TILE_H + K - 1) x (TILE_W + K - 1) halo of key pixels that holds all
    their windows, BLOCK_N halo columns at a time: S = Q (M x C) @ K_halo (C x BLOCK_N) with
    tl.dot over BLOCK_C-channel blocks, then each query row masked to its own K x K band."""
    M: tl.constexpr = TILE_H * TILE_W
    rows_y = (H - 1) // dilation + 1  # cdiv(H, dilation) without overflowing H + dilation - 1
    rows_x = (W - 1) // dilation + 1
    n_res_y = tl.minimum(dilation, H)
    n_res_x = tl.minimum(dilation, W)
    tiles_x = n_res_x * tl.cdiv(rows_x, TILE_W)
    tiles = n_res_y * tl.cdiv(rows_y, TILE_H) * tiles_x
    pid = tl.program_id(0)
    frame = pid // tiles
    res_y, first_y = _lattice_tile((pid % tiles) // tiles_x, rows_y, TILE_H)
    res_x, first_x = _lattice_tile(pid % tiles_x, rows_x, TILE_W)
    b = (frame // T).to(tl.int64)
    t = (frame % T).to(tl.int64)
    step = tl.cast(dilation, tl.int64)

    # The query tile, flattened row-major: pixel m is lattice row a, column e of the tile.
    m = tl.arange(0, M)
    a = m // TILE_W
    e = m % TILE_W
    qy = res_y + step * (first_y + a)
    qx = res_x + step * (first_x + e)
    q_in = (qy < H) & (qx < W)
    qy = tl.where(q_in, qy, 0).to(tl.int32)  # in-frame pixels fit int32; the rest are masked
    qx = tl.where(q_in, qx, 0).to(tl.int32)

    radius = kernel_size // 2
    halo_w = TILE_W + kernel_size - 1
    halo_size = (TILE_H + kernel_size - 1) * halo_w
    query_ptr += b * q_sb
    key_ptr += b * k_sb + t * k_st
    c = tl.arange(0, BLOCK_C)
    q_off = qy.to(tl.int64)[:, None] * q_sy + qx.to(tl.int64)[:, None] * q_sx + c.to(tl.int64)[None, :] * q_sc
    scale_acc = tl.full([], scale, ACC)  # in the accumulation type: a float64 scale stays exact

    best = tl.full([M], float("-inf"), ACC)
    best_n = tl.full([M], NO_COLUMN, tl.int32)
    for n0 in range(0, halo_size, BLOCK_N):
        # Halo columns in row-major order: for every query, the candidate number j grows with
        # the column n, so "lowest j among equal maxima" is "lowest n among equal maxima".
        n = n0 + tl.arange(0, BLOCK_N)
        hy = n // halo_w
        hx = n % halo_w
        ky = res_y + step * (first_y + hy - radius)
        kx = res_x + step * (first_x + hx - radius)
        k_in = (n < halo_size) & _in_frame(ky, kx, H, W)
        k_off = ky[None, :] * k_sy + kx[None, :] * k_sx + c.to(tl.int64)[:, None] * k_sc
        dots = tl.zeros([M, BLOCK_N], ACC)
        for c0 in range(0, C, BLOCK_C):
            c_in = c0 + c < C
            q = tl.load(_channel_block(query_ptr, c0, q_sc) + q_off, mask=q_in[:, None] & c_in[None, :],
                        other=0)
            # Outside the frame the key reads as 0 and is multiplied for real (zero padding): a
            # NaN or inf query then scores NaN there too, as in the direct kernel.
            k = tl.load(_channel_block(key_ptr, c0, k_sc) + k_off, mask=c_in[:, None] & k_in[None, :],
                        other=0)
            dots = tl.dot(_dot_operand(q, ACC, INTERPRETED), _dot_operand(k, ACC, INTERPRETED), dots)
        s = dots * scale_acc
        # Query m's band: halo rows a .. a + K - 1 and columns e .. e + K - 1; candidates outside
        # the frame only with the zero border.
        di = hy[None, :] - a[:, None]
        dj = hx[None, :] - e[:, None]
        band = (di >= 0) & (di < kernel_size) & (dj >= 0) & (dj < kernel_size)
        band &= ((n < halo_size) & (k_in | zero_border))[None, :]
        s = tl.where(band, s, float("-inf"))
        chunk_best = tl.reduce(s, 1, _nan_max)
        # The lowest band column holding the maximum (a NaN maximum: the first NaN).
        at_best = band & ((s == chunk_best[:, None]) | (s != s))
        chunk_n = tl.min(tl.where(at_best, n[None, :], NO_COLUMN), axis=1)
        # Chunks come in increasing n, so an equal maximum of a later chunk never replaces.
        beats = (chunk_best > best) | ((chunk_best != chunk_best) & (best == best))
        take = (chunk_n < NO_COLUMN) & ((best_n == NO_COLUMN) | beats)
        best = tl.where(take, chunk_best, best)
        best_n = tl.where(take, chunk_n, best_n)

    # Back from the halo column to the candidate number and its pixel.
    di = best_n // halo_w - a
    dj = best_n % halo_w - e
    best_j = di * kernel_size + dj
    map_off = _map_offset(frame, qy, qx, H, W)
    tl.store(score_ptr + map_off, best.to(score_ptr.dtype.element_ty), mask=q_in)
    tl.store(index_ptr + map_off, best_j.to(tl.int64), mask=q_in)
    sy, sx, selected = _candidate(qy, qx, best_j, kernel_size, dilation, H, W, 1)
    selected &= q_in
    value_ptr += b * v_sb + t * v_st
    v_off = sy[:, None] * v_sy + sx[:, None] * v_sx + c.to(tl.int64)[None, :] * v_sc
    frame_size = tl.cast(H, tl.int64) * W
    out_ptr += frame.to(tl.int64) * Cv * frame_size
    out_off = (qy.to(tl.int64) * W + qx)[:, None] + c.to(tl.int64)[None, :] * frame_size
    for c0 in range(0, Cv, BLOCK_C):
        c_in = (c0 + c < Cv)[None, :]
        v = tl.load(_channel_block(value_ptr, c0, v_sc) + v_off, mask=c_in & selected[:, None], other=0)
        tl.store(_channel_block(out_ptr, c0, frame_size) + out_off,
                 (best[:, None] * v.to(ACC)).to(out_ptr.dtype.element_ty), mask=c_in & q_in[:, None])


@triton.jit
def local_argmax_attention_score_grad_kernel(
    grad_out_ptr, grad_score_ptr, value_ptr, index_ptr, g_ptr,
    T, Cv, H, W, kernel_size, dilation, scale: tl.float64,
    go_sb, go_st, go_sc, go_sy, go_sx,
    v_sb, v_st, v_sc, v_sy, v_sx,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    frame, y, x, in_frame = _pixel_block(tl.program_id(0), H, W, BLOCK_P)
    b = (frame // T).to(tl.int64)
    t = (frame % T).to(tl.int64)
    map_off = _map_offset(frame, y, x, H, W)
    j = tl.load(index_ptr + map_off, mask=in_frame, other=0).to(tl.int32)
    sy, sx, selected = _candidate(y, x, j, kernel_size, dilation, H, W, 1)
    selected &= in_frame
    c = tl.arange(0, BLOCK_C)
    grad_out_ptr += b * go_sb + t * go_st
    value_ptr += b * v_sb + t * v_st
    go_off = _offsets(c, y, x, go_sc, go_sy, go_sx)
    v_off = _offsets(c, sy, sx, v_sc, v_sy, v_sx)
    g = tl.load(grad_score_ptr + map_off, mask=in_frame, other=0).to(ACC)
    for c0 in range(0, Cv, BLOCK_C):
        mask = (c0 + c < Cv)[:, None]
        go = tl.load(_channel_block(grad_out_ptr, c0, go_sc) + go_off, mask=mask & in_frame[None, :], other=0)
        v = tl.load(_channel_block(value_ptr, c0, v_sc) + v_off, mask=mask & selected[None, :], other=0)
        g += tl.sum(go.to(ACC) * v.to(ACC), axis=0)
    tl.store(g_ptr + map_off, (scale * g).to(ACC), mask=in_frame)


@triton.jit
def local_argmax_attention_query_grad_kernel(
    g_ptr, index_ptr, key_ptr, grad_query_ptr,
    T, C, H, W, kernel_size, dilation,
    k_sb, k_st, k_sc, k_sy, k_sx,
    gq_sb, gq_sc, gq_sy, gq_sx,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, y, x, in_frame = _pixel_block(tl.program_id(0), H, W, BLOCK_P)
    b = b.to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = (c < C)[:, None]
    key_ptr += b * k_sb
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for t in range(T):
        map_off = _map_offset(b * T + t, y, x, H, W)
        j = tl.load(index_ptr + map_off, mask=in_frame, other=0).to(tl.int32)
        g = tl.load(g_ptr + map_off, mask=in_frame, other=0)
        sy, sx, selected = _candidate(y, x, j, kernel_size, dilation, H, W, 1)
        selected &= in_frame
        k = tl.load(key_ptr + tl.cast(t, tl.int64) * k_st + _offsets(c, sy, sx, k_sc, k_sy, k_sx),
                    mask=c_mask & selected[None, :], other=0)
        # A zero-padded candidate has nothing to differentiate: skipped, not multiplied by 0,
        # so that an inf or NaN g does not leak into the query gradient.
        acc += tl.where(selected[None, :], g[None, :] * k.to(ACC), 0)
    out_off = _offsets(c, y, x, gq_sc, gq_sy, gq_sx)
    tl.store(grad_query_ptr + b * gq_sb + out_off, acc.to(grad_query_ptr.dtype.element_ty),
             mask=c_mask & in_frame[None, :])


@triton.jit
def local_argmax_attention_gather_grad_kernel(
    weight_ptr, source_ptr, index_ptr, grad_ptr,
    T, C, H, W, kernel_size, dilation,
    s_sb, s_st, s_sc, s_sy, s_sx,
    gr_sb, gr_st, gr_sc, gr_sy, gr_sx,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad[t, :, k] = sum over j, in order, of weight[t, p] * source[t, :, p] for the query
    pixels p whose candidate j is k and whose index is j."""
    frame, y, x, in_frame = _pixel_block(tl.program_id(0), H, W, BLOCK_P)
    b = (frame // T).to(tl.int64)
    t = (frame % T).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = (c < C)[:, None]
    source_ptr += b * s_sb + t * s_st
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for j in range(kernel_size * kernel_size):
        py, px, inside = _candidate(y, x, j, kernel_size, dilation, H, W, -1)
        inside &= in_frame
        map_off = _map_offset(frame, py, px, H, W)
        picked = inside & (tl.load(index_ptr + map_off, mask=inside, other=-1) == j)
        # Masked loads cost no memory traffic: each query pixel picked one candidate, so on
        # average one lane in K*K loads anything here.
        w = tl.load(weight_ptr + map_off, mask=picked, other=0)
        src = tl.load(source_ptr + _offsets(c, py, px, s_sc, s_sy, s_sx), mask=c_mask & picked[None, :],
                      other=0)
        acc += w[None, :].to(ACC) * src.to(ACC)
    out_off = _offsets(c, y, x, gr_sc, gr_sy, gr_sx)
    tl.store(grad_ptr + b * gr_sb + t * gr_st + out_off, acc.to(grad_ptr.dtype.element_ty),
             mask=c_mask & in_frame[None, :])


# ---------------------------------------------------------------------------------------
# Dispatch: the formulation and launch configurations, the cost model that picks them, and the
# list of every configuration for compile checks.

BLOCK_P = 128  # pixels per program: one per lane of 4 warps, a 512-byte fp32 run per channel
NUM_WARPS = 4
KERNELS = {
    "forward": local_argmax_attention_forward_kernel,
    "tile_forward": local_argmax_attention_tile_forward_kernel,
    "score_grad": local_argmax_attention_score_grad_kernel,
    "query_grad": local_argmax_attention_query_grad_kernel,
    "gather_grad": local_argmax_attention_gather_grad_kernel,
}
# The largest channel tile of each kernel. A tile holds BLOCK_C values per lane (BLOCK_C
# accumulators and BLOCK_C loads in flight in the backward), so these caps keep registers
# near or under 128 per thread for good occupancy. The forward would rather keep a 64-channel
# query in registers across the K*K candidates, but at 32 or 64 channels some dtypes spill
# (Triton 3.9: float16 at 32, float64 at 64; the GPU image's 3.6: float32 and float64 at 64),
# so it streams the query from L1 in 16-channel tiles. The backward kernels split channels
# over the grid (query_grad, gather_grad) or loop over them (score_grad).
MAX_CHANNEL_BLOCK = {"forward": 16, "score_grad": 32, "query_grad": 16, "gather_grad": 16}
MIN_CHANNEL_BLOCK = 16
# Types of the non-int scalar arguments: scale is float64 so that float64 inputs see it exactly.
SCALAR_TYPES = {"scale": "fp64", "zero_border": "u1"}

# The tile forward. (TILE_H, TILE_W) query tiles it may use; each program holds a
# [TILE_H * TILE_W, BLOCK_N] float32 block of scores, TILE_ELEMENTS values: 32 registers a
# thread on 4 warps (8192 spill with 16 channels a step).
FORMULATIONS = ("direct", "tile")
TILE_SHAPES = ((8, 8), (8, 16))
TILE_ELEMENTS = 4096
# The dtypes the dispatcher may run tiles in (float32 only with allow_tf32); a forced tile
# also runs float64 (on the float64 MMA path: a test hook, not for speed, never compile-checked).
TILE_DTYPE_NAMES = ("float16", "bfloat16", "float32")
# The tile forward's channel block, the depth of each tl.dot step, per dtype: the tensor cores'
# k (16 for 16-bit operands, 8 for tf32). Deeper steps spill the [64, 64] score block with
# Triton 3.9 on 4 warps: 32 channels of bfloat16, 16 of float32 (with 2 or 3 pipeline stages).
TILE_CHANNEL_BLOCK = {"float16": 16, "bfloat16": 16, "float32": 8, "float64": 8}
# Halo columns are numbered in int32 below NO_COLUMN: (TILE_H + K - 1) * (TILE_W + K - 1) must
# stay under it. Beyond this kernel size the direct kernel runs (and would win anyway).
TILE_MAX_KERNEL_SIZE = 255
# float32 tiles multiply in tf32 on the tensor cores (10-bit mantissas): scores change in their
# 4th digit and near-ties can pick another candidate. Off by default; set
# `vsr_kernels.triton.local_argmax_attention.allow_tf32 = True` to let the dispatcher use them.
allow_tf32 = False
# Tests and benchmarks force a formulation here ("direct" or "tile"; None: the cost model
# decides). A forced "tile" runs wherever the tile kernel can (any dtype; float32 in tf32 on a
# GPU, exactly in the interpreter), with the tile shape the cost model prefers.
forced_formulation = None
# The target the dispatcher's cost model assumes (the benchmark machine).
DISPATCH_TARGET = _cost.H100
# The sizes the dispatcher's predictions are made for: per-pixel work barely depends on
# B, T, H, W, so one frame of the benchmark's size stands for all.
_NOMINAL_FRAME = (1, 1, 180, 320)


def _element_size(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def predicted_work(formulation: str, dtype_name: str, B: int, T: int, C: int, Cv: int, H: int, W: int,
                   kernel_size: int, tile=(8, 8)) -> _cost.Work:
    """What the forward must do in `formulation`, counted from the kernels above (see _cost.py
    for how it becomes a time). Both formulations move the same DRAM bytes; the L2 bytes count
    each program's key window or halo and, for the value gather, the same region (random
    selections touch a sector per element; smooth ones far fewer); scalar loads are one element
    per lane (their addresses are data-dependent or not provably contiguous)."""
    e = _element_size(dtype_name)
    frames, pixels = B * T, B * T * H * W
    K2 = kernel_size * kernel_size
    minimal = B * C * H * W * e + pixels * (C + 2 * Cv) * e + pixels * (e + 8)
    if formulation == "direct":
        block_c = launch_config("forward", C).block_c
        in_registers = C <= block_c
        window = kernel_size * (1 + (kernel_size - 1) / BLOCK_P)  # key rows a program pulls per pixel row
        l2 = B * C * H * W * e + window * pixels * (C + Cv) * e + pixels * Cv * e + pixels * (e + 8)
        loads_per_pixel = K2 * C * (1 if in_registers else 2) + (C if in_registers else 0) + 2 * Cv + 2
        # Per candidate: a step, masks, pointer and the argmax update (~20 ops) and, per channel,
        # the conversions of non-float32 operands to float32 (one or two) and an address add.
        convert = 0 if dtype_name in ("float32", "float64") else (1 if in_registers else 2)
        alu = pixels * K2 * (20 + C * (convert + 1)) + pixels * Cv * 4
        fma_flops = 2 * pixels * K2 * C * (2 if dtype_name == "float64" else 1)
        return _cost.Work(minimal, l2, pixels * loads_per_pixel / 32, 0, dtype_name, fma_flops, alu)
    tile_h, tile_w = tile
    M = tile_h * tile_w
    block_n = TILE_ELEMENTS // M
    halo = (tile_h + kernel_size - 1) * (tile_w + kernel_size - 1)
    chunks = -(-halo // block_n)
    block_c = TILE_CHANNEL_BLOCK[dtype_name]
    depth = -(-C // block_c) * block_c
    programs = frames * -(-H // tile_h) * -(-W // tile_w)
    halo_factor = halo / M
    l2 = B * C * H * W * e + pixels * (halo_factor * (C + Cv) + Cv) * e + pixels * (e + 8)
    # Per program: the query block and the key halo block of every chunk and channel block,
    # then the value gather and the output, one element per lane.
    loads = programs * (chunks * (M + block_n) * depth + 2 * M * Cv) / 32
    # Per score element: scale, band (2 subtractions, 4 compares, 2 ands), select, NaN max,
    # equal-or-NaN, select of the column, min: 13. Per loaded element: an address add and a mask.
    alu = programs * (chunks * M * block_n * 13 + chunks * (M + block_n) * depth * 2 + 4 * M * Cv)
    tensor = 2.0 * programs * chunks * M * block_n * depth
    if dtype_name == "float64":  # no float64 tensor-core path at these shapes: FMAs
        return _cost.Work(minimal, l2, loads, 0, dtype_name, tensor, alu)
    return _cost.Work(minimal, l2, loads, tensor, dtype_name, 0, alu)


def predict(formulation: str, dtype_name: str, B: int, T: int, C: int, Cv: int, H: int, W: int,
            kernel_size: int, tile=(8, 8), hardware: _cost.Hardware = None) -> _cost.Prediction:
    work = predicted_work(formulation, dtype_name, B, T, C, Cv, H, W, kernel_size, tile)
    return _cost.predict(work, hardware or DISPATCH_TARGET)


@functools.lru_cache(maxsize=None)
def best_tile(dtype_name: str, C: int, kernel_size: int) -> tuple:
    """The tile shape of TILE_SHAPES the cost model predicts fastest for these sizes."""
    return min(TILE_SHAPES, key=lambda tile: predict("tile", dtype_name, *_NOMINAL_FRAME[:2], C, C,
                                                     *_NOMINAL_FRAME[2:], kernel_size, tile).seconds)


@functools.lru_cache(maxsize=None)
def _preferred_formulation(dtype_name: str, C: int, kernel_size: int, tf32: bool) -> str:
    if dtype_name == "float64" or (dtype_name == "float32" and not tf32):
        return "direct"
    if kernel_size > TILE_MAX_KERNEL_SIZE:
        return "direct"
    times = {f: predict(f, dtype_name, *_NOMINAL_FRAME[:2], C, C, *_NOMINAL_FRAME[2:], kernel_size,
                        best_tile(dtype_name, C, kernel_size)).seconds for f in FORMULATIONS}
    return min(FORMULATIONS, key=times.get)


def formulation(dtype: torch.dtype, C: int, kernel_size: int) -> str:
    """"direct" or "tile": the forward the ops launch for these inputs. float16 and bfloat16
    take the one the cost model predicts faster; float32 the direct kernel unless allow_tf32;
    float64 the direct kernel; `forced_formulation` overrides all but the kernel size bound."""
    if forced_formulation is not None:
        if forced_formulation not in FORMULATIONS:
            raise ValueError(f"forced_formulation must be one of {FORMULATIONS} or None, "
                             f"got {forced_formulation!r}")
        return "direct" if kernel_size > TILE_MAX_KERNEL_SIZE else forced_formulation
    return _preferred_formulation(str(dtype).removeprefix("torch."), C, kernel_size, allow_tf32)


def launch_config(kernel: str, channels: int, tile=None, dtype_name=None) -> _launch.LaunchConfig:
    """What `kernel` is launched with for `channels` channels (C for the forward, query_grad
    and the key gather; Cv for score_grad and the value gather); for the tile forward, its
    `tile` (TILE_H, TILE_W) and the data's `dtype_name`, which set its blocks."""
    if kernel == "tile_forward":
        constexprs = dict(TILE_H=tile[0], TILE_W=tile[1], BLOCK_N=TILE_ELEMENTS // (tile[0] * tile[1]),
                          BLOCK_C=TILE_CHANNEL_BLOCK[dtype_name])
        return _launch.LaunchConfig(kernel, tuple(sorted(constexprs.items())), NUM_WARPS)
    block_c = min(max(triton.next_power_of_2(max(channels, 1)), MIN_CHANNEL_BLOCK), MAX_CHANNEL_BLOCK[kernel])
    constexprs = {"BLOCK_C": block_c, "BLOCK_P": BLOCK_P}
    if kernel == "forward":
        constexprs["QUERY_IN_REGISTERS"] = channels <= block_c
    return _launch.LaunchConfig(kernel, tuple(sorted(constexprs.items())), NUM_WARPS)


def forward_config(dtype: torch.dtype, C: int, kernel_size: int) -> _launch.LaunchConfig:
    """The forward's launch: the formulation's kernel and its config."""
    if formulation(dtype, C, kernel_size) == "direct":
        return launch_config("forward", C)
    dtype_name = str(dtype).removeprefix("torch.")
    return launch_config("tile_forward", C, tile=best_tile(dtype_name, C, kernel_size), dtype_name=dtype_name)


def all_launch_configs() -> list:
    """Every LaunchConfig the dispatcher can produce, whatever the channel counts, kernel sizes,
    dtypes, allow_tf32 and forced_formulation."""
    largest = max(MAX_CHANNEL_BLOCK.values())
    channel_counts = [2**i for i in range(largest.bit_length())] + [largest + 1]
    configs = {launch_config(kernel, channels) for kernel in KERNELS if kernel != "tile_forward"
               for channels in channel_counts}
    configs |= {launch_config("tile_forward", channels, tile=best_tile(dtype_name, channels, kernel_size),
                              dtype_name=dtype_name)
                for dtype_name in TILE_DTYPE_NAMES for channels in channel_counts
                for kernel_size in range(1, TILE_MAX_KERNEL_SIZE + 1, 2)}
    return sorted(configs)


# What the ops call to launch a kernel (tests replace it to record the launches).
launch = _launch.launcher(KERNELS)


def _pointer_types(kernel: str, dtype: torch.dtype) -> list:
    """The element types of `kernel`'s pointer arguments, one dict per way the ops launch it."""
    data, acc = str(_launch.TL_DTYPES[dtype]), str(_launch.TL_DTYPES[_launch.accumulation_dtype(dtype)])
    if kernel in ("forward", "tile_forward"):
        return [dict(query_ptr=data, key_ptr=data, value_ptr=data, out_ptr=data, score_ptr=data,
                     index_ptr="i64")]
    if kernel == "score_grad":
        return [dict(grad_out_ptr=data, grad_score_ptr=data, value_ptr=data, index_ptr="i64", g_ptr=acc)]
    if kernel == "query_grad":
        return [dict(g_ptr=acc, index_ptr="i64", key_ptr=data, grad_query_ptr=data)]
    # The key gather weighs by g, the value gather by the score.
    return [dict(weight_ptr=weight, source_ptr=data, index_ptr="i64", grad_ptr=data)
            for weight in sorted({acc, data})]


def compile_all(archs=(80, 90), dtype_names=_launch.FLOAT_DTYPE_NAMES) -> list:
    """Compiles every launch the ops can make for the CUDA compute capabilities `archs`:
    one report per compiled kernel (see _launch.compile_all). Needs a process without
    TRITON_INTERPRET=1, such as _compile.call_without_interpreter gives."""
    return _launch.compile_all(KERNELS, all_launch_configs(), _pointer_types, SCALAR_TYPES, archs,
                               dtype_names, config_dtype_names)


def config_dtype_names(config: _launch.LaunchConfig) -> tuple:
    """The dtypes the dispatcher launches `config` with: the tile forward only in the
    TILE_DTYPE_NAMES of its channel block, every other kernel in all."""
    if config.kernel == "tile_forward":
        return tuple(n for n in TILE_DTYPE_NAMES if TILE_CHANNEL_BLOCK[n] == config.block_c)
    return _launch.FLOAT_DTYPE_NAMES


def _pixel_blocks(H: int, W: int) -> int:
    return _launch.row_blocks(H, W, BLOCK_P)


def _lattice_tiles(size: int, dilation: int, tile: int) -> int:
    """Tiles along one axis of the tile forward (see _lattice_tile): min(d, size) residues of
    cdiv(cdiv(size, d), tile) tiles."""
    return min(dilation, size) * triton.cdiv(triton.cdiv(size, dilation), tile)


def _forward_programs(config: _launch.LaunchConfig, H: int, W: int, dilation: int) -> int:
    """Programs per frame of the forward `config`."""
    if config.kernel == "forward":
        return _pixel_blocks(H, W)
    constexprs = dict(config.constexprs)
    return (_lattice_tiles(H, dilation, constexprs["TILE_H"])
            * _lattice_tiles(W, dilation, constexprs["TILE_W"]))


# ---------------------------------------------------------------------------------------
# The ops.

# The bounds the C++ entry points enforce (csrc/kernels/local_argmax_attention.h): K*K and the
# candidate numbers fit int32; the window steps are int64 in the kernels.
MAX_KERNEL_SIZE = 32767
MAX_DILATION = 2**31 - 1


def _check_window(kernel_size: int, dilation: int) -> None:
    if not (1 <= kernel_size <= MAX_KERNEL_SIZE and kernel_size % 2 == 1):
        raise ValueError(f"local_argmax_attention_triton: kernel_size must be odd in [1, {MAX_KERNEL_SIZE}], "
                         f"got {kernel_size}")
    if not 1 <= dilation <= MAX_DILATION:
        raise ValueError(f"local_argmax_attention_triton: dilation must be in [1, {MAX_DILATION}], got {dilation}")


@torch.library.custom_op("vsr_kernels::local_argmax_attention_triton", mutates_args=())
def local_argmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int,
                           dilation: int, scale: float, zero_border: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_window(kernel_size, dilation)
    _launch.check_inputs("local_argmax_attention_triton", {
        "query": (query, "B C H W"), "key": (key, "B T C H W"), "value": (value, "B T Cv H W")}, "query")
    B, T, C, H, W = key.shape
    Cv = value.shape[2]
    out = value.new_empty((B, T, Cv, H, W))
    score = query.new_empty((B, T, H, W))
    index = query.new_empty((B, T, H, W), dtype=torch.int64)
    if score.numel() == 0:
        return out, score, index
    q_strides = _launch.strides(query)
    with _launch.device_guard(query):
        config = forward_config(query.dtype, C, kernel_size)
        launch(config, (B * T * _forward_programs(config, H, W, dilation),),
               query, key, value, out, score, index, T, C, Cv, H, W, kernel_size, dilation, scale,
               zero_border, q_strides[0], *q_strides[2:], *_launch.strides(key), *_launch.strides(value),
               dtype=query.dtype)
    return out, score, index


@torch.library.custom_op("vsr_kernels::local_argmax_attention_triton_backward", mutates_args=())
def local_argmax_attention_backward(grad_out: torch.Tensor, grad_score: torch.Tensor, query: torch.Tensor,
                                    key: torch.Tensor, value: torch.Tensor, score: torch.Tensor,
                                    index: torch.Tensor, kernel_size: int, dilation: int, scale: float,
                                    zero_border: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # zero_border needs no kernel argument here: the index already says which candidate was
    # picked, and one outside the frame has no key or value to receive a gradient.
    _check_window(kernel_size, dilation)
    maps = "B T H W"
    _launch.check_inputs("local_argmax_attention_triton_backward", {
        "grad_out": (grad_out, "B T Cv H W"), "grad_score": (grad_score, maps), "query": (query, "B C H W"),
        "key": (key, "B T C H W"), "value": (value, "B T Cv H W"), "score": (score, maps),
        "index": (index, maps)}, "query")
    if index.dtype != torch.int64:
        raise ValueError(f"local_argmax_attention_triton_backward: index must be int64, got {index.dtype}")
    B, T, C, H, W = key.shape
    Cv = value.shape[2]
    grad_query, grad_key, grad_value = (x.new_empty(x.shape) for x in (query, key, value))
    if B * H * W == 0:
        return grad_query.zero_(), grad_key.zero_(), grad_value.zero_()
    grad_score, score, index = grad_score.contiguous(), score.contiguous(), index.contiguous()
    g = torch.empty((B, T, H, W), dtype=_launch.accumulation_dtype(query.dtype), device=query.device)
    frames_grid = B * T * _pixel_blocks(H, W)
    window = (H, W, kernel_size, dilation)
    with _launch.device_guard(query):
        launch(launch_config("score_grad", Cv), (frames_grid,),
               grad_out, grad_score, value, index, g, T, Cv, *window, scale,
               *_launch.strides(grad_out), *_launch.strides(value), dtype=query.dtype)
        config = launch_config("query_grad", C)
        gq_strides = _launch.strides(grad_query)
        launch(config, (B * _pixel_blocks(H, W), triton.cdiv(C, config.block_c)),
               g, index, key, grad_query, T, C, *window, *_launch.strides(key), gq_strides[0],
               *gq_strides[2:], dtype=query.dtype)
        for weight, source, grad, channels in ((g, query, grad_key, C), (score, grad_out, grad_value, Cv)):
            config = launch_config("gather_grad", channels)
            launch(config, (frames_grid, triton.cdiv(channels, config.block_c)),
                   weight, source, index, grad, T, channels, *window, *_launch.strides(source),
                   *_launch.strides(grad), dtype=query.dtype)
    return grad_query, grad_key, grad_value
