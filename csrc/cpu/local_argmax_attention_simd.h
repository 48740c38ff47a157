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
// (frame t, row y + (jy - r) * dilation); the launcher keeps the K + 1 most recent ones
// converted and padded in a small per-thread cache, so they are read from L1/L2, and with
// dilation 1 scores query rows two at a time: key row y + 1 + (jy - r) is candidate row jy + 1
// of row y and jy of row y + 1, one pass over it for both.
//
// Semantics are the shared ones (kernels/local_argmax_attention.h): candidates are visited
// in increasing j = jy * K + jx and replace the best only when they beat it (NaN ranks
// highest, a tie keeps the earlier one); "zeros" scores an outside candidate against zero
// keys, multiplied for real, which the zero padding of the key copy does by itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

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

// The kernel of one candidate (key) row against one or two query rows (see RowArgs and
// QueryRow in local_argmax_attention_isa.h for the buffers).
template <typename T>
struct RowKernel : RowArgs<T> {
  explicit RowKernel(const RowArgs<T>& a) : RowArgs<T>(a) {}
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

  // Candidates (rows[i].jy, jx0 .. jx0 + NJ - 1) of pixels x0 .. x0 + lanes - 1 of rows[i], i < n.
  template <int NJ>
  inline void block(int jx0, int64_t x0, const QueryRow<T>* rows, int n) const {
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
#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
    bool all_inside = row_inside;
    for (int i = 0; i < NJ; ++i) all_inside &= inside[i];
    if constexpr (std::is_same_v<T, float> && NJ % 2 == 1) {
      if (all_inside && NJ == kernel_size && dilation == 1 && reinterpret_cast<uintptr_t>(key + x0) % 64 == 0) {
        Vec acc[2][NJ];
        if (n == 2)
          shifted_candidates<2, NJ>(rows, x0, key + x0, acc);
        else
          shifted_candidates<1, NJ>(rows, x0, key + x0, acc);
        for (int row = 0; row < n; ++row) finish<NJ>(rows[row], jx0, x0, inside, acc[row]);
        return;
      }
    }
#endif
    for (int row = 0; row < n; ++row) {
      Vec acc[NJ];
      for (int i = 0; i < NJ; ++i) acc[i] = Vec{};
      const T* q = rows[row].query + x0;
      for (int64_t c = 0; c < channels; ++c) {
        const Vec qv = load<Vec>(q + c * qstride);
        const int64_t k = c * kstride;
        for (int i = 0; i < NJ; ++i) acc[i] = S::fma(qv, load<Vec>(base[i] + k), acc[i]);
      }
      finish<NJ>(rows[row], jx0, x0, inside, acc);
    }
  }

#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
  // Key elements x0 + O .. x0 + O + 15 from the aligned vectors at x0 - 16, x0 and x0 + 16.
  template <int O>
  static inline Vec shifted(__m512i lo, __m512i mid, __m512i hi) {
    if constexpr (O < 0) return (Vec)_mm512_castsi512_ps(_mm512_alignr_epi32(mid, lo, 16 + O));
    else if constexpr (O == 0) return (Vec)_mm512_castsi512_ps(mid);
    else return (Vec)_mm512_castsi512_ps(_mm512_alignr_epi32(hi, mid, O));
  }

  // All NJ = kernel_size candidates of dilation 1 (column offsets -r .. r, r <= 4) of pixels
  // x0 .. x0 + 15 of NR query rows, their key row read with three aligned loads per channel and
  // shifted in registers (valignd) instead of NJ loads each crossing a cache line, which bound
  // the kernel. The shifts and the FMAs share the vector ports, so each shifted vector serves
  // NR = 2 query rows where it can: 18 FMAs per 8 shifts, not 9. The same products and sums as
  // the generic loop: the same bits.
  template <int NR, int NJ>
  inline void shifted_candidates(const QueryRow<T>* rows, int64_t x0, const T* key_x0, Vec (*acc)[NJ]) const {
    constexpr int r = NJ / 2;
    for (int row = 0; row < NR; ++row)
      for (int i = 0; i < NJ; ++i) acc[row][i] = Vec{};
    const T* q[NR];
    for (int row = 0; row < NR; ++row) q[row] = rows[row].query + x0;
    for (int64_t c = 0; c < channels; ++c) {
      Vec qv[NR];
      for (int row = 0; row < NR; ++row) qv[row] = load<Vec>(q[row] + c * qstride);
      const T* k = key_x0 + c * kstride;
      const __m512i lo = _mm512_load_si512(k - 16), mid = _mm512_load_si512(k), hi = _mm512_load_si512(k + 16);
      [&]<int... I>(std::integer_sequence<int, I...>) {
        (
            [&] {
              const Vec kv = shifted<I - r>(lo, mid, hi);
              for (int row = 0; row < NR; ++row) acc[row][I] = S::fma(qv[row], kv, acc[row][I]);
            }(),
            ...);
      }(std::make_integer_sequence<int, NJ>{});
    }
  }
#endif

