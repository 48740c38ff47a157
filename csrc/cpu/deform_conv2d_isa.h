// The AVX-512 per-tile kernels of deform_conv2d on CPU (float32): what the launcher
// (deform_conv2d.cpp) hands them and their entry points. Only deform_conv2d_avx512.cpp is
// compiled for AVX-512 (#pragma GCC target), so the extension still loads on any x86-64 CPU;
// elsewhere, and for the other dtypes, the launcher's scalar code runs. Torch-free.
//
// Vectorised across output positions: 16 consecutive positions of a tile at once. For one
// kernel point the 16 sample points' bilinear neighbours (base offset, four weights, four
// masks of neighbours inside the plane) are computed once, in registers, and reused for every
// channel of the offset group: per channel masked gathers of the neighbours (a row's two
// neighbours in one 8-byte lane; one outside the plane is not read, as the scalar rule says)
// and the weighted sum. Same semantics as common/bilinear.h (torchvision's rule, NaN
// coordinates, the -1 edge); the arithmetic may contract into fused multiply-adds, so results
// can differ from the scalar path in the last bits. The tiles' GEMMs are here too (MKL's sgemm
// runs AVX2 code on AMD CPUs), with a fixed reduction order, so the results do not depend on
// the number of threads.
//
// Index arithmetic is int32 here: the launcher takes this path only where every plane offset
// and every sample coordinate's integer part fits (fits_int32 in deform_conv2d.cpp).
#pragma once

#include <cstdint>

namespace vsr_kernels {
namespace deform_conv2d {
namespace avx512 {

// One tile of n positions [p0, p0 + n) of one batch element and one offset group og.
struct TileArgs {
  const float* offset;  // the batch element's offset, (2 G kk, HoWo) contiguous
  const float* mask;    // its mask, (G kk, HoWo), or null (all ones)
  const float* input;   // the offset group's first input plane; its channels HW apart
  const int32_t* ybase;  // [q]: ho s_h - p_h of position p0 + q
  const int32_t* xbase;  // [q]: wo s_w - p_w
  int64_t HoWo, HW, p0, n, channels, og;
  int32_t H, W, kh, kw, dil_h, dil_w;
};

// col[(c kk + k) n + q] = the modulated sample of kernel point k at position p0 + q in channel
// c of the group (the forward's column buffer rows of the group).
void forward_columns(const TileArgs& a, float* col);

// The backward of one tile for the offset group: from grad_col[(c kk + k) n + q] (the column
// gradient, weightᵀ · grad_out), writes val[(c kk + k) n + q] = the modulated sample (for the
// weight gradient), grad_offset's (dy, dx) channels of the group's kernel points at the tile's
// positions (goff: the batch element's grad_offset, (2 G kk, HoWo)), grad_mask's (gmask: the
// batch element's, or null), and adds the bilinear scatter into grad_input's planes of the
// group (gin: the group's first plane), in a fixed order per element: kernel point, block of
// 16 positions, position, neighbour (the group's planes interleaved per position).
// scratch: 64 channels floats.
void backward_tile(const TileArgs& a, const float* grad_col, float* val, float* goff, float* gmask, float* gin,
                   float* scratch);

// C[m ldc + j] (=, or += where accumulate) sum over k < K of A[m a_m + k a_k] B[k ldb + j]
// (+ bias[m] where bias is not null), for m < M, j < N: the reduction in increasing k.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_m, int64_t a_k, const float* B, int64_t ldb,
          float* C, int64_t ldc, const float* bias, bool accumulate);

// C[m ldc + j] += sum over q < Q of A[m lda + q] B[j ldb + q] (products of rows), for m < M,
// j < N: 16-lane partial sums in increasing q, then reduced across the lanes in a fixed order.
void gemm_dot_accumulate(int64_t M, int64_t N, int64_t Q, const float* A, int64_t lda, const float* B, int64_t ldb,
                         float* C, int64_t ldc);

}  // namespace avx512
}  // namespace deform_conv2d
}  // namespace vsr_kernels
