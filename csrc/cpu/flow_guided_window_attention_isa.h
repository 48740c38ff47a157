// The per-instruction-set forward kernel of flow-guided window attention on CPU: what the
// launcher (flow_guided_window_attention.cpp) hands it, and its entry points, one copy per
// instruction set (flow_guided_window_attention_{base,avx2,avx512}.cpp over
// flow_guided_window_attention_simd.h). Torch-free. float32 and float64 (float16 and
// bfloat16 keep the generic path of kernels/flow_guided_window_attention.h).
#pragma once

#include <cstdint>

namespace vsr_kernels {
namespace flow_guided_window_attention {

// Head channels are padded to a multiple of kGranuleBytes (zeros), so every head's dot
// product and value accumulation are whole 32-byte vectors.
constexpr int kGranuleBytes = 32;

// One row of pixels, in buffers laid out by the launcher (Dp = head_dim rounded up to
// kGranuleBytes / sizeof(T), Cp = heads * Dp; padding channels are zero):
// - query[x * Cp + h * Dp + d]: the row's queries;
// - key, value: padded channels-last frames of the batch element, cell pixel c at c * Cp;
// - key_bias, value_bias: (cells, Cp) padded, or null;
// - cell[x * cells + n]: the pixel index of cell n of pixel x, or cell[x * cells] = -1 for a
//   pixel with non-finite flow (skipped: the launcher writes its NaNs);
// - out[x * Cp + h * Dp + d], lse[h * lse_head + x]: results.
template <typename T>
struct RowArgs {
  const T* query;
  const T* key;
  const T* value;
  const T* key_bias;
  const T* value_bias;
  const int64_t* cell;
  T* out;
  T* lse;
  int64_t lse_head;
  int64_t width, heads, padded_dim, cells;
  T scale;
};

// The channels-first forward (windows of at most kPlaneCells cells): one row of pixels read
// and written in place on the (B, C, H, W) planes, vectorised across the pixels of the row
// (a vector holds consecutive pixels; cell values are gathered per lane), so nothing is
// transposed or copied:
// - query, key, value, out: the batch element's planes, channel c at c * channel[i]
//   (i = 0, 1, 2, 3 for query, key, value, out); pixels unit-stride; query and out point at
//   the row's first pixel, key and value at pixel 0 of the frame;
// - key_bias, value_bias: (C, cells) (transposed: a channel's cells adjacent), unpadded, or
//   null (both given or both null);
// - cell[n * cell_stride + x]: int32 pixel index (y * W + x) of cell n of pixel x, for
//   x < width rounded up to the vector (pixels with non-finite flow: any valid index; the
//   launcher overwrites their results);
// - plane: H * W; lse[h * lse_head + x]: per head.
constexpr int64_t kPlaneCells = 9;

template <typename T>
struct PlaneArgs {
  const T* query;
  const T* key;
  const T* value;
  T* out;
  int64_t channel[4];
  const T* key_bias;
  const T* value_bias;
  const int32_t* cell;
  int64_t cell_stride;
  int64_t plane;  // pixels per plane (H * W)
  T* lse;
  int64_t lse_head;
  int64_t width, heads, head_dim, cells;
  T scale;
};

// Step 1 of the channels-first backward (windows of at most kPlaneCells cells), one row of
// pixels: grad_out, query and grad_query point at the row's first pixel, key and value at
// pixel 0 of the frame (channel strides in channel[0..4] for grad_out, query, key, value,
// grad_query; pixels unit-stride); cell, cell_stride, plane as in PlaneArgs; lse at the row's
// first pixel (stride lse_head between heads); prob and dscore at the row's first pixel,
// slot (x * heads + h) * cells + n. Writes P_n and dS_n to prob/dscore and grad_query (all
// channels) for every pixel of the row (pixels with non-finite flow: the launcher overwrites).
template <typename T>
struct PlaneBackwardArgs {
  const T* grad_out;
  const T* query;
  const T* key;
  const T* value;
  T* grad_query;
  int64_t channel[5];
  const T* key_bias;
  const T* value_bias;
  const int32_t* cell;
  int64_t cell_stride;
  int64_t plane;
  const T* lse;
  int64_t lse_head;
  T* prob;
  T* dscore;
  // live[x]: -1 for a pixel with finite flow, 0 otherwise (x < width rounded up to the
  // vector; 0 past width): P and dS are 0 at the others.
  const int32_t* live;
  // With biases: lane-wise partial sums of the bias gradients, bias_partial[(n * C + c) * L
  // + j] += dS_n q_c (key) and [((cells + n) * C + c) * L + j] += P_n g_c (value), over the
  // pixels x = j mod L, skipping terms where P_n = dS_n = 0 (L = plane_lanes; the launcher
  // sums the lanes in a fixed order).
  T* bias_partial;
  int64_t width, heads, head_dim, cells;
  T scale;
};

#define VSR_DECLARE_ISA(ns)                         \
  namespace ns {                                    \
  void forward_row(const RowArgs<float>& a);         \
  void forward_row(const RowArgs<double>& a);        \
  void forward_planes_row(const PlaneArgs<float>& a);  \
  void forward_planes_row(const PlaneArgs<double>& a); \
  void backward_planes_row(const PlaneBackwardArgs<float>& a);  \
  void backward_planes_row(const PlaneBackwardArgs<double>& a); \
  int plane_lanes(float);                           \
  int plane_lanes(double);                          \
  }
VSR_DECLARE_ISA(base)
VSR_DECLARE_ISA(avx2)
VSR_DECLARE_ISA(avx512)
#undef VSR_DECLARE_ISA

}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