  // Folds candidates (row.jy, jx0 .. jx0 + NJ - 1) of pixels x0 .. x0 + lanes - 1 with their dot
  // products acc into row.best and row.best_j.
  template <int NJ>
  inline void finish(const QueryRow<T>& row, int jx0, int64_t x0, const bool* inside, const Vec* acc) const {
    const int r = kernel_size / 2;
    T* best = row.best;
    Lane* best_j = row.best_j;
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
      bj = take ? (Mask{} + (row.jy * kernel_size + jx0 + i)) : bj;
    }
    store(best + x0, bs);
    store(best_j + x0, bj);
  }

  // Candidates jx0 .. jx0 + NJ - 1 (NJ <= kBlock) of every pixel of the rows.
  template <int NJ>
  inline void columns(int jx0, const QueryRow<T>* rows, int n) const {
    for (int64_t x0 = 0; x0 < rounded_width; x0 += S::kLanes) block<NJ>(jx0, x0, rows, n);
  }

  void run(const QueryRow<T>* rows, int n) const {
    for (int jx0 = 0; jx0 < kernel_size; jx0 += kBlock) {
      switch (kernel_size - jx0 < kBlock ? kernel_size - jx0 : kBlock) {
        case 1: columns<1>(jx0, rows, n); break;
        case 2: columns<2>(jx0, rows, n); break;
        case 3: columns<3>(jx0, rows, n); break;
        case 4: columns<4>(jx0, rows, n); break;
        case 5: columns<5>(jx0, rows, n); break;
        case 6: columns<6>(jx0, rows, n); break;
        case 7: columns<7>(jx0, rows, n); break;
        case 8: columns<8>(jx0, rows, n); break;
        default: columns<kBlock>(jx0, rows, n); break;
      }
    }
  }
};

// out = best * value[sel] for whole vectors of pixels, gathered from the value planes (a window
// of 2 * reach + 1 rows of each, in L1/L2); returns how far.
inline int64_t select_vectors(const SelectArgs<float>& a, int64_t c) {
  int64_t x = 0;
  const float* __restrict v = a.value + c * a.value_stride;
  float* __restrict out = a.out + c * a.out_stride;
#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
  const __m512i zero = _mm512_setzero_si512();
  for (; x + 16 <= a.width; x += 16) {
    const __m512i s = _mm512_loadu_si512(a.sel + x);
    const __m512 value = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), _mm512_cmpge_epi32_mask(s, zero), s, v, 4);
    _mm512_storeu_ps(out + x, _mm512_mul_ps(_mm512_loadu_ps(a.best + x), value));
  }
#elif VSR_SIMD_FMA && VSR_SIMD_BYTES == 32
  const __m256i minus = _mm256_set1_epi32(-1);
  for (; x + 8 <= a.width; x += 8) {
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.sel + x));
    const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(s, minus));
    const __m256 value = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), v, s, m, 4);
    _mm256_storeu_ps(out + x, _mm256_mul_ps(_mm256_loadu_ps(a.best + x), value));
  }
#else
  (void)v, (void)out;
#endif
  return x;
}

template <typename T>
inline void select_values_impl(const SelectArgs<T>& a) {
  for (int64_t c = 0; c < a.channels; ++c) {
    int64_t x = 0;
    if constexpr (std::is_same_v<T, float>) x = select_vectors(a, c);
    const T* __restrict v = a.value + c * a.value_stride;
    T* __restrict out = a.out + c * a.out_stride;
    for (; x < a.width; ++x) out[x] = a.best[x] * (a.sel[x] < 0 ? T(0) : v[a.sel[x]]);
  }
}

void select_values(const SelectArgs<float>& a) { select_values_impl(a); }
void select_values(const SelectArgs<double>& a) { select_values_impl(a); }

