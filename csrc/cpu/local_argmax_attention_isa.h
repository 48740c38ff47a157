// The per-instruction-set forward kernels of local argmax attention on CPU: what the
// launcher (local_argmax_attention.cpp) hands them, and their entry points, one copy per
// instruction set (local_argmax_attention_{base,avx2,avx512}.cpp over
// local_argmax_attention_simd.h). Torch-free.
#pragma once

#include <cstdint>
#include <type_traits>

namespace vsr_kernels {
namespace local_argmax_attention {

// The integer lane type of a vector of T: comparisons of float vectors give int32 lanes, of
// double vectors int64 lanes; the running best candidate of each pixel is kept in it.
template <typename T>
using LaneIndex = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// One query row against one candidate row, in buffers laid out by the launcher:
// - query[c * qstride + x]: the row's channels, x < rounded_width (a multiple of every
//   vector width, 16), zero for x >= width;
// - key[c * kstride + x] for x in [-pad, rounded_width + pad), pad = min(r * dilation, width):
//   the candidate row's channels, zero outside [0, width); `zeros` is an all-zero row laid
//   out the same (read for candidates outside the frame);
// - best[x], best_j[x] (rounded_width long): the running best score and candidate, best_j -1
//   before the first.
template <typename T>
struct RowArgs {
  const T* query;
  int64_t qstride;
  const T* key;
  const T* zeros;
  int64_t kstride;
  int64_t channels, width, rounded_width;
  int kernel_size, dilation;
  T scale;
  bool zero_border;  // every candidate counts; else only those inside the frame
  bool row_inside;   // the candidate row lies inside the frame
};

// Candidates (jy, 0 .. K - 1) of every pixel of the row, visited in increasing jx, folded
// into best and best_j.
#define VSR_DECLARE_ISA(ns)                                                             \
  namespace ns {                                                                        \
  void score_row(const RowArgs<float>& a, int jy, float* best, int32_t* best_j);        \
  void score_row(const RowArgs<double>& a, int jy, double* best, int64_t* best_j);      \
  }
VSR_DECLARE_ISA(base)
VSR_DECLARE_ISA(avx2)
VSR_DECLARE_ISA(avx512)
#undef VSR_DECLARE_ISA

// Which copy runs: cpu::select_isa (../cpu/isa.h).

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
