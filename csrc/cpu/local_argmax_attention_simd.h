// The vectorised CPU forward of local argmax attention: scores, argmax and selection of one
// row of query pixels, compiled once per instruction set. Torch-free, and included only by
// the per-ISA translation units (local_argmax_attention_{base,avx2,avx512}.cpp), which define
//   VSR_SIMD_NS     the namespace of this copy (base, avx2, avx512): each copy is its own
//                   code, so the linker never merges an AVX-512 function into the base path;
//   VSR_SIMD_BYTES  the vector width in bytes (16, 32, 64);
//   VSR_SIMD_FMA    1 where fused multiply-add instructions exist (the TU enables them with
//                   #pragma GCC target before including this file).
// local_argmax_attention.cpp picks a copy at run time (see select_isa there).
//
// Register blocking: a vector holds N neighbouring query pixels of one row (x, x+1, ...),
// and for one channel the query vector is loaded once and multiplied with up to kBlock
// shifted key vectors, one per candidate column jx, into kBlock accumulators: the key row
// is read from a padded copy (see RowKernel), so every shifted load is in bounds and the
// loop has no masks. Channels are the reduction. A candidate row jy needs one key row
// (frame t, row y + (jy - r) * dilation); the launcher keeps the K most recent ones
// converted and padded in a small per-thread cache, so they are read from L1/L2.
//
// Semantics are the shared ones (kernels/local_argmax_attention.h): candidates are visited
// in increasing j = jy * K + jx and replace the best only when they beat it (NaN ranks
// highest, a tie keeps the earlier one); "zeros" scores an outside candidate against zero
// keys, multiplied for real, which the zero padding of the key copy does by itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include "local_argmax_attention_isa.h"

#if VSR_SIMD_FMA
#include <immintrin.h>
#endif

