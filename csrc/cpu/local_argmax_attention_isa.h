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

// Software prefetch of one cache line into L1 (Level 0) or L2 (Level 1): the forward's row
// copies and the backward's gathers read channel planes a power of two apart, or a window of
// rows, that the hardware prefetchers do not follow. GCC 12 drops __builtin_prefetch whose
// addresses come from run-time strides, so on x86 the instruction is written out.
template <int Level>
inline void prefetch_line(const void* p) {
  static_assert(Level == 0 || Level == 1);
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (Level == 0)
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  else
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3 - Level);
#endif
}

// One candidate (key) row against one or two query rows, in buffers laid out by the launcher:
// - key[c * kstride + x] for x in [-pad, rounded_width + pad), pad >= min(r * dilation, width)
//   and >= 16: the candidate row's channels, zero outside [0, width); `zeros` is an all-zero
//   row laid out the same (read for candidates outside the frame). Where key + c * kstride
//   starts a 64-byte line, the AVX-512 float kernel reads it with aligned loads;
// - per query row (QueryRow): query[c * qstride + x], the row's channels, x < rounded_width (a
//   multiple of every vector width, 16), zero for x >= width; best[x], best_j[x]
//   (rounded_width long): the running best score and candidate, best_j -1 before the first.
template <typename T>
struct RowArgs {
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

// A query row whose candidate row jy the key row of a score_rows call is.
template <typename T>
struct QueryRow {
  const T* query;
  int jy;
  T* best;
  LaneIndex<T>* best_j;
};

// The forward's output of one query row: out[c * out_stride + x] = best[x] *
// value[c * value_stride + sel[x]] for c < channels, x < width, with a zero value where
// sel[x] < 0 (nothing selected, or a zero-padded candidate: multiplied for real).
template <typename T>
struct SelectArgs {
  const T* best;
  const int32_t* sel;
  const T* value;
  int64_t value_stride;
  T* out;
  int64_t out_stride, channels, width;
};

// The backward's three kernels, over contiguous channel planes of P = height * width pixels
// (see backward_cpu in local_argmax_attention.cpp).
//
// Pixels [p0, p1) of one frame: sel[p] = the selected key/value pixel (-1: none, or a
// zero-padded one) from index[p], and g[p] = scale * (gs[p] + <go[:, p], v[:, sel[p]]>), the
// sum taken in increasing channel (go, v: the frame's grad_out and value, channel c at
// c * channel_stride). acc: scratch of p1 - p0 elements; tile_lanes: tile_channels() (0: the
// per-element kernels); window: scratch of (p1 - p0 + 2 * reach * (width + 1)) * tile_lanes
// elements.
template <typename T>
struct SelectionArgs {
  const int64_t* index;
  const T *go, *v, *gs;
  int64_t channel_stride;
  int32_t* sel;
  T *g, *acc, *window;
  int64_t channels, height, width, p0, p1, reach;
  int kernel_size, dilation;
  T scale;
  int tile_lanes;
};

// One value channel: gv_t[sel_t[p]] += score_t[p] * go_t[p] in increasing p, after
// gv_t[zero0, zero1) is zeroed.
template <typename T>
struct ValueBandArgs {
  const int32_t* sel;
  const T* score;
  const T* go;
  T* gv;
  int64_t pixels, frame_stride, frames, p0, p1, zero0, zero1;
};

// `channels` consecutive key channels (planes `pixels` apart in q, gq, k and gk), query pixels
// [p0, p1): gq[p] = sum over frames t in order of g_t[p] * k_t[sel_t[p]] (gq zeroed first), and
// gk_t[sel_t[p]] += g_t[p] * q[p] in increasing p, after gk_t[zero0, zero1) is zeroed (the
// caller zeroes every key pixel before the first term it can receive). sel, g: frames of
// `pixels` apart; k, gk: frames `frame_stride` apart.
template <typename T>
struct KeyBandArgs {
  const int32_t* sel;
  const T* g;
  const T* q;
  T* gq;
  const T* k;
  T* gk;
  int64_t pixels, width, reach, frame_stride, frames, p0, p1, zero0, zero1, channels;
  // As many value channels (planes `pixels` apart in go and gv) scattered in the same pass
  // (same sel), or null.
  const ValueBandArgs<T>* value;
};

// Phase 2 of the backward for tile_lanes = tile_channels() consecutive channels (one float32
// vector per pixel) that are key and value channels alike, over every frame
// and pixel of one batch element, through channels-last tiles (the copies where tile_channels
// is non-zero): per frame, a ring of the key rows a query row can select (transposed to one
// vector per pixel) and of the rows of grad_key and grad_value they receive, so each gather and
// scatter moves one vector, and the planes are read and written a row at a time (transposes in
// registers). The same terms in the same order as key_band: the same bits. q, go, k, gq, gk,
// gv point at the block's first channel plane (planes `pixels` apart; frames of k, gk
// `key_frame_stride` apart, of go, gv `value_frame_stride` apart); sel, g, score: (frames,
// pixels). float32 only.
struct TileArgs {
  const int32_t* sel;
  const float *g, *score, *q, *go, *k;
  float *gq, *gk, *gv;
  int64_t height, width, frames, reach, key_frame_stride, value_frame_stride;
  int tile_lanes;
};

// score_rows: candidates (rows[i].jy, 0 .. K - 1) of every pixel of rows[i], i < n (1 or 2),
// visited in increasing jx, folded into rows[i].best and best_j: two query rows share each
// loaded and shifted key vector where the AVX-512 float kernel can (dilation 1).
// tile_channels: the tile width where this copy has the tiled float32 backward for channel
// planes `plane_bytes` apart (16 or 8 with AVX-512, 8 with AVX2; selection_grad's then use the
// window scratch, key_value_tiles runs), else 0 (key_value_tiles must not be called); float64
// never has it.
#define VSR_DECLARE_ISA(ns)                                                                                  \
  namespace ns {                                                                                             \
  void score_rows(const RowArgs<float>& a, const QueryRow<float>* rows, int n);                              \
  void score_rows(const RowArgs<double>& a, const QueryRow<double>* rows, int n);                            \
  void select_values(const SelectArgs<float>& a);                                                            \
  void select_values(const SelectArgs<double>& a);                                                           \
  void selection_grad(const SelectionArgs<float>& a);                                                        \
  void selection_grad(const SelectionArgs<double>& a);                                                       \
  void key_band(const KeyBandArgs<float>& a);                                                                \
  void key_band(const KeyBandArgs<double>& a);                                                               \
  void value_band(const ValueBandArgs<float>& a);                                                            \
  void value_band(const ValueBandArgs<double>& a);                                                           \
  int tile_channels(float, int64_t plane_bytes);                                                             \
  void key_value_tiles(const TileArgs& a);                                                                   \
  }
VSR_DECLARE_ISA(base)
VSR_DECLARE_ISA(avx2)
VSR_DECLARE_ISA(avx512)
#undef VSR_DECLARE_ISA

// Which copy runs: cpu::select_isa (../cpu/isa.h).

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
