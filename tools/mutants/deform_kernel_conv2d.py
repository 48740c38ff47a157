"""Mutants of deform_kernel_conv2d: small, realistic single-line bugs, per backend and kind.

Kinds (tools/mutants/__init__.py): "window radius" stands for the sampling-point arithmetic
here (the scope centre, dilation), "tie rule" for the boundary rule of the samplers (which
point counts as sampled), "dropped mask" for an out-of-bounds or edge read, "missing check",
"swapped stride", "dropped gradient". The Triton backend's mutants belong with its module
(vsr_kernels/triton/deform_kernel_conv2d.py, branch s3-dkc-triton).
"""
from . import Mutant

REF = "vsr_kernels/reference/deform_kernel_conv2d.py"
OPS = "vsr_kernels/ops/deform_kernel_conv2d.py"
SAMPLER = "csrc/common/bilinear.h"
MATH = "csrc/kernels/deform_kernel_conv2d.h"
GLUE = "csrc/glue/deform_kernel_conv2d.h"
CPU = "csrc/cpu/deform_kernel_conv2d.cpp"
CPU_SHARED = "csrc/cpu/deform_kernel_conv2d_cpu.h"
CPU_BACKWARD = "csrc/cpu/deform_kernel_conv2d_backward.cpp"
CUDA = "csrc/cuda/deform_kernel_conv2d.cu"

