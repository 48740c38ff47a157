"""Mutants of trajectory_attention: small, realistic single-line bugs, per backend and kind."""
from . import Mutant

REF = "vsr_kernels/reference/trajectory_attention.py"
OPS = "vsr_kernels/ops/trajectory_attention.py"
TRI = "vsr_kernels/triton/trajectory_attention.py"
MATH = "csrc/kernels/trajectory_attention.h"
GLUE = "csrc/glue/trajectory_attention.h"
CPU = "csrc/cpu/trajectory_attention.cpp"
SIMD = "csrc/cpu/trajectory_attention_simd.h"
CUDA = "csrc/cuda/trajectory_attention.cu"

MUTANTS = [
    # The reference (the oracle of the other backends).
    Mutant("ref-tie-last", REF, "index = torch.where(ranked == best, frames, sim.shape[-1]).amin(dim=-1)",
           "index = torch.where(ranked == best, frames, -1).amax(dim=-1)", "reference", "tie rule"),
    Mutant("ref-inside-edge", REF, "inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)",
           "inside = (x >= 0) & (x <= w) & (y >= 0) & (y <= h - 1)", "reference", "dropped mask"),
    Mutant("ref-round-floor", REF, "rounded = torch.round(location)", "rounded = torch.floor(location + 0.5)",
           "reference", "window radius", "ties up instead of to even"),
    # Python checks and autograd.
    Mutant("checks-location-h", OPS, 'for dim, letter in ((0, "B"), (1, "T"), (3, "h"), (4, "w")):\n'
           '        _checks.same_size("location"',
           'for dim, letter in ((0, "B"), (1, "T"), (4, "w")):\n        _checks.same_size("location"',
           "checks", "missing check"),
    Mutant("autograd-drop-value-grad", OPS, "return grad_query, grad_key, list(grad_values), None",
           "return grad_query, grad_key, [torch.zeros_like(g) for g in grad_values], None", "checks",
           "dropped gradient"),
    # Triton kernels (the interpreter on CPU).
    Mutant("triton-tie-last", TRI, "beats = (s > best) | ((s != s) & (best == best))  # the C++",
           "beats = (s >= best) | ((s != s) & (best == best))  # the C++", "triton", "tie rule"),
    Mutant("triton-round-up", TRI, "return tl.where(d > 0.5, f + 1, tl.where(d < 0.5, f, tl.where(even, f, f + 1)))",
           "return tl.where(d >= 0.5, f + 1, f)", "triton", "window radius", ".5 ties round up"),
    # (Dropping the key load's `inside` mask is an equivalent mutant: an outside token's key
    # pointer is clamped to token (0, 0) and its similarity replaced by the poison; found by a
    # mutation run, so the mask below is the value gather's, whose result is not discarded.)
    Mutant("triton-value-mask", TRI,
           "v = tl.load(v_base[None, :] + c.to(tl.int64)[:, None] * v_sc, mask=cm & picked[None, :], other=0)",
           "v = tl.load(v_base[None, :] + c.to(tl.int64)[:, None] * v_sc, mask=cm & valid[None, :], other=0)",
           "triton", "dropped mask", "an outside choice reads token (0, 0) of its frame"),
    Mutant("triton-swap-value-stride", TRI, "v_base = value_ptr + b * v_sb + t * v_st + (pos // w) * v_sy + (pos % w) * v_sx",
           "v_base = value_ptr + b * v_sb + t * v_st + (pos // w) * v_sx + (pos % w) * v_sy", "triton",
           "swapped stride"),
    Mutant("triton-drop-kself", TRI, "term += ks[None, :] * own", "term += 0 * own", "triton", "dropped gradient"),
    Mutant("triton-check-D", TRI, 'for dim, letter in ((0, "B"), (2, "D"), (3, "h"), (4, "w")):',
           'for dim, letter in ((0, "B"), (3, "h"), (4, "w")):', "triton", "missing check"),
    # C++: the shared per-token math, the glue checks and the CPU launcher (rebuilt in the scratch copy).
    Mutant("cpp-tie-last", MATH, "if (frame < 0 || beats(s, sim)) {", "if (frame < 0 || beats(s, sim) || s == sim) {",
           "cpu", "tie rule"),
    Mutant("cpp-inside-edge", MATH, "if (!(x >= 0.0 && x <= static_cast<double>(width - 1) &&",
           "if (!(x >= 0.0 && x <= static_cast<double>(width) &&", "cpu", "dropped mask",
           "reads one token past the row end"),
    Mutant("cpp-eps-rule", MATH, "const acc_t q_self = sqrt(qq) >= acc_t(kEps) ? -grad_score * s / (dq * dq) : acc_t(0);",
           "const acc_t q_self = -grad_score * s / (dq * dq);", "cpu", "dropped gradient",
           "the clamp's gradient mask of F.normalize"),
    Mutant("cpp-drop-kself", CPU, "kself_data[b * N + p] * vsr_kernels::convert<acc_t>(krow[ps]);",
           "acc_t(0) * vsr_kernels::convert<acc_t>(krow[ps]);", "cpu", "dropped gradient"),
    Mutant("cpp-value-mask", CPU, "if (chosen[i] >= 0) ++start[frame[i] + 1];",
           "++start[frame[i] + 1];", "cpu", "dropped mask", "an outside choice is gathered at token -1"),
    # The float32 per-ISA kernels (the tests force each ISA with VSR_KERNELS_CPU_ISA).
    Mutant("cpp-simd-slot-order", SIMD, "constexpr int kSlot[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};",
           "constexpr int kSlot[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};", "cpu", "swapped stride",
           "AVX-512 key pass: a group's dot products land in other queries' lanes"),
    Mutant("cpp-simd-block-pad", SIMD, "  for (int64_t c = cb; c < W; ++c) r[c] = vzero();\n", "", "cpu", "dropped mask",
           "the last channel block (D not a multiple of the vector width) keeps stale rows"),
    Mutant("cpp-value-block", CPU, "gather(isa, Gather{vr.row(b, 0, c0), vr.channel,",
           "gather(isa, Gather{vr.row(b, 0, 0), vr.channel,", "cpu", "swapped stride",
           "every block of kValueChannels output channels gathers the first block's value rows"),
    Mutant("cpp-simd-gather-mask", SIMD, "const M ok = _mm512_cmpge_epi32_mask(i, _mm512_setzero_si512());",
           "const M ok = _mm512_cmpge_epi32_mask(i, _mm512_set1_epi32(-1));", "cpu", "dropped mask",
           "AVX-512: an outside lane gathers the element before the row instead of 0"),
    Mutant("cpp-swap-pos", MATH, "return static_cast<int64_t>(y) * width + static_cast<int64_t>(x);",
           "return static_cast<int64_t>(x) * width + static_cast<int64_t>(y);", "cpu", "swapped stride"),
    Mutant("cpp-glue-value-h", GLUE, '    check_size(op, v, 3, "h", q, 2);\n', "", "cpu", "missing check"),
    Mutant("cpp-glue-index-shape", GLUE, 'check_shape(op, {"index", index}, {B, h, w}, "(B, h, w) of query");', "",
           "cpu", "missing check"),
    # CUDA (run only where a GPU is present).
    Mutant("cuda-tie-pos", CUDA, "if (best.frame != before) best_pos = pos;", "best_pos = pos;", "cuda", "tie rule"),
    Mutant("cuda-run-head", CUDA, "if (target >= none || (j > 0 && keys[j - 1] == target)) continue;",
           "if (target >= none) continue;", "cuda", "dropped gradient", "every entry of a run writes a partial sum"),
]
