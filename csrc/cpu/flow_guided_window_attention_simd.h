// The vectorised CPU forward of flow-guided window attention: one row of pixels, compiled
// once per instruction set. Torch-free, included only by the per-ISA translation units
// (flow_guided_window_attention_{base,avx2,avx512}.cpp), which define
//   VSR_SIMD_NS   the namespace of this copy (base, avx2, avx512): each copy is its own code,
//                 so the linker never merges an AVX-512 function into the base path;
//   VSR_SIMD_FMA  1 where fused multiply-add instructions exist.
// Vectors are 32 bytes (kGranuleBytes) in every copy (GCC splits them into two SSE2
// operations in the base copy; AVX-512 runs them as AVX-512VL with 32 registers): head
// channels are padded to whole vectors, so no loop has a tail or a mask.
//
// Per pixel and cell n (visited in increasing n), per head h: s = scale * sum of the lanes of
// sum_j q_j * (k_j + kb_j) (vector j of the head; lanes summed in a fixed order), the online
// softmax step of kernels/flow_guided_window_attention.h (online_step), acc = acc * alpha +
// weight * (v + vb). out = acc / l, lse = m + log l. Deterministic; the rounding differs from
// the generic path only by the summation order of the dot product (and FMA contraction).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "flow_guided_window_attention_isa.h"

#if VSR_SIMD_FMA
#include <immintrin.h>
#endif