#include "local_argmax_attention_tiles.h"

// ---------------------------------------------------------------------------------------
// Backward (see backward_cpu in local_argmax_attention.cpp for the phases and tasks). Scalar
// loops over unit-stride channel planes: every access streams or hits a window of 2 * reach + 1
// rows, and each output element receives its terms in increasing pixel order.

template <typename T>
inline T scalar_fma(T a, T b, T c) {
#if VSR_SIMD_FMA
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

template <>
inline float scalar_fma<float>(float a, float b, float c) {
#if VSR_SIMD_FMA
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// The lines of [begin, end), `per_step` of them at each call of step().
struct Prefetcher {
  const char *next, *end;
  int64_t per_step;
  Prefetcher(const void* begin, const void* end_, int64_t steps)
      : next(static_cast<const char*>(begin)), end(static_cast<const char*>(end_)),
        per_step(steps > 0 ? ((end - next) / 64 + steps) / steps : 0) {}
  inline void step() {
    for (int64_t i = 0; i < per_step && next < end; ++i, next += 64) prefetch_line<0>(next);
  }
  inline void all() {
    for (; next < end; next += 64) prefetch_line<0>(next);
  }
};

// acc[i] += go[i] * v[max(sel[i], 0)] for the leading whole vectors of i < n; returns how far.
inline int64_t gather_fma_clamped(const float* __restrict go, const float* __restrict v,
                                  const int32_t* __restrict sel, float* __restrict acc, int64_t n, Prefetcher& pf) {
  int64_t i = 0;
#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
  const __m512i zero = _mm512_setzero_si512();
  for (; i + 16 <= n; i += 16) {
    pf.step();
    const __m512i s = _mm512_max_epi32(_mm512_loadu_si512(sel + i), zero);
    const __m512 value = _mm512_i32gather_ps(s, v, 4);
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(_mm512_loadu_ps(go + i), value, _mm512_loadu_ps(acc + i)));
  }
#elif VSR_SIMD_FMA && VSR_SIMD_BYTES == 32
  const __m256i zero = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    pf.step();
    const __m256i s = _mm256_max_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sel + i)), zero);
    const __m256 value = _mm256_i32gather_ps(v, s, 4);
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(_mm256_loadu_ps(go + i), value, _mm256_loadu_ps(acc + i)));
  }
#else
  (void)go, (void)v, (void)sel, (void)acc, (void)n, (void)pf;
#endif
  return i;
}

// gq[p] += g[p] * k[sel[p]] where sel[p] >= 0, for the leading whole vectors of p in [p0, p1);
// returns how far.
inline int64_t gather_fma_masked(const float* __restrict g, const float* __restrict k, const int32_t* __restrict sel,
                                 float* __restrict gq, int64_t p0, int64_t p1, Prefetcher& pf) {
  int64_t p = p0;
#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
  const __m512i zero = _mm512_setzero_si512();
  for (; p + 16 <= p1; p += 16) {
    pf.step();
    const __m512i s = _mm512_loadu_si512(sel + p);
    const __mmask16 m = _mm512_cmpge_epi32_mask(s, zero);
    const __m512 key = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, s, k, 4);
    _mm512_storeu_ps(gq + p, _mm512_mask3_fmadd_ps(_mm512_loadu_ps(g + p), key, _mm512_loadu_ps(gq + p), m));
  }
#elif VSR_SIMD_FMA && VSR_SIMD_BYTES == 32
  const __m256i minus = _mm256_set1_epi32(-1);
  for (; p + 8 <= p1; p += 8) {
    pf.step();
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sel + p));
    const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(s, minus));
    const __m256 key = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), k, s, m, 4);
    const __m256 old = _mm256_loadu_ps(gq + p);
    _mm256_storeu_ps(gq + p, _mm256_blendv_ps(old, _mm256_fmadd_ps(_mm256_loadu_ps(g + p), key, old), m));
  }
#else
  (void)g, (void)k, (void)sel, (void)gq, (void)p1, (void)pf;
#endif
  return p;
}