namespace vsr_kernels {
namespace local_argmax_attention {
namespace VSR_SIMD_NS {

// Vectors of VSR_SIMD_BYTES bytes (GCC/Clang vector extensions): Vec<float> holds N floats,
// Mask<float> N int32 lanes (what comparing two Vec<float> gives), likewise for double.
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float Vec __attribute__((vector_size(VSR_SIMD_BYTES)));
  typedef int32_t Lane;
  typedef Lane Mask __attribute__((vector_size(VSR_SIMD_BYTES)));
  static constexpr int kLanes = VSR_SIMD_BYTES / 4;
  static inline Vec fma(Vec a, Vec b, Vec c) {
#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
    return (Vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif VSR_SIMD_FMA && VSR_SIMD_BYTES == 32
    return (Vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
  }
};

template <>
struct Simd<double> {
  typedef double Vec __attribute__((vector_size(VSR_SIMD_BYTES)));
  typedef int64_t Lane;
  typedef Lane Mask __attribute__((vector_size(VSR_SIMD_BYTES)));
  static constexpr int kLanes = VSR_SIMD_BYTES / 8;
  static inline Vec fma(Vec a, Vec b, Vec c) {
#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
    return (Vec)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif VSR_SIMD_FMA && VSR_SIMD_BYTES == 32
    return (Vec)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
    return a * b + c;
#endif
  }
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Candidate columns per register block: kBlock accumulators, one query and one key vector
// fit the 16 vector registers of SSE and AVX2 (AVX-512 has 32).
constexpr int kBlock = 9;

// The kernel of one query row against candidate row jy (see RowArgs in
// local_argmax_attention_isa.h for the buffers).
template <typename T>
struct RowKernel : RowArgs<T> {
  explicit RowKernel(const RowArgs<T>& a) : RowArgs<T>(a) {}
  using RowArgs<T>::query;
  using RowArgs<T>::qstride;
  using RowArgs<T>::key;
  using RowArgs<T>::zeros;
  using RowArgs<T>::kstride;
  using RowArgs<T>::channels;
  using RowArgs<T>::width;
  using RowArgs<T>::rounded_width;
  using RowArgs<T>::kernel_size;
  using RowArgs<T>::dilation;
  using RowArgs<T>::scale;
  using RowArgs<T>::zero_border;
  using RowArgs<T>::row_inside;

  using S = Simd<T>;
  using Vec = typename S::Vec;
  using Mask = typename S::Mask;
  using Lane = typename S::Lane;

  // Candidates (jy, jx0 .. jx0 + NJ - 1) of pixels x0 .. x0 + lanes - 1.
  template <int NJ>
  inline void block(int jy, int jx0, int64_t x0, T* best, Lane* best_j) const {
    const int r = kernel_size / 2;
    const T* base[NJ];
    bool inside[NJ];
    for (int i = 0; i < NJ; ++i) {
      const int64_t offset = static_cast<int64_t>(jx0 + i - r) * dilation;
      // Every lane of a candidate this far is outside the frame: read the zero row (an
      // in-bounds load whose score is the padded one; "exclude" masks it below).
      inside[i] = row_inside && offset > -width && offset < width;
      base[i] = inside[i] ? key + x0 + offset : zeros + x0;
    }
    Vec acc[NJ];
    for (int i = 0; i < NJ; ++i) acc[i] = Vec{};
    const T* q = query + x0;
    for (int64_t c = 0; c < channels; ++c) {
      const Vec qv = load<Vec>(q + c * qstride);
      const int64_t k = c * kstride;
      for (int i = 0; i < NJ; ++i) acc[i] = S::fma(qv, load<Vec>(base[i] + k), acc[i]);
    }
    Vec bs = load<Vec>(best + x0);
    Mask bj = load<Mask>(best_j + x0);
    Mask lane;
    for (int l = 0; l < S::kLanes; ++l) lane[l] = static_cast<Lane>(x0 + l);
    const Vec sv = Vec{} + scale;
    for (int i = 0; i < NJ; ++i) {
      if (!zero_border && !inside[i]) continue;
      const Vec s = sv * acc[i];
      // The shared tie and NaN rule (beats in common/host_device.h), lane by lane.
      Mask take = (bj < 0) | (s > bs) | ((s != s) & (bs == bs));
      if (!zero_border) {
        const int64_t offset = static_cast<int64_t>(jx0 + i - r) * dilation;
        const Mask cx = lane + static_cast<Lane>(offset);
        take &= (cx >= 0) & (cx < static_cast<Lane>(width));
      }
      bs = take ? s : bs;
      bj = take ? (Mask{} + (jy * kernel_size + jx0 + i)) : bj;
    }
    store(best + x0, bs);
    store(best_j + x0, bj);
  }

  // Candidates jx0 .. jx0 + n - 1 (n <= kBlock) of every pixel of the row.
  template <int NJ>
  inline void columns(int jy, int jx0, T* best, Lane* best_j) const {
    for (int64_t x0 = 0; x0 < rounded_width; x0 += S::kLanes) block<NJ>(jy, jx0, x0, best, best_j);
  }

  void run(int jy, T* best, Lane* best_j) const {
    for (int jx0 = 0; jx0 < kernel_size; jx0 += kBlock) {
      switch (kernel_size - jx0 < kBlock ? kernel_size - jx0 : kBlock) {
        case 1: columns<1>(jy, jx0, best, best_j); break;
        case 2: columns<2>(jy, jx0, best, best_j); break;
        case 3: columns<3>(jy, jx0, best, best_j); break;
        case 4: columns<4>(jy, jx0, best, best_j); break;
        case 5: columns<5>(jy, jx0, best, best_j); break;
        case 6: columns<6>(jy, jx0, best, best_j); break;
        case 7: columns<7>(jy, jx0, best, best_j); break;
        case 8: columns<8>(jy, jx0, best, best_j); break;
        default: columns<kBlock>(jy, jx0, best, best_j); break;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Backward (see backward_cpu in local_argmax_attention.cpp for the tiles and rings).

// One stage of an in-register transpose of N x N elements held in N vectors r[0 .. N): within
// every 2H x 2H block, the upper-right and lower-left H x H blocks swap. The stages for
// H = N/2, ..., 1 together transpose; each is N two-input shuffles with constant masks.
template <typename S, int H, std::size_t... I>
inline void transpose_stage(typename S::Vec* r, std::index_sequence<I...>) {
  using Vec = typename S::Vec;
  using Mask = typename S::Mask;
  constexpr int N = S::kLanes;
  const Mask lo = {static_cast<typename S::Lane>((I & H) ? N + I - H : I)...};
  const Mask hi = {static_cast<typename S::Lane>((I & H) ? N + I : I + H)...};
  for (int i = 0; i < N; ++i)
    if (!(i & H)) {
      const Vec a = r[i], b = r[i + H];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + H] = __builtin_shuffle(a, b, hi);
    }
}

template <typename S, int H>
inline void transpose_stages(typename S::Vec* r) {
  if constexpr (H >= 1) {
    transpose_stage<S, H>(r, std::make_index_sequence<S::kLanes>{});
    transpose_stages<S, H / 2>(r);
  }
}

template <typename T, bool kAdd>
inline void transpose_impl(const T* src, int64_t ss, int64_t rows, int64_t cols, T* dst, int64_t ds) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  constexpr int N = S::kLanes;
  auto put = [](T* d, T value) { *d = kAdd ? *d + value : value; };
  int64_t c0 = 0;
  for (; c0 + N <= rows; c0 += N) {
    int64_t x0 = 0;
    for (; x0 + N <= cols; x0 += N) {
      Vec r[N];
      for (int i = 0; i < N; ++i) r[i] = load<Vec>(src + (c0 + i) * ss + x0);
      transpose_stages<S, N / 2>(r);
      for (int i = 0; i < N; ++i) {
        T* d = dst + (x0 + i) * ds + c0;
        store(d, kAdd ? load<Vec>(d) + r[i] : r[i]);
      }
    }
    for (; x0 < cols; ++x0)
      for (int i = 0; i < N; ++i) put(dst + x0 * ds + c0 + i, src[(c0 + i) * ss + x0]);
  }
  for (; c0 < rows; ++c0)
    for (int64_t x = 0; x < cols; ++x) put(dst + x * ds + c0, src[c0 * ss + x]);
}

template <typename T>
inline void backward_row_impl(const BackwardRowArgs<T>& a) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  constexpr int N = S::kLanes;
  const int64_t pitch = a.pitch, vpitch = a.value_pitch;
  for (int64_t n = 0; n < a.count; ++n) {
    const BackwardItem<T>& it = a.items[n];
    const T* go = a.go + it.pixel * vpitch;
    const T* v = a.v + it.sel * vpitch;
    Vec acc = Vec{};
    for (int64_t c = 0; c < vpitch; c += N) acc = S::fma(load<Vec>(go + c), load<Vec>(v + c), acc);
    T dot = 0;
    for (int l = 0; l < N; ++l) dot += acc[l];
    const T g = a.scale * (it.grad_score + dot);
    const Vec gv = Vec{} + g;
    if (it.own_sel) {
      const T* q = a.q + it.pixel * pitch;
      T* gk = a.gk + it.sel * pitch;
      for (int64_t c = 0; c < pitch; c += N) store(gk + c, S::fma(gv, load<Vec>(q + c), load<Vec>(gk + c)));
      const Vec sv = Vec{} + it.score;
      T* gval = a.gv + it.sel * vpitch;
      for (int64_t c = 0; c < vpitch; c += N) store(gval + c, S::fma(sv, load<Vec>(go + c), load<Vec>(gval + c)));
    }
    if (it.gq >= 0) {
      const T* k = a.k + it.sel * pitch;
      T* gq = a.gq + it.gq * pitch;
      for (int64_t c = 0; c < pitch; c += N) store(gq + c, S::fma(gv, load<Vec>(k + c), load<Vec>(gq + c)));
    }
  }
}

void backward_row(const BackwardRowArgs<float>& a) { backward_row_impl(a); }
void backward_row(const BackwardRowArgs<double>& a) { backward_row_impl(a); }

void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst, int64_t dst_stride,
               bool add) {
  if (add)
    transpose_impl<float, true>(src, src_stride, rows, cols, dst, dst_stride);
  else
    transpose_impl<float, false>(src, src_stride, rows, cols, dst, dst_stride);
}

void transpose(const double* src, int64_t src_stride, int64_t rows, int64_t cols, double* dst, int64_t dst_stride,
               bool add) {
  if (add)
    transpose_impl<double, true>(src, src_stride, rows, cols, dst, dst_stride);
  else
    transpose_impl<double, false>(src, src_stride, rows, cols, dst, dst_stride);
}

void score_row(const RowArgs<float>& a, int jy, float* best, int32_t* best_j) {
  RowKernel<float>(a).run(jy, best, best_j);
}

void score_row(const RowArgs<double>& a, int jy, double* best, int64_t* best_j) {
  RowKernel<double>(a).run(jy, best, best_j);
}

}  // namespace VSR_SIMD_NS
}  // namespace local_argmax_attention
}  // namespace vsr_kernels
