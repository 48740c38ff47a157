"""Mutants of flow_guided_window_attention: small, realistic single-line bugs, per backend and kind
(window/index arithmetic, softmax rule, dropped mask = out-of-bounds read, missing shape check,
swapped stride, dropped gradient term)."""
from . import Mutant

REF = "vsr_kernels/reference/flow_guided_window_attention.py"
OPS = "vsr_kernels/ops/flow_guided_window_attention.py"
TRI = "vsr_kernels/triton/flow_guided_window_attention.py"
MATH = "csrc/kernels/flow_guided_window_attention.h"
GLUE = "csrc/glue/flow_guided_window_attention.h"
CPU = "csrc/cpu/flow_guided_window_attention.cpp"
CUDA = "csrc/cuda/flow_guided_window_attention.cu"
SIMD = "csrc/cpu/flow_guided_window_attention_simd.h"

MUTANTS = [
    # The reference (the oracle the kernel backends are compared with).
    Mutant("ref-window-lo", REF, "lo = -((window_size - 1) // 2)\n    return", "lo = -(window_size // 2)\n    return",
           "reference", "window radius"),
    Mutant("ref-coordinate-order", REF, "index = (cell_y * W + cell_x).reshape(B, 1, H * W * cells)",
           "index = (cell_x * H + cell_y).reshape(B, 1, H * W * cells)", "reference", "swapped stride"),
    # Python checks and autograd.
    Mutant("checks-flow-hw", OPS, "if flow.shape != (B, 2, H, W):", "if flow.shape[:2] != (B, 2):", "checks",
           "missing check"),
    Mutant("autograd-drop-value-bias-grad", OPS, "gvb if value_bias is not None else None, None)",
           "None, None)", "checks", "dropped gradient"),
    # Triton kernels (the interpreter on CPU).
    Mutant("triton-window-lo", TRI, "lo = -((WINDOW - 1) // 2)", "lo = -(WINDOW // 2)", "triton", "window radius"),
    Mutant("triton-clamp-rows", TRI, "cy = tl.minimum(tl.maximum(by + lo + n // WINDOW, 0), H - 1)",
           "cy = tl.maximum(by + lo + n // WINDOW, 0)", "triton", "dropped mask", "reads rows below the frame"),
    Mutant("triton-softmax-rescale", TRI, "alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new)).to(ACC)",
           "alpha = tl.where(m == m_new, 1.0, tl.exp(m_new - m)).to(ACC)", "triton", "tie rule",
           "the online softmax's rescaling"),
    Mutant("triton-swap-query-stride", TRI,
           "q_off = b * q_sb + (p // W).to(tl.int64) * q_sy + (p % W).to(tl.int64) * q_sx\n    d = tl.arange",
           "q_off = b * q_sb + (p // W).to(tl.int64) * q_sx + (p % W).to(tl.int64) * q_sy\n    d = tl.arange",
           "triton", "swapped stride", "in the forward"),
    Mutant("triton-drop-delta", TRI, "ds = tl.where(valid, scale * P * (dP - delta), 0).to(ACC)",
           "ds = tl.where(valid, scale * P * dP, 0).to(ACC)", "triton", "dropped gradient"),
    Mutant("triton-check-flow", TRI, "    if flow.shape != (B, 2, H, W):\n        fail(",
           "    if flow.shape[:2] != (B, 2):\n        fail(", "triton", "missing check"),
    # C++: the shared per-pixel math, the glue and the CPU launcher (rebuilt in the scratch copy).
    Mutant("cpp-window-lo", MATH, "int lo() const { return -((window - 1) / 2); }", "int lo() const { return -(window / 2); }",
           "cpu", "window radius"),
    Mutant("cpp-clamp", MATH, "return v < 0 ? 0 : (v >= size ? size - 1 : v); }", "return v < 0 ? 0 : v; }", "cpu",
           "dropped mask", "reads past the frame's last row and column"),
    Mutant("cpp-huge-flow", MATH, "c = c < lo ? lo : (c > hi ? hi : c);", "c = c < lo ? lo : c;", "cpu",
           "window radius", "huge flows overflow the integer conversion"),
    Mutant("cpp-check-bias", GLUE, 'check_shape(op, nb, {cells, C}, "(window_size**2, C)");', "(void)cells;", "cpu",
           "missing check"),
    Mutant("cpu-transposed-store", CPU, "o.at(0, c, y * g.width + x) =", "o.at(0, c, x * g.height + y) =", "cpu",
           "swapped stride", "the backward's row store"),
    Mutant("cpu-drop-delta", MATH, "const acc_t ds = scale * prob[h * cells + n] * (dscore[h * cells + n] - delta[h]);",
           "const acc_t ds = scale * prob[h * cells + n] * dscore[h * cells + n];", "cpu", "dropped gradient"),
    # The per-ISA CPU forward (every ISA copy is compiled from SIMD; the tests force each).
    Mutant("simd-planes-drop-value-bias", SIMD,
           "          if (kBiased) vv[n] = vv[n] + value_bias[c * kCells + n];\n          o = n == 0",
           "          o = n == 0", "cpu", "dropped gradient", "the value bias in the channels-first forward"),
    Mutant("simd-window-second-row-mask", SIMD, "mask[1] = bits(t1 == 2);", "mask[1] = bits(t1 == 1);", "cpu",
           "dropped mask", "the 2x2 window's second cell row takes the wrong one of its two rows"),
    Mutant("simd-window-blend-mask", SIMD,
           "cell[2 + b] = (V)_mm512_mask_blend_ps((__mmask16)mask[1],",
           "cell[2 + b] = (V)_mm512_mask_blend_ps((__mmask16)mask[0],", "cpu", "dropped mask",
           "the 2x2 window's second cell row blends by the first row's mask"),
    Mutant("simd-run-offset", SIMD, "const int32_t o = idx[j] - j;", "const int32_t o = idx[j] - j + (j & 1);", "cpu",
           "swapped stride", "the runs' lane offset (loads the neighbour for odd lanes)"),
    Mutant("simd-vlog-halving", SIMD, "m = high ? m * 0.5 : m;", "m = high ? m : m;", "cpu", "dropped mask",
           "lse's vector log keeps mantissas above sqrt(2) unhalved (log off by up to log 2)"),
    Mutant("simd-planes-drop-delta", SIMD, "dp[n] = live ? (s[n] * a.scale) * (dp[n] - delta) : V{};",
           "dp[n] = live ? (s[n] * a.scale) * dp[n] : V{};", "cpu", "dropped gradient",
           "the channels-first backward's dS"),
    Mutant("simd-lane-stride", SIMD, "  for (int64_t j = 1; j < vecs; ++j) {\n    const int64_t c = o + j * L;",
           "  for (int64_t j = 1; j < vecs; ++j) {\n    const int64_t c = o + j;", "cpu", "swapped stride",
           "the head dot product's vector stride"),
    Mutant("cpu-pad-transpose", CPU, "for (int64_t x = x0; x < x1; ++x) to[x * Cp] = from[x];",
           "for (int64_t x = x0; x < x1; ++x) to[x * Cp] = from[x * H];", "cpu", "swapped stride",
           "the padded key/value copy"),
    # CUDA (run only where a GPU is present).
    Mutant("cuda-drop-delta", MATH, "const acc_t ds = scale * prob[n] * (dscore[n] - delta);",
           "const acc_t ds = scale * prob[n] * dscore[n];", "cuda", "dropped gradient"),
    Mutant("cuda-lse-chunk", CUDA, "if (chunk == 0) lse[(b * g.heads + h) * HW + p] = l;",
           "if (chunk == 1) lse[(b * g.heads + h) * HW + p] = l;", "cuda", "dropped gradient",
           "lse never written for heads of at most 16 channels"),
]