template <typename T>
inline void selection_grad_impl(const SelectionArgs<T>& a) {
  const int64_t W = a.width, H = a.height, r = a.kernel_size / 2, d = a.dilation;
  const int32_t K = a.kernel_size, K2 = K * K;
  const int64_t n = a.p1 - a.p0;
  int32_t* __restrict sel = a.sel + a.p0;
  T* __restrict acc = a.acc;
  // Candidate j's row and column offsets, looked up: a division by K per pixel cost ~10 % of
  // the backward.
  std::vector<int64_t> offsets(2 * static_cast<int64_t>(K2));
  for (int32_t j = 0; j < K2; ++j) offsets[2 * j] = (j / K - r) * d, offsets[2 * j + 1] = (j % K - r) * d;
  // p0 and p1 are whole rows.
  for (int64_t y = a.p0 / W, i = 0; i < n; ++y) {
    for (int64_t x = 0; x < W; ++x, ++i) {
      const int64_t j = a.index[a.p0 + i];
      int32_t s = -1;
      // An index outside [0, K * K) selects nothing (only a direct call can pass one); neither
      // does a candidate outside the frame (a zero-padded key: nothing to differentiate).
      if (j >= 0 && j < K2) {
        const int64_t sy = y + offsets[2 * j], sx = x + offsets[2 * j + 1];
        if (sy >= 0 && sy < H && sx >= 0 && sx < W) s = static_cast<int32_t>(sy * W + sx);
      }
      sel[i] = s;
      acc[i] = T(0);
    }
  }
  // <grad_out[p], value[sel]> channel by channel in increasing c; pixels selecting nothing
  // read value pixel 0 and their sum is never used.
  // The window of value pixels the band's pixels can select.
  const int64_t lo = std::max<int64_t>(0, a.p0 - a.reach * (W + 1)), hi = std::min(H * W, a.p1 + a.reach * (W + 1));
  int64_t c = 0;
  if constexpr (std::is_same_v<T, float>)
    if (a.tile_lanes) c = selection_tiles(a, sel, acc, n, lo, hi);
  if (c < a.channels) Prefetcher(a.v + c * a.channel_stride + lo, a.v + c * a.channel_stride + hi, 1).all();
  for (; c < a.channels; ++c) {
    const T* __restrict go = a.go + c * a.channel_stride + a.p0;
    const T* __restrict v = a.v + c * a.channel_stride;
    const T* next = v + (c + 1 < a.channels ? a.channel_stride : 0);
    Prefetcher pf(next + lo, next + (c + 1 < a.channels ? hi : lo), n / Simd<T>::kLanes);
    int64_t i = 0;
    if constexpr (std::is_same_v<T, float>) i = gather_fma_clamped(go, v, sel, acc, n, pf);
    for (; i < n; ++i) acc[i] = scalar_fma(go[i], v[sel[i] < 0 ? 0 : sel[i]], acc[i]);
  }
  T* __restrict g = a.g + a.p0;
  const T* __restrict gs = a.gs + a.p0;
  for (int64_t i = 0; i < n; ++i) g[i] = a.scale * (gs[i] + acc[i]);
}