MUTANTS = [
    # The reference (checked against the per-output loop and the depthwise convolution).
    Mutant("reference-integer-centre", REF, "    ty = (torch.arange(kh, device=dev, dtype=dtype) + (Sh - kh) / 2)",
           "    ty = (torch.arange(kh, device=dev, dtype=dtype) + (Sh - kh) // 2)", "reference", "window radius",
           "the half-integer centre of an odd scope - kernel difference rounded down"),
    # Python checks and autograd.
    Mutant("checks-mask-spatial", OPS, '        _output_shaped("mask", mask, input, (H_out, W_out))', "", "checks",
           "missing check"),
    Mutant("autograd-drop-kernel-offset-grad", OPS, "    return (grad_input, grad_weight, grad_kernel_offset, ",
           "    return (grad_input, grad_weight, torch.zeros_like(grad_kernel_offset), ", "checks", "dropped gradient"),
    Mutant("autograd-swap-geometry", OPS, "    ctx.geometry = (kernel_size, stride, padding, dilation)",
           "    ctx.geometry = (kernel_size, padding, stride, dilation)", "checks", "swapped stride"),
    # C++: the shared sampler (CUDA; the CPU backend has a vectorised copy of its rule, below), the per-point math, the glue and the CPU launchers.
    Mutant("cpp-neighbour-mask", SAMPLER, "  const bool ok_x[2] = {x0 >= 0, x0 + 1 <= W - 1};",
           "  const bool ok_x[2] = {x0 >= 0, x0 + 1 <= W};", "cpu", "dropped mask",
           "reads one past the last column of the input / the scope"),
    Mutant("cpp-grid-mask", CPU_SHARED, "      s.vy[l] = row_in && gx >= 0 && gx < g.W ? static_cast<int32_t>(gy + 1) : -1;",
           "      s.vy[l] = row_in && gx >= 0 ? static_cast<int32_t>(gy + 1) : -1;", "cpu", "dropped mask",
           "the regular grid reads past the end of a row"),
    Mutant("cpp-scope-centre", MATH, "  *ky = (acc_t(i) + acc_t(g.Sh - g.kh) * acc_t(0.5)) + dky;",
           "  *ky = (acc_t(i) + acc_t((g.Sh - g.kh) / 2)) + dky;", "cpu", "window radius"),
    Mutant("cpp-dilation", MATH, "  return wo * g.stride_w - g.pad_w + j * g.dil_w;",
           "  return wo * g.stride_w - g.pad_w + j * g.dil_h;", "cpu", "window radius"),
    Mutant("cpp-edge-rule", CPU_BACKWARD, "              const acc_t* a = x_b + XL.base(X.vy[l], X.vx[l]) * C + c0;",
           "              const acc_t* a = x_b + XL.base(X.gy[l], X.gx[l]) * C + c0;", "cpu", "tie rule",
           "a point on the input's -1 edge reads its neighbours (backward's input value)"),
    Mutant("cpp-scope-edge-rule", CPU_BACKWARD, "              const acc_t* v = table.data() + SL.base(K.vy[l], K.vx[l]) * C + c0;",
           "              const acc_t* v = table.data() + SL.base(K.gy[l], K.gx[l]) * C + c0;", "cpu", "tie rule",
           "a point on the scope's -1 edge reads its neighbours (backward's kernel value)"),
    Mutant("cpp-vector-left-edge", CPU_SHARED, "  const I sampled = inside & (y > minus_one) & (x > minus_one);",
           "  const I sampled = inside & (y > minus_one);", "cpu", "tie rule",
           "the vector sampler counts a point on the -1 column as sampled (its column-0 neighbour read)"),
    Mutant("cpp-scope-row-stride", CPU, "kweights.data() + bk.gk * kk * 4, sr, xbase.data() + bk.og * kk,",
           "kweights.data() + bk.gk * kk * 4, g.Sw, xbase.data() + bk.og * kk,", "cpu",
           "swapped stride", "the forward's third scope neighbour one padded row too high"),
    Mutant("cpp-offset-grad-channel", CPU_BACKWARD, "                o[HoWo] = xsums[og * 3 + 1];",
           "                o[HoWo] = xsums[og * 3];", "cpu", "swapped stride",
           "the y offset gradient written into the x channel"),
    Mutant("cpp-check-kernel-offset", GLUE,
           '  check_shape(op, ko, {g.B, 2 * g.kernel_groups * kk, g.Ho, g.Wo}, "(B, 2 Gk kh kw, Ho, Wo)");', "",
           "cpu", "missing check"),
    Mutant("cpp-check-mask", GLUE,
           '    check_shape(op, m, {g.B, g.offset_groups * kk, g.Ho, g.Wo}, "(B, G kh kw, Ho, Wo) with G from offset");',
           "", "cpu", "missing check"),
    Mutant("cpp-check-grad-out", GLUE, '  check_shape(op, go, {g.B, g.C, g.Ho, g.Wo}, "(B, C, Ho, Wo) of the output");',
           "", "cpu", "missing check"),
    Mutant("cpp-drop-kernel-offset-grad", CPU_BACKWARD, "    L1[l] += d.kernel * dkx;",
           "    L1[l] += 0 * d.kernel * dkx;", "cpu", "dropped gradient"),
    Mutant("cpp-drop-scope-scatter", CPU_BACKWARD, "  for (int nb = 0; nb < 4; ++nb) {\n    acc_t* __restrict dst = gs + srel[nb];",
           "  for (int nb = 0; nb < 3; ++nb) {\n    acc_t* __restrict dst = gs + srel[nb];", "cpu", "dropped gradient"),
    Mutant("cpp-drop-input-scatter", CPU_BACKWARD, "  for (int nb = 0; nb < (kDeformed ? 4 : 1); ++nb) {",
           "  for (int nb = 0; nb < (kDeformed ? 3 : 1); ++nb) {", "cpu", "dropped gradient"),
    Mutant("cpp-drop-mask-grad", CPU_BACKWARD, "    L4[l] += d.mask;", "    L4[l] += 0 * d.mask;", "cpu",
           "dropped gradient"),
    # CUDA (run only where a GPU is present).
    Mutant("cuda-drop-offset-grad", CUDA, "        g_x += d.input * dx;", "        g_x += 0 * d.input * dx;", "cuda",
           "dropped gradient"),
    Mutant("cuda-group-flush", CUDA, "      if ((c + 1) % cgk == 0) {  // the last channel of kernel group gk",
           "      if ((c + 1) % cog == 0) {  // the last channel of kernel group gk", "cuda", "swapped stride"),
]
