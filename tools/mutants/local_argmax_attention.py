"""Mutants of local_argmax_attention: small, realistic single-line bugs, one kind per backend.

Fragments name today's files; when a file moves (issue 5's layout), update the path here:
tools/mutate.py reports a fragment it cannot find as "stale", never as survived.
"""
from . import Mutant

REF = "vsr_kernels/reference/local_argmax_attention.py"
OPS = "vsr_kernels/ops/local_argmax_attention.py"
CHECKS = "vsr_kernels/ops/_checks.py"
TRI = "vsr_kernels/triton/local_argmax_attention.py"
MATH = "csrc/kernels/local_argmax_attention.h"
GLUE = "csrc/torch_glue.h"
CPU = "csrc/cpu/local_argmax_attention.cpp"
SIMD = "csrc/cpu/local_argmax_attention_simd.h"
TILES = "csrc/cpu/local_argmax_attention_tiles.h"
GLUE_OP = "csrc/glue/local_argmax_attention.h"
COMMON = "csrc/common/frames.h"
CUDA = "csrc/cuda/local_argmax_attention.cu"

MUTANTS = [
    # The reference (the oracle): tested against the loop oracle.
    Mutant("ref-tie-last", REF, "index = is_best.to(torch.uint8).argmax(dim=2)",
           "index = is_best.shape[2] - 1 - is_best.to(torch.uint8).flip(2).argmax(dim=2)",
           "reference", "tie rule"),
    Mutant("ref-radius", REF, "pad = (kernel_size // 2) * dilation", "pad = (kernel_size // 2) * dilation + 1",
           "reference", "window radius"),
    Mutant("ref-mask-dilation", REF, "inside = _inside_frame(H, W, kernel_size, dilation, query.device)",
           "inside = _inside_frame(H, W, kernel_size, 1, query.device)", "reference", "dropped mask"),
    Mutant("ref-swap-hw", REF, "cols = F.unfold(frames.reshape(B * T, C, H, W), kernel_size, dilation=dilation, padding=pad)",
           "cols = F.unfold(frames.transpose(-1, -2).reshape(B * T, C, H, W), kernel_size, dilation=dilation, padding=pad)",
           "reference", "swapped stride"),
    Mutant("ref-detach-score", REF, "out = score[:, :, None] * picked", "out = score.detach()[:, :, None] * picked",
           "reference", "dropped gradient"),
    # Python checks and autograd.
    Mutant("checks-value-H", OPS, 'for dim, letter in ((0, "B"), (1, "T"), (3, "H"), (4, "W")):',
           'for dim, letter in ((0, "B"), (1, "T"), (4, "W")):', "checks", "missing check"),
    Mutant("checks-only-smaller", CHECKS, "if value.shape[dim] != ref.shape[ref_dim]:",
           "if value.shape[dim] < ref.shape[ref_dim]:", "checks", "missing check",
           "rejects sizes too small only"),
    Mutant("autograd-drop-value-grad", OPS, "return (*grads, None, None, None, None)",
           "return (grads[0], grads[1], torch.zeros_like(grads[2]), None, None, None, None)",
           "checks", "dropped gradient"),
    # Triton kernels (the interpreter on CPU).
    Mutant("triton-tie-last", TRI, "beats = (s > best) | ((s != s) & (best == best))",
           "beats = (s >= best) | ((s != s) & (best == best))", "triton", "tie rule"),
    Mutant("triton-radius", TRI, "    r = kernel_size // 2\n", "    r = kernel_size // 2 + 1\n", "triton",
           "window radius"),
    Mutant("triton-value-mask", TRI,
           "v = tl.load(_channel_block(value_ptr, c0, v_sc) + v_off, mask=mask & selected[None, :], other=0)\n"
           "        tl.store(",
           "v = tl.load(_channel_block(value_ptr, c0, v_sc) + v_off, mask=mask & in_frame[None, :], other=0)\n"
           "        tl.store(",
           "triton", "dropped mask", "reads the value at an out-of-frame selection and multiplies it by 0"),
    Mutant("triton-key-mask", TRI,
           "k = tl.load(shifted_key_ptr + k_off, mask=(c < C)[:, None] & inside[None, :], other=0).to(ACC)",
           "k = tl.load(shifted_key_ptr + k_off, mask=(c < C)[:, None] & in_frame[None, :], other=0).to(ACC)",
           "triton", "dropped mask"),
    Mutant("triton-swap-value-stride", TRI, "v_off = _offsets(c, sy, sx, v_sc, v_sy, v_sx)\n    g = tl.load",
           "v_off = _offsets(c, sy, sx, v_sc, v_sx, v_sy)\n    g = tl.load", "triton", "swapped stride",
           "in the score-gradient kernel"),
    Mutant("triton-drop-out-grad", TRI, "g += tl.sum(go.to(ACC) * v.to(ACC), axis=0)",
           "g += 0 * tl.sum(go.to(ACC) * v.to(ACC), axis=0)", "triton", "dropped gradient"),
    # The Triton tile forward (forced by the tests' formulation parameter).
    Mutant("triton-tile-tie-merge", TRI, "beats = (chunk_best > best) | ",
           "beats = (chunk_best >= best) | ", "triton", "tie rule",
           "an equal maximum in a later halo chunk replaces the earlier one"),
    Mutant("triton-tile-tie-column", TRI,
           "chunk_n = tl.min(tl.where(at_best, n[None, :], NO_COLUMN), axis=1)",
           "chunk_n = tl.max(tl.where(at_best, n[None, :], -1), axis=1); "
           "chunk_n = tl.where(chunk_n < 0, NO_COLUMN, chunk_n)",
           "triton", "tie rule", "the last, not the first, band column holding a chunk's maximum"),
    Mutant("triton-tile-nan", TRI, "at_best = band & ((s == chunk_best[:, None]) | (s != s))",
           "at_best = band & (s == chunk_best[:, None])", "triton", "tie rule",
           "a NaN maximum finds no column"),
    Mutant("triton-tile-band", TRI, "& (dj >= 0) & (dj < kernel_size)", "& (dj >= 0) & (dj <= kernel_size)",
           "triton", "window radius",
           "each query's band one halo column too wide"),
    Mutant("triton-tile-border-mask", TRI, "band &= ((n < halo_size) & (k_in | zero_border))[None, :]",
           "band &= (n < halo_size)[None, :]", "triton", "dropped mask",
           "out-of-frame candidates compete (as zero keys) with border='exclude'"),
    Mutant("triton-tile-key-mask", TRI, "mask=c_in[:, None] & k_in[None, :],",
           "mask=c_in[:, None] & (n < halo_size)[None, :],", "triton", "dropped mask",
           "reads the key outside the frame"),
    Mutant("triton-tile-swap-key-stride", TRI, "k_off = ky[None, :] * k_sy + kx[None, :] * k_sx",
           "k_off = ky[None, :] * k_sx + kx[None, :] * k_sy", "triton", "swapped stride"),
    # C++: the CPU launcher and its per-ISA forward kernel (rebuilt in the scratch copy).
    Mutant("cpp-simd-tie-last", SIMD, "Mask take = (bj < 0) | (s > bs) | ((s != s) & (bs == bs));",
           "Mask take = (bj < 0) | (s >= bs) | ((s != s) & (bs == bs));", "cpu", "tie rule"),
    Mutant("cpp-simd-nan", SIMD, "Mask take = (bj < 0) | (s > bs) | ((s != s) & (bs == bs));",
           "Mask take = (bj < 0) | (s > bs);", "cpu", "tie rule", "NaN no longer ranks highest"),
    Mutant("cpp-simd-right-mask", SIMD, "take &= (cx >= 0) & (cx < static_cast<Lane>(width));",
           "take &= (cx >= 0);", "cpu", "dropped mask", "candidates past the right border count"),
    Mutant("cpp-simd-tail", SIMD, "for (int64_t x0 = 0; x0 < rounded_width; x0 += S::kLanes)",
           "for (int64_t x0 = 0; x0 + S::kLanes <= width; x0 += S::kLanes)", "cpu", "window radius",
           "the last, partial vector of a row is skipped"),
    Mutant("cpp-simd-column-offset", SIMD,
           "inside[i] = row_inside && offset > -width && offset < width;",
           "inside[i] = row_inside;", "cpu", "dropped mask",
           "a candidate a frame width or more away reads past the key row's padding"),
    Mutant("cpp-radius", MATH, "    const int r = kernel_size / 2;\n",
           "    const int r = (kernel_size + 1) / 2;\n", "cpu", "window radius"),
    Mutant("cpp-row-cache-slot", CPU,
           "const int64_t slot = cy / dilation % static_cast<int64_t>(tags.size()), tag",
           "const int64_t slot = cy % static_cast<int64_t>(tags.size()), tag", "cpu", "window radius",
           "dilated rows collide in the row cache: a value row is evicted while still picked"),
    Mutant("cpp-value-zero-row", SIMD,
           "const __m512 value = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), _mm512_cmpge_epi32_mask(s, zero), s, v, 4);",
           "const __m512 value = _mm512_i32gather_ps(_mm512_max_epi32(s, zero), v, 4);",
           "cpu", "dropped mask", "a zero-padded selection reads value pixel 0 (AVX-512 out gather)"),
    Mutant("cpp-simd-shift-mirror", SIMD, "((acc[I] = S::fma(qv, shifted<I - r>(lo, mid, hi), acc[I])), ...);",
           "((acc[I] = S::fma(qv, shifted<r - I>(lo, mid, hi), acc[I])), ...);", "cpu", "swapped stride",
           "the AVX-512 shifted-load path scores candidate column jx against column K - 1 - jx"),
    Mutant("cpp-swap-frame-stride", COMMON,
           "return data[t * stride.frame + c * stride.channel + p * stride.pixel];",
           "return data[t * stride.frame + c * stride.pixel + p * stride.channel];", "cpu", "swapped stride"),
    Mutant("cpp-backward-zero-ahead", CPU, "const int64_t zero_until = reach >= H - y1 ? H : y1 + reach;",
           "const int64_t zero_until = reach >= H - y1 ? H : y1;", "cpu", "window radius",
           "gradient rows below the next band are zeroed after the band's terms into them"),
    Mutant("cpp-backward-sel-swap", SIMD, "offsets[2 * j] = (j / K - r) * d, offsets[2 * j + 1] = (j % K - r) * d;",
           "offsets[2 * j] = (j % K - r) * d, offsets[2 * j + 1] = (j / K - r) * d;", "cpu", "swapped stride",
           "the backward's selected pixel swaps the candidate's row and column"),
    Mutant("cpp-backward-drop-out-grad", SIMD, "for (int64_t i = 0; i < n; ++i) g[i] = a.scale * (gs[i] + acc[i]);",
           "for (int64_t i = 0; i < n; ++i) g[i] = a.scale * gs[i];", "cpu", "dropped gradient"),
    Mutant("cpp-backward-drop-query-grad", SIMD,
           "if (const int32_t s = sel[p]; s >= 0) gqc[p] = scalar_fma(g[p], k[s], gqc[p]);",
           "if (const int32_t s = sel[p]; s >= 0) gqc[p] = gqc[p];", "cpu", "dropped gradient",
           "the scalar path's (base ISA, vector tails) query gradient"),
    Mutant("cpp-backward-block-channels", CPU, "if (std::min(c1, C) > both_end) keys(",
           "if (std::min(c1, C) > both_end + 1) keys(", "cpu", "window radius",
           "a lone key-only channel (C > Cv) gets no query or key gradient (left uninitialised)"),
    Mutant("cpp-backward-scatter-channel", SIMD,
           "gk[s + c * P] = scalar_fma(gp, q[p + c * P], gk[s + c * P]);\n            gv[",
           "gk[s + c * P] = scalar_fma(gp, q[p], gk[s + c * P]);\n            gv[", "cpu", "swapped stride",
           "the grouped scatter multiplies every channel's key gradient by the group's first query channel"),
    Mutant("cpp-tiles-ring-wrap", TILES, "return (o >= ring ? o - ring : o) * 16;",
           "return (o > ring ? o - ring : o) * 16;", "cpu", "window radius",
           "the first pixel past the ring's end is not wrapped to its start"),
    Mutant("cpp-tiles-key-scatter-weight", TILES, "_mm512_storeu_ps(gkt, _mm512_fmadd_ps(_mm512_set1_ps(g[p0 + x])",
           "_mm512_storeu_ps(gkt, _mm512_fmadd_ps(_mm512_set1_ps(score[p0 + x])", "cpu", "dropped gradient",
           "the key gradient weighted by the score instead of g"),
    Mutant("cpp-tiles-flush-early", TILES, "for (; flushed <= y - reach; ++flushed) flush(flushed);",
           "for (; flushed <= y - reach + 1; ++flushed) flush(flushed);", "cpu", "window radius",
           "a gradient row is written out while a later query row can still add to it"),
    Mutant("cpp-tiles-query-flush", TILES, "if (gq_tiles) from_tiles_clearing(gq_tiles, P, a.gq, P);", "",
           "cpu", "dropped gradient", "grad_query's accumulated tiles never written out"),
    Mutant("cpp-tiles-query-gather-neighbour", TILES,
           "r[j] = _mm512_loadu_ps(s < 0 ? zeros : keys + tile(s));",
           "r[j] = _mm512_loadu_ps(s < 0 ? zeros : keys + tile(s) + 16);", "cpu", "swapped stride",
           "grad_query's per-frame gather (frames above 8192 pixels) reads the next pixel's key tile"),
    Mutant("cpp-glue-value-H", GLUE_OP, 'check_size(op, v, 3, "H", q, 2);', "", "cpu", "missing check",
           "value's H is no longer checked against query's"),
    Mutant("cpp-glue-map-shape", GLUE_OP, 'check_shape(op, map, {B, T, H, W}, "(B, T, H, W) of key");',
           'check_shape(op, map, {B, T, H, map.tensor.size(3)}, "(B, T, H, W) of key");', "cpu", "missing check",
           "the maps' W is no longer checked"),
    Mutant("cpp-glue-unflattened", GLUE, "TORCH_CHECK(t.numel() == 0 || H <= 1 || W == 1 || t.stride(-2) == W * pixel,",
           "TORCH_CHECK(true,", "cpu", "missing check",
           "equivalent today: every launcher copies an unflattenable layout before frame_strides"),
    # The shared per-pixel math only the CUDA kernels use now (run only where a GPU is present).
    Mutant("cpp-tie-last", MATH, "if (best_j < 0 || beats(s, best)) {", "if (best_j < 0 || beats(s, best) || s == best) {",
           "cuda", "tie rule"),
    Mutant("cpp-value-mask", MATH,
           "const acc_t v = best_pixel < 0 ? acc_t(0) : vsr_kernels::convert<acc_t>(value.at(t, c, best_pixel));",
           "const acc_t v = vsr_kernels::convert<acc_t>(value.at(t, c, best_pixel));", "cuda", "dropped mask",
           "reads the value before the frame (pixel -1) for an out-of-frame selection, times 0"),
    Mutant("cpp-drop-out-grad", MATH, "return grad_score + dot<acc_t>(grad_out, t, p, value, t, sel, e.value_channels);",
           "return grad_score;", "cuda", "dropped gradient"),
    # CUDA (run only where a GPU is present).
    Mutant("cuda-batch-index", CUDA,
           "const int64_t b = i / pixels / e.frames, t = i / pixels % e.frames, p = i % pixels;\n"
           "    forward_pixel",
           "const int64_t b = i / pixels % e.frames, t = i / pixels / e.frames, p = i % pixels;\n"
           "    forward_pixel", "cuda", "swapped stride", "the forward kernel's (b, t) of element i"),
]
