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

// The backward's buffers are channels-last: a pixel's channels are adjacent, padded to a
// channel pitch that is a multiple of kPitchBytes (every vector width divides it), the padding
// zero in every input buffer. One selection of a query pixel of the row being processed:
// - pixel: its slot in the row buffers go and q;
// - sel: the selected key/value pixel's slot in the ring buffers v, k, gk, gv;
// - gq: its slot in the gq row buffer, -1 when the pixel is not the tile's own (its query
//   gradient is another tile's);
// - own_sel: the selected pixel is the tile's own: its key and value gradients get the terms.
constexpr int64_t kPitchBytes = 64;

template <typename T>
struct BackwardItem {
  int64_t pixel, sel, gq;
  T grad_score, score;
  bool own_sel;
};

// The items of one row, in increasing pixel order: g = scale * (grad_score + <go, v[sel]>);
// gk[sel] += g * q, gv[sel] += score * go where own_sel; gq += g * k[sel] where gq >= 0.
template <typename T>
struct BackwardRowArgs {
  const BackwardItem<T>* items;
  int64_t count;
  const T *go, *q, *v, *k;
  T *gk, *gv, *gq;
  int64_t pitch, value_pitch;  // channel pitch of the key-side (q, k, gk, gq) and value-side (go, v, gv) buffers
  T scale;
};

// Candidates (jy, 0 .. K - 1) of every pixel of the row, visited in increasing jx, folded
// into best and best_j. transpose: dst[x * dst_stride + c] = (or += when add)
// src[c * src_stride + x] for c < rows, x < cols.
#define VSR_DECLARE_ISA(ns)                                                                                  \
  namespace ns {                                                                                             \
  void score_row(const RowArgs<float>& a, int jy, float* best, int32_t* best_j);                             \
  void score_row(const RowArgs<double>& a, int jy, double* best, int64_t* best_j);                           \
  void backward_row(const BackwardRowArgs<float>& a);                                                        \
  void backward_row(const BackwardRowArgs<double>& a);                                                       \
  void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst,               \
                 int64_t dst_stride, bool add);                                                              \
  void transpose(const double* src, int64_t src_stride, int64_t rows, int64_t cols, double* dst,             \
                 int64_t dst_stride, bool add);                                                              \
  }
VSR_DECLARE_ISA(base)
VSR_DECLARE_ISA(avx2)
VSR_DECLARE_ISA(avx512)
#undef VSR_DECLARE_ISA

// Which copy runs: cpu::select_isa (../cpu/isa.h).

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
