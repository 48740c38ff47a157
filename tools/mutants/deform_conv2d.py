"""Mutants of deform_conv2d: small, realistic single-line bugs, per backend and kind.

Kinds (tools/mutants/__init__.py): "window radius" stands for the sampling-point arithmetic
here (kernel point, stride, padding, dilation), "tie rule" for the boundary rule of the
bilinear sampler (which neighbour counts as inside), "dropped mask" for an out-of-bounds or
masked read, "missing check", "swapped stride", "dropped gradient".
"""
from . import Mutant

REF = "vsr_kernels/reference/deform_conv2d.py"
OPS = "vsr_kernels/ops/deform_conv2d.py"
TRI = "vsr_kernels/triton/deform_conv2d.py"
SAMPLER = "csrc/common/bilinear.h"
MATH = "csrc/kernels/deform_conv2d.h"
GLUE = "csrc/glue/deform_conv2d.h"
CPU = "csrc/cpu/deform_conv2d.cpp"
AVX512 = "csrc/cpu/deform_conv2d_avx512.cpp"

MUTANTS = [
    # Python checks and autograd.
    Mutant("checks-mask-spatial", OPS, "if tuple(mask.shape[2:]) != (H_out, W_out):",
           "if mask.shape[2] != H_out:", "checks", "missing check", "mask width unchecked"),
    Mutant("autograd-drop-mask-grad", OPS, "grad_mask if mask is not None else None,",
           "torch.zeros_like(grad_mask) if mask is not None else None,", "checks", "dropped gradient"),
    Mutant("autograd-swap-geometry", OPS, "ctx.geometry = (stride, padding, dilation)",
           "ctx.geometry = (padding, stride, dilation)", "checks", "swapped stride"),
    # Triton kernels (the interpreter on CPU).
    Mutant("triton-edge-rule", TRI, "    inside = ok & (y > -1.0) & (y < H) & (x > -1.0) & (x < W)",
           "    inside = ok & (y >= -1.0) & (y < H) & (x > -1.0) & (x < W)", "triton", "tie rule"),
    Mutant("triton-dilation", TRI, "    y = (ho * sh - ph)[:, None].to(ACC) + (k // KW * dh)[None, :].to(ACC) + dy",
           "    y = (ho * sh - ph)[:, None].to(ACC) + (k // KW * dw)[None, :].to(ACC) + dy", "triton",
           "window radius"),
    Mutant("triton-neighbour-mask", TRI, "        valid = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)\n"
           "        val = tl.load",
           "        valid = inside & (yy >= 0) & (yy < H) & (xx >= 0)\n        val = tl.load", "triton",
           "dropped mask", "reads the neighbour right of the last column"),
    Mutant("triton-swap-offset", TRI, "    dx = tl.load(off_base + (ch + 1)[None, :].to(tl.int64) * HoWo + pos",
           "    dx = tl.load(off_base + (ch + 0)[None, :].to(tl.int64) * HoWo + pos", "triton", "swapped stride"),
    Mutant("triton-drop-offset-grad", TRI, "                g_y += tl.sum(gs * (vy + poison), axis=1)",
           "                g_y += 0.0 * tl.sum(gs * (vy + poison), axis=1)", "triton", "dropped gradient"),
    Mutant("triton-check-grad-out", TRI, '"grad_out": (B, Cout, Ho, Wo)}', '"grad_out": None}', "triton",
           "missing check"),
    # C++: the shared sampler, the per-point math, the glue and the CPU launcher.
    Mutant("cpp-edge-rule", SAMPLER, "  b.sampled = inside && y > acc_t(-1) && x > acc_t(-1);",
           "  b.sampled = inside;", "cpu", "tie rule"),
    Mutant("cpp-neighbour-mask", SAMPLER, "  const bool ok_x[2] = {x0 >= 0, x0 + 1 <= W - 1};",
           "  const bool ok_x[2] = {x0 >= 0, x0 + 1 <= W};", "cpu", "dropped mask",
           "reads one past the last column"),
    Mutant("cpp-dilation", MATH, "  *x = acc_t(wo * g.stride_w - g.pad_w + j * g.dil_w) + dx;",
           "  *x = acc_t(wo * g.stride_w - g.pad_w + j * g.dil_h) + dx;", "cpu", "window radius"),
    Mutant("cpp-swap-offset-channel", MATH, "  const acc_t dx = vsr_kernels::convert<acc_t>(offset[(cy + 1) * oc + p * op]);",
           "  const acc_t dx = vsr_kernels::convert<acc_t>(offset[cy * oc + p * op]);", "cpu", "swapped stride"),
    Mutant("cpp-check-mask", GLUE, '    check_shape(op, m, {g.B, g.offset_groups * kk, ho, wo}, "(B, G kh kw, Ho, Wo) with G from offset");',
           "", "cpu", "missing check"),
    Mutant("cpp-check-grad-out", GLUE, '  check_shape(op, go, {g.B, g.Cout, g.Ho, g.Wo}, "(B, Cout, Ho, Wo) of the output");',
           "", "cpu", "missing check"),
    Mutant("cpp-drop-mask-grad", CPU, "              gm[k * n + q] += gcv * vrow[q];",
           "              gm[k * n + q] += 0 * gcv * vrow[q];", "cpu", "dropped gradient"),
    Mutant("cpp-drop-scatter", CPU, "                if (sq.at.valid >> nb & 1u) gplane[sq.at.offset[nb]] += gs * sq.at.weight[nb];",
           "                if (nb < 3 && (sq.at.valid >> nb & 1u)) gplane[sq.at.offset[nb]] += gs * sq.at.weight[nb];",
           "cpu", "dropped gradient"),
    # The AVX-512 float32 tile kernels (killed by the float32 tests that force them).
    Mutant("cpp-avx512-edge-rule", AVX512,
           "  t.sampled = t.inside & _mm512_cmp_ps_mask(y, minus1, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x, minus1, _CMP_GT_OQ);",
           "  t.sampled = t.inside & _mm512_cmp_ps_mask(y, minus1, _CMP_GT_OQ);", "cpu", "tie rule"),
    Mutant("cpp-avx512-edge-reads", AVX512, "  if (p.any_edge)", "  if (false)", "cpu", "dropped mask",
           "skips the points with one neighbour of a row outside the plane"),
    Mutant("cpp-avx512-scatter-edge", AVX512,
           "            if (t.valid[nb] >> l & 1u) gplane[o[l] + d[nb]] += s[nb][l];",
           "            if (nb < 3 && (t.valid[nb] >> l & 1u)) gplane[o[l] + d[nb]] += s[nb][l];", "cpu",
           "dropped gradient"),
    Mutant("cpp-avx512-gemm-strides", AVX512, "      const __m512 a = _mm512_set1_ps(A[r * a_m + k * a_k]);",
           "      const __m512 a = _mm512_set1_ps(A[r * a_k + k * a_m]);", "cpu", "swapped stride"),
]