namespace vsr_kernels {
namespace flow_guided_window_attention {
namespace VSR_SIMD_NS {

template <typename T>
struct Simd {
  typedef T Vec __attribute__((vector_size(kGranuleBytes)));
  static constexpr int kLanes = kGranuleBytes / sizeof(T);
};

inline Simd<float>::Vec fma(Simd<float>::Vec a, Simd<float>::Vec b, Simd<float>::Vec c) {
#if VSR_SIMD_FMA
  return (Simd<float>::Vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline Simd<double>::Vec fma(Simd<double>::Vec a, Simd<double>::Vec b, Simd<double>::Vec c) {
#if VSR_SIMD_FMA
  return (Simd<double>::Vec)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

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

// Lanes summed pairwise: (0 + L/2, ...), then halves again; fixed order.
template <typename T>
inline T lane_sum(typename Simd<T>::Vec v) {
  constexpr int L = Simd<T>::kLanes;
  T t[L];
  std::memcpy(t, &v, sizeof(t));
  for (int w = L / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// The dot product of head channels [o, o + Dp) of q and k (+ kb).
template <typename T, bool kBiased>
inline T head_dot(const T* q, const T* k, const T* kb, int64_t o, int64_t vecs) {
  using Vec = typename Simd<T>::Vec;
  constexpr int L = Simd<T>::kLanes;
  Vec dot = load<Vec>(q + o) * (kBiased ? load<Vec>(k + o) + load<Vec>(kb + o) : load<Vec>(k + o));
  for (int64_t j = 1; j < vecs; ++j) {
    const int64_t c = o + j * L;
    dot = fma(load<Vec>(q + c), kBiased ? load<Vec>(k + c) + load<Vec>(kb + c) : load<Vec>(k + c), dot);
  }
  return lane_sum<T>(dot);
}

// Windows of at most kTwoPassCells cells (w <= 3) take two passes per pixel instead of the
// online softmax: all logits first, m = their maximum (the online rule: s > m ? s : m),
// P_n = exp(s_n - m) (0 for s_n = -inf), l = sum P_n in n order,
// out = sum_n (P_n / l) v_n, lse = m + log l: half the exponentials and no rescaling of the
// accumulator. The same
// function (NaN, +-inf logits included) up to rounding.
constexpr int64_t kTwoPassCells = 9;
constexpr int64_t kTwoPassHeads = 64;

template <typename T, bool kBiased>
inline void forward_row_two_pass(const RowArgs<T>& a) {
  using Vec = typename Simd<T>::Vec;
  constexpr int L = Simd<T>::kLanes;
  const int64_t Dp = a.padded_dim, Cp = a.heads * Dp, vecs = Dp / L;
  T s[kTwoPassCells * kTwoPassHeads];
  for (int64_t x = 0; x < a.width; ++x) {
    const int64_t* cell = a.cell + x * a.cells;
    if (cell[0] < 0) continue;
    const T* q = a.query + x * Cp;
    T* acc = a.out + x * Cp;
    for (int64_t h0 = 0; h0 < a.heads; h0 += kTwoPassHeads) {
      const int64_t h1 = a.heads - h0 < kTwoPassHeads ? a.heads : h0 + kTwoPassHeads, nh = h1 - h0;
      for (int64_t n = 0; n < a.cells; ++n) {
        const T* k = a.key + cell[n] * Cp;
        const T* kb = kBiased ? a.key_bias + n * Cp : nullptr;
        for (int64_t h = h0; h < h1; ++h) s[n * nh + h - h0] = a.scale * head_dot<T, kBiased>(q, k, kb, h * Dp, vecs);
      }
      for (int64_t h = h0; h < h1; ++h) {
        T m = -std::numeric_limits<T>::infinity(), l = 0;
        for (int64_t n = 0; n < a.cells; ++n) {
          const T v = s[n * nh + h - h0];
          m = v > m ? v : m;
        }
        for (int64_t n = 0; n < a.cells; ++n) {
          T& v = s[n * nh + h - h0];
          v = v == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(v - m);
          l += v;
        }
        a.lse[h * a.lse_head + x] = m + std::log(l);
        const T inv = T(1) / l;
        for (int64_t n = 0; n < a.cells; ++n) s[n * nh + h - h0] *= inv;
      }
      for (int64_t n = 0; n < a.cells; ++n) {
        const T* v = a.value + cell[n] * Cp;
        const T* vb = kBiased ? a.value_bias + n * Cp : nullptr;
        for (int64_t h = h0; h < h1; ++h) {
          const Vec p = Vec{} + s[n * nh + h - h0];
          for (int64_t j = 0; j < vecs; ++j) {
            const int64_t c = h * Dp + j * L;
            const Vec val = kBiased ? load<Vec>(v + c) + load<Vec>(vb + c) : load<Vec>(v + c);
            store(acc + c, n == 0 ? p * val : fma(p, val, load<Vec>(acc + c)));
          }
        }
      }
    }
  }
}

template <typename T, bool kBiased>
inline void forward_row_impl(const RowArgs<T>& a) {
  using Vec = typename Simd<T>::Vec;
  constexpr int L = Simd<T>::kLanes;
  const int64_t Dp = a.padded_dim, Cp = a.heads * Dp, vecs = Dp / L;
  constexpr int64_t kMaxHeads = 64;
  T m[kMaxHeads], l[kMaxHeads];
  for (int64_t x = 0; x < a.width; ++x) {
    const int64_t* cell = a.cell + x * a.cells;
    if (cell[0] < 0) continue;
    const T* q = a.query + x * Cp;
    T* acc = a.out + x * Cp;
    for (int64_t h0 = 0; h0 < a.heads; h0 += kMaxHeads) {
      const int64_t h1 = a.heads - h0 < kMaxHeads ? a.heads : h0 + kMaxHeads;
      for (int64_t h = h0; h < h1; ++h) {
        m[h - h0] = -std::numeric_limits<T>::infinity();
        l[h - h0] = 0;
        for (int64_t j = 0; j < vecs; ++j) store(acc + h * Dp + j * L, Vec{} * T(0));
      }
      for (int64_t n = 0; n < a.cells; ++n) {
        const T* k = a.key + cell[n] * Cp;
        const T* v = a.value + cell[n] * Cp;
        const T* kb = kBiased ? a.key_bias + n * Cp : nullptr;
        const T* vb = kBiased ? a.value_bias + n * Cp : nullptr;
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t o = h * Dp;
          const T s = a.scale * head_dot<T, kBiased>(q, k, kb, o, vecs);
          // online_step of kernels/flow_guided_window_attention.h, restated
          T& mh = m[h - h0];
          T& lh = l[h - h0];
          const T m_new = s > mh ? s : mh;
          const T alpha = mh == m_new ? T(1) : std::exp(mh - m_new);
          const T weight = s == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(s - m_new);
          mh = m_new;
          lh = lh * alpha + weight;
          const Vec va = Vec{} + alpha, vw = Vec{} + weight;
          for (int64_t j = 0; j < vecs; ++j) {
            const int64_t c = o + j * L;
            const Vec val = kBiased ? load<Vec>(v + c) + load<Vec>(vb + c) : load<Vec>(v + c);
            store(acc + c, fma(vw, val, load<Vec>(acc + c) * va));
          }
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        const Vec inv = Vec{} + T(1) / l[h - h0];
        for (int64_t j = 0; j < vecs; ++j) store(acc + h * Dp + j * L, load<Vec>(acc + h * Dp + j * L) * inv);
        a.lse[h * a.lse_head + x] = m[h - h0] + std::log(l[h - h0]);
      }
    }
  }
}

template <typename T>
inline void forward_row_t(const RowArgs<T>& a) {
  if (a.cells <= kTwoPassCells) {
    if (a.key_bias != nullptr)
      forward_row_two_pass<T, true>(a);
    else
      forward_row_two_pass<T, false>(a);
  } else if (a.key_bias != nullptr)
    forward_row_impl<T, true>(a);
  else
    forward_row_impl<T, false>(a);
}

void forward_row(const RowArgs<float>& a) { forward_row_t<float>(a); }
void forward_row(const RowArgs<double>& a) { forward_row_t<double>(a); }

}  // namespace VSR_SIMD_NS
}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