// key_band over NC channels: sel, g (and score) are loaded and tested once per pixel for all of
// them, which the scatters' instruction count was bound by.
template <typename T, int NC>
inline void key_band_channels(const KeyBandArgs<T>& a) {
  const int64_t P = a.pixels;
  T* __restrict gq = a.gq;
  const T* __restrict q = a.q;
  for (int c = 0; c < NC; ++c)
    for (int64_t p = a.p0; p < a.p1; ++p) gq[c * P + p] = T(0);
  // The window of key pixels the band's pixels can select.
  const int64_t lo = std::max<int64_t>(0, a.p0 - a.reach * (a.width + 1)),
                hi = std::min(a.pixels, a.p1 + a.reach * (a.width + 1));
  if (a.frames > 0)
    for (int c = 0; c < NC; ++c) Prefetcher(a.k + c * P + lo, a.k + c * P + hi, 1).all();
  const ValueBandArgs<T>* v = a.value;
  for (int64_t t = 0; t < a.frames; ++t) {
    const int32_t* __restrict sel = a.sel + t * a.pixels;
    const T* __restrict g = a.g + t * a.pixels;
    T* __restrict gk = a.gk + t * a.frame_stride;
    for (int c = 0; c < NC; ++c) {
      const T* __restrict k = a.k + t * a.frame_stride + c * P;
      for (int64_t p = a.zero0; p < a.zero1; ++p) gk[c * P + p] = T(0);
      const T* next = k + (t + 1 < a.frames ? a.frame_stride : 0);
      Prefetcher pf(next + lo, next + (t + 1 < a.frames ? hi : lo), (a.p1 - a.p0) / Simd<T>::kLanes);
      T* __restrict gqc = gq + c * P;
      int64_t p = a.p0;
      if constexpr (std::is_same_v<T, float>) p = gather_fma_masked(g, k, sel, gqc, p, a.p1, pf);
      for (; p < a.p1; ++p)
        if (const int32_t s = sel[p]; s >= 0) gqc[p] = scalar_fma(g[p], k[s], gqc[p]);
    }
    if (v) {
      // The value channels' scatters in the same pass: one sel load and test for all.
      const T* __restrict score = v->score + t * a.pixels;
      const T* __restrict go = v->go + t * v->frame_stride;
      T* __restrict gv = v->gv + t * v->frame_stride;
      for (int c = 0; c < NC; ++c)
        for (int64_t p = v->zero0; p < v->zero1; ++p) gv[c * P + p] = T(0);
      for (int64_t p = a.p0; p < a.p1; ++p)
        if (const int32_t s = sel[p]; s >= 0) {
          const T gp = g[p], sp = score[p];
          for (int c = 0; c < NC; ++c) {
            gk[s + c * P] = scalar_fma(gp, q[p + c * P], gk[s + c * P]);
            gv[s + c * P] = scalar_fma(sp, go[p + c * P], gv[s + c * P]);
          }
        }
    } else {
      for (int64_t p = a.p0; p < a.p1; ++p)
        if (const int32_t s = sel[p]; s >= 0) {
          const T gp = g[p];
          for (int c = 0; c < NC; ++c) gk[s + c * P] = scalar_fma(gp, q[p + c * P], gk[s + c * P]);
        }
    }
  }
}

// Channels per key_band_channels call: 4 keeps a pixel's 8 scatter targets and 8 sources in
// distinct registers' reach (one index add per channel).
constexpr int kScatterChannels = 4;

template <typename T>
inline void key_band_impl(const KeyBandArgs<T>& a) {
  KeyBandArgs<T> part = a;
  ValueBandArgs<T> value_part = a.value ? *a.value : ValueBandArgs<T>{};
  for (int64_t c = 0; c < a.channels;) {
    const int64_t n = a.channels - c >= kScatterChannels ? kScatterChannels : 1, offset = c * a.pixels;
    part.q = a.q + offset, part.gq = a.gq + offset, part.k = a.k + offset, part.gk = a.gk + offset;
    if (a.value) {
      value_part.go = a.value->go + offset, value_part.gv = a.value->gv + offset;
      part.value = &value_part;
    }
    if (n == kScatterChannels) key_band_channels<T, kScatterChannels>(part);
    else key_band_channels<T, 1>(part);
    c += n;
  }
}

template <typename T>
inline void value_band_impl(const ValueBandArgs<T>& a) {
  for (int64_t t = 0; t < a.frames; ++t) {
    const int32_t* __restrict sel = a.sel + t * a.pixels;
    const T* __restrict score = a.score + t * a.pixels;
    const T* __restrict go = a.go + t * a.frame_stride;
    T* __restrict gv = a.gv + t * a.frame_stride;
    for (int64_t p = a.zero0; p < a.zero1; ++p) gv[p] = T(0);
    for (int64_t p = a.p0; p < a.p1; ++p) {
      const int32_t s = sel[p];
      if (s < 0) continue;
      gv[s] = scalar_fma(score[p], go[p], gv[s]);
    }
  }
}

void selection_grad(const SelectionArgs<float>& a) { selection_grad_impl(a); }
void selection_grad(const SelectionArgs<double>& a) { selection_grad_impl(a); }
void key_band(const KeyBandArgs<float>& a) { key_band_impl(a); }
void key_band(const KeyBandArgs<double>& a) { key_band_impl(a); }
void value_band(const ValueBandArgs<float>& a) { value_band_impl(a); }
void value_band(const ValueBandArgs<double>& a) { value_band_impl(a); }

void score_rows(const RowArgs<float>& a, const QueryRow<float>* rows, int n) { RowKernel<float>(a).run(rows, n); }
void score_rows(const RowArgs<double>& a, const QueryRow<double>* rows, int n) { RowKernel<double>(a).run(rows, n); }

}  // namespace VSR_SIMD_NS
}  // namespace local_argmax_attention
}  // namespace vsr_kernels
