// The vectorised CPU kernels of flow-guided window attention: one row of pixels, compiled
// once per instruction set (two forms: the padded channels-last forward_row described here,
// and the channels-first forward_planes_row / backward_planes_row further down). Torch-free, included only by the per-ISA translation units
// (flow_guided_window_attention_{base,avx2,avx512}.cpp), which define
//   VSR_SIMD_NS   the namespace of this copy (base, avx2, avx512): each copy is its own code,
//                 so the linker never merges an AVX-512 function into the base path;
//   VSR_SIMD_FMA  1 where fused multiply-add instructions exist;
//   VSR_SIMD_BYTES the vector width of the channels-first kernels (16, 32, 64).
// forward_row's vectors are 32 bytes (kGranuleBytes) in every copy (GCC splits them into two SSE2
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
#include <type_traits>

#include "flow_guided_window_attention_isa.h"

#if VSR_SIMD_FMA || VSR_SIMD_BYTES > 16
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

// (w <= 3 takes the channels-first kernels below; the last session's two-pass softmax for
// small windows of this form went with it.)
template <typename T>
inline void forward_row_t(const RowArgs<T>& a) {
  if (a.key_bias != nullptr)
    forward_row_impl<T, true>(a);
  else
    forward_row_impl<T, false>(a);
}

void forward_row(const RowArgs<float>& a) { forward_row_t<float>(a); }
void forward_row(const RowArgs<double>& a) { forward_row_t<double>(a); }

// ---------------------------------------------------------------------------------------
// The channels-first forward (PlaneArgs, w <= 3): vectors of kLanes consecutive pixels of a
// row, VSR_SIMD_BYTES wide (16 in the base copy, 32 with AVX2, 64 with AVX-512); a cell's
// key and value are gathered per lane (vgatherdps/pd where the instruction set has it, one
// load per lane otherwise). Per head h and block of pixels, in this order:
//   s_n = scale * sum_d q_d * (k_d(cell n) + kb[n]_d)   (d in increasing order, FMA per lane),
//   m = max_n s_n (the rule s > m ? s : m from -inf), P_n = exp(s_n - m) (0 for s_n = -inf),
//   l = sum_n P_n in n order, lse = m + log l, out_d = sum_n (P_n / l) (v_d(cell n) + vb[n]_d).
// float32 exponentials are a vector polynomial (below); float64 takes std::exp per lane.

template <typename T>
struct Plane;
template <>
struct Plane<float> {
  static constexpr int kLanes = VSR_SIMD_BYTES / 4;
  typedef float Vec __attribute__((vector_size(VSR_SIMD_BYTES)));
  typedef int32_t Idx __attribute__((vector_size(VSR_SIMD_BYTES)));
};
template <>
struct Plane<double> {
  static constexpr int kLanes = VSR_SIMD_BYTES / 8;
  typedef double Vec __attribute__((vector_size(VSR_SIMD_BYTES)));
  typedef int32_t Idx __attribute__((vector_size(VSR_SIMD_BYTES / 2)));
};

// A cell's values for the lanes of a block of pixels: lane j reads base[idx[j]]. Hardware
// gathers (vgatherdps) measured slower here than one load per lane (AMD Zen 5: 336 vs 129
// Mcycles per forward call), so lanes are grouped into runs instead: lanes j with the same
// idx[j] - j read consecutive addresses, one masked vector load at base + (idx[j] - j) serves
// them all. Adjacent pixels of a smooth flow share their integer offset or differ by one, so
// a block of 16 pixels has a few runs per cell (4-6 with the benchmark's noisy flow), and
// the runs are found once per block and cell and reused for every channel of key and value.
// More than kMaxRuns runs (clamped windows at the frame's border, wild flow), and the base
// copy: one load per lane. A run is a whole unmasked vector load blended into the result
// (masked loads measured 2.5x slower than load + blend here), so it must lie inside the
// plane; else, one load per lane.
template <typename T>
struct Runs {
  using V = typename Plane<T>::Vec;
  using I = typename Plane<T>::Idx;
  static constexpr int L = Plane<T>::kLanes;
#if VSR_SIMD_BYTES > 16
  static constexpr int kMaxRuns = L / 2;
#else
  static constexpr int kMaxRuns = 0;
#endif
  int count;  // 0: one load per lane
  I idx;
  int32_t off[kMaxRuns > 0 ? kMaxRuns : 1];
#if VSR_SIMD_BYTES == 64
  uint32_t mask[kMaxRuns];
#elif VSR_SIMD_BYTES == 32
  typedef int64_t Wide __attribute__((vector_size(32)));
  typedef typename std::conditional<sizeof(T) == 4, I, Wide>::type M;  // lane masks of T's width
  M mask[kMaxRuns];
#endif

  // cell: the block's int32 pixel indices; plane: pixels per plane (a run's whole vector must
  // lie inside it: it is loaded unmasked, then blended).
  void build(const int32_t* cell, int64_t plane) {
    idx = load<I>(cell);
    count = 0;
    if (kMaxRuns == 0) return;
    uint32_t bits[kMaxRuns > 0 ? kMaxRuns : 1] = {};
    for (int j = 0; j < L; ++j) {
      const int32_t o = idx[j] - j;
      int r = 0;
      while (r < count && off[r] != o) ++r;
      if (r == count) {
        if (count == kMaxRuns || o < 0 || o + L > plane) {
          count = 0;
          return;
        }
        off[count++] = o;
      }
      bits[r] |= 1u << j;
    }
    for (int r = 0; r < count; ++r) {
#if VSR_SIMD_BYTES == 64
      mask[r] = bits[r];
#elif VSR_SIMD_BYTES == 32
      for (int j = 0; j < L; ++j) mask[r][j] = (bits[r] >> j) & 1 ? -1 : 0;
#endif
    }
  }

  V lanes(const T* base) const {
    T t[L];
    for (int j = 0; j < L; ++j) t[j] = base[idx[j]];
    return load<V>(t);
  }

  V gather(const T* base) const;
};

#if VSR_SIMD_BYTES == 64
template <>
inline Plane<float>::Vec Runs<float>::gather(const float* base) const {
  if (count == 0) return lanes(base);
  __m512 v = _mm512_loadu_ps(base + off[0]);
  for (int r = 1; r < count; ++r) v = _mm512_mask_blend_ps((__mmask16)mask[r], v, _mm512_loadu_ps(base + off[r]));
  return (Plane<float>::Vec)v;
}
template <>
inline Plane<double>::Vec Runs<double>::gather(const double* base) const {
  if (count == 0) return lanes(base);
  __m512d v = _mm512_loadu_pd(base + off[0]);
  for (int r = 1; r < count; ++r) v = _mm512_mask_blend_pd((__mmask8)mask[r], v, _mm512_loadu_pd(base + off[r]));
  return (Plane<double>::Vec)v;
}
#elif VSR_SIMD_BYTES == 32
template <>
inline Plane<float>::Vec Runs<float>::gather(const float* base) const {
  if (count == 0) return lanes(base);
  __m256 v = _mm256_loadu_ps(base + off[0]);
  for (int r = 1; r < count; ++r) v = _mm256_blendv_ps(v, _mm256_loadu_ps(base + off[r]), (__m256)mask[r]);
  return (Plane<float>::Vec)v;
}
template <>
inline Plane<double>::Vec Runs<double>::gather(const double* base) const {
  if (count == 0) return lanes(base);
  __m256d v = _mm256_loadu_pd(base + off[0]);
  for (int r = 1; r < count; ++r) v = _mm256_blendv_pd(v, _mm256_loadu_pd(base + off[r]), (__m256d)mask[r]);
  return (Plane<double>::Vec)v;
}
#else
template <typename T>
inline typename Plane<T>::Vec Runs<T>::gather(const T* base) const {
  return lanes(base);
}
#endif

// a * b + c, fused where the instruction set has it (the same instruction in every call).
inline Plane<float>::Vec pfma(Plane<float>::Vec a, Plane<float>::Vec b, Plane<float>::Vec c) {
#if VSR_SIMD_BYTES == 64
  return (Plane<float>::Vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif VSR_SIMD_BYTES == 32 && VSR_SIMD_FMA
  return (Plane<float>::Vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline Plane<double>::Vec pfma(Plane<double>::Vec a, Plane<double>::Vec b, Plane<double>::Vec c) {
#if VSR_SIMD_BYTES == 64
  return (Plane<double>::Vec)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif VSR_SIMD_BYTES == 32 && VSR_SIMD_FMA
  return (Plane<double>::Vec)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

// exp(x) for x <= 0 or NaN (x = s - max s): float32 as a vector polynomial (Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial of r, 2^n built in the
// exponent bits; about 1 ulp), exactly 0 below -87 (where exp is below the smallest normal
// float: the weight of such a cell is < 2^-125 of the largest, so out does not change), NaN
// kept. float64: std::exp per lane.
inline Plane<float>::Vec vexp(Plane<float>::Vec x) {
  using V = Plane<float>::Vec;
  using I = Plane<float>::Idx;
  const V xc = x < -87.0f ? V{} - 87.0f : x;
  V fx = xc * 1.44269504088896341f + 0.5f;
  const I t = __builtin_convertvector(fx, I);
  V ft = __builtin_convertvector(t, V);
  ft = ft > fx ? ft - 1.0f : ft;  // floor
  const I n = __builtin_convertvector(ft, I);
  V r = xc - ft * 0.693359375f;
  r = r - ft * -2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const I bits = (n + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  return x >= -87.0f ? y : (x == x ? V{} : x);
}
inline Plane<double>::Vec vexp(Plane<double>::Vec x) {
  for (int j = 0; j < Plane<double>::kLanes; ++j) x[j] = std::exp(x[j]);
  return x;
}

// log(x) of float32 lanes, evaluated in float64 and rounded once (so correctly rounded but for
// results within ~1e-15 of a rounding boundary; libm's logf, called per lane before, cost ~12 %
// of the forward's instructions): x = 2^e m with m in [sqrt(1/2), sqrt(2)), s = (m - 1) / (m + 1),
// log m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^21/21) (|s| <= 0.1716: the next term is below
// 1e-17 of the sum). Exact at powers of two (s = 0). x = +-0: -inf; +inf: +inf; NaN or x < 0:
// NaN; float32 subnormals are normal in float64.
inline Plane<float>::Vec vlog(Plane<float>::Vec x) {
  // In two halves of L / 2 lanes, each a float64 vector of the native width: a float64 vector
  // of all L lanes is twice the native width, and GCC turns its selects (?:) into one scalar
  // compare and blend per lane (~300 instructions per call).
  constexpr int L = Plane<float>::kLanes, H = L / 2;
  typedef float F __attribute__((vector_size(H * 4)));
  typedef double D __attribute__((vector_size(H * 8)));
  typedef int64_t I __attribute__((vector_size(H * 8)));
  F part[2];
  std::memcpy(part, &x, sizeof(part));
  for (int half = 0; half < 2; ++half) {
    const D xd = __builtin_convertvector(part[half], D);
    I bits;
    std::memcpy(&bits, &xd, sizeof(bits));
    I e = ((bits >> 52) & 0x7ff) - 1023;
    const I mant = (bits & 0x000fffffffffffffLL) | (int64_t(1023) << 52);
    D m;
    std::memcpy(&m, &mant, sizeof(m));  // [1, 2)
    const auto high = m > 1.4142135623730951;
    m = high ? m * 0.5 : m;
    e = high ? e + 1 : e;
    const D s = (m - 1.0) / (m + 1.0), s2 = s * s;
    D poly = D{} + 1.0 / 21;
    for (int k = 9; k >= 0; --k) poly = poly * s2 + 1.0 / (2 * k + 1);
    const D r = __builtin_convertvector(e, D) * 0.69314718055994530942 + 2.0 * s * poly;
    part[half] = __builtin_convertvector(r, F);
  }
  Plane<float>::Vec y;
  std::memcpy(&y, part, sizeof(y));
  constexpr float inf = std::numeric_limits<float>::infinity();
  y = x == 0.0f ? Plane<float>::Vec{} - inf : y;
  y = x == inf ? x : y;
  return x > 0.0f || x == 0.0f ? y : Plane<float>::Vec{} + std::numeric_limits<float>::quiet_NaN();
}
inline Plane<double>::Vec vlog(Plane<double>::Vec x) {
  for (int j = 0; j < Plane<double>::kLanes; ++j) x[j] = std::log(x[j]);
  return x;
}

constexpr bool kPrefetch = VSR_SIMD_BYTES > 16;

inline bool aligned_vector(const void* p) { return reinterpret_cast<uintptr_t>(p) % VSR_SIMD_BYTES == 0; }

// A non-temporal store of a whole vector at an aligned address (then an sfence before the
// results are handed over: forward_planes_row).
inline void stream_store(float* p, Plane<float>::Vec v) {
#if VSR_SIMD_BYTES == 64
  _mm512_stream_ps(p, (__m512)v);
#elif VSR_SIMD_BYTES == 32
  _mm256_stream_ps(p, (__m256)v);
#else
  store(p, v);  // the base copy: any CPU
#endif
}
inline void stream_store(double* p, Plane<double>::Vec v) {
#if VSR_SIMD_BYTES == 64
  _mm512_stream_pd(p, (__m512d)v);
#elif VSR_SIMD_BYTES == 32
  _mm256_stream_pd(p, (__m256d)v);
#else
  store(p, v);
#endif
}
constexpr bool kWideRows = VSR_SIMD_BYTES == 64;  // a vector's row spans two lines

// Where the next block's key/value rows start (after the block's last pixel's first and last
// cell), kept inside the plane.
template <typename T, int kCells>
inline void prefetch_targets(const int32_t* cell, int64_t cell_stride, int64_t plane, int64_t valid,
                             int64_t* ahead) {
  constexpr int L = Plane<T>::kLanes;
  ahead[0] = cell[valid - 1] + 1;
  ahead[1] = cell[(kCells - 1) * cell_stride + valid - 1] + 1;
  for (int i = 0; i < 2; ++i) ahead[i] = ahead[i] + L > plane ? (plane > L ? plane - L : 0) : ahead[i];
}

template <typename T>
inline void prefetch_rows(const T* base, const int64_t* ahead) {
  constexpr int L = Plane<T>::kLanes;
  if (!kPrefetch) return;
  __builtin_prefetch(base + ahead[0], 0, 2);
  __builtin_prefetch(base + ahead[1], 0, 2);
  if (kWideRows) {
    __builtin_prefetch(base + ahead[0] + L - 1, 0, 2);
    __builtin_prefetch(base + ahead[1] + L - 1, 0, 2);
  }
}

// Heads per group: the logits of a group's heads are computed before any of their softmaxes,
// and the softmaxes before any value pass, so the out-of-order core overlaps one head's softmax
// (a chain of ~100 cycles: the exponentials' polynomial, 1 / l) with the other heads' work; in
// head order, each value pass waited for its softmax with a full reorder buffer.
constexpr int64_t kHeadGroup = 8;

template <typename T, int kCells, bool kBiased, bool kFull, typename Gather>
inline void planes_body(const PlaneArgs<T>& a, int64_t x0, int64_t valid, Gather gather) {
  // gather by value, and a's fields in locals: offsets, indices, masks, prefetch targets and
  // pointers stay in registers (through references they were reloaded for every channel, as
  // the stores might alias them).
  using V = typename Plane<T>::Vec;
  constexpr int L = Plane<T>::kLanes;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const int64_t D = a.head_dim, heads = a.heads, lse_head = a.lse_head;
  const int64_t qs = a.channel[0], ks = a.channel[1], vs = a.channel[2], os = a.channel[3];
  const T* const query = a.query + x0;
  const T* const key = a.key;
  const T* const value = a.value;
  const T* const key_bias = a.key_bias;
  const T* const value_bias = a.value_bias;
  T* const out = a.out + x0;
  T* const lse = a.lse + x0;
  const T scale = a.scale;
  auto load_q = [&](const T* p) {
    if (kFull) return load<V>(p);
    V v = {};
    std::memcpy(&v, p, valid * sizeof(T));
    return v;
  };
  // out's vectors are whole aligned lines (AVX-512) where out and its channel stride are
  // aligned: stored non-temporally (no read for ownership of a line about to be overwritten).
  const bool stream = kFull && aligned_vector(out) && (os * sizeof(T)) % VSR_SIMD_BYTES == 0;
  for (int64_t h0 = 0; h0 < heads; h0 += kHeadGroup) {
    const int64_t group = heads - h0 < kHeadGroup ? heads - h0 : kHeadGroup;
    V s[kHeadGroup][kCells];
    for (int64_t i = 0; i < group; ++i) {
      V acc[kCells];  // in registers (s[i] is indexed at run time: GCC kept it in memory)
      for (int n = 0; n < kCells; ++n) acc[n] = V{};
      for (int64_t c = (h0 + i) * D; c < (h0 + i + 1) * D; ++c) {
        const V q = load_q(query + c * qs);
        const T* k = key + c * ks;
        if (kPrefetch) __builtin_prefetch(query + c * qs + L, 0, 2);
        gather.prefetch(k);
        V kv[kCells];
        gather(k, kv);
        for (int n = 0; n < kCells; ++n) {
          if (kBiased) kv[n] = kv[n] + key_bias[c * kCells + n];
          acc[n] = pfma(q, kv[n], acc[n]);
        }
      }
      for (int n = 0; n < kCells; ++n) s[i][n] = acc[n];
    }
    for (int64_t i = 0; i < group; ++i) {
      V m = V{} - inf;
      for (int n = 0; n < kCells; ++n) {
        s[i][n] = s[i][n] * scale;
        m = s[i][n] > m ? s[i][n] : m;
      }
      V l = V{};
      for (int n = 0; n < kCells; ++n) {
        const V p = vexp(s[i][n] - m);
        s[i][n] = s[i][n] == -inf ? V{} : p;
        l = l + s[i][n];
      }
      const V lse_h = m + vlog(l);
      if (kFull)
        store(lse + (h0 + i) * lse_head, lse_h);
      else
        std::memcpy(lse + (h0 + i) * lse_head, &lse_h, valid * sizeof(T));
      const V inv = (V{} + T(1)) / l;
      for (int n = 0; n < kCells; ++n) s[i][n] = s[i][n] * inv;
    }
    for (int64_t i = 0; i < group; ++i) {
      V p[kCells];
      for (int n = 0; n < kCells; ++n) p[n] = s[i][n];
      for (int64_t c = (h0 + i) * D; c < (h0 + i + 1) * D; ++c) {
        const T* v = value + c * vs;
        if (kPrefetch && !stream) __builtin_prefetch(out + c * os + L, 1, 2);
        gather.prefetch(v);
        V vv[kCells];
        gather(v, vv);
        V o = {};
        for (int n = 0; n < kCells; ++n) {
          if (kBiased) vv[n] = vv[n] + value_bias[c * kCells + n];
          o = n == 0 ? p[0] * vv[0] : pfma(p[n], vv[n], o);
        }
        T* to = out + c * os;
        if (kFull && stream)
          stream_store(to, o);
        else if (kFull)
          store(to, o);
        else
          std::memcpy(to, &o, valid * sizeof(T));
      }
    }
  }
}

// Where every cell's runs are cell 0's shifted by one offset (no cell clamped differently:
// the interior of the frame), with 1 to 4 runs: the masks and offsets held in registers for
// the whole block and the loads unrolled (the generic Runs::gather reloads them per load).
template <typename T, int kCount, int kCells>
struct SharedRuns {
  using V = typename Plane<T>::Vec;
  int64_t off[kCount];
  int64_t shift[kCells];
  int64_t ahead[2];  // prefetch targets (prefetch_targets)
  void prefetch(const T* base) const { prefetch_rows(base, ahead); }
#if VSR_SIMD_BYTES == 64
  uint32_t mask[kCount];
#elif VSR_SIMD_BYTES == 32
  typename Runs<T>::M mask[kCount];
#endif
  void operator()(const T* base, V* cell) const {
    for (int n = 0; n < kCells; ++n) cell[n] = one(base, n);
  }
  V one(const T* base, int n) const {
    const T* p = base + shift[n];
#if VSR_SIMD_BYTES == 64
    if constexpr (sizeof(T) == 4) {
      __m512 v = _mm512_loadu_ps(p + off[0]);
      for (int r = 1; r < kCount; ++r) v = _mm512_mask_loadu_ps(v, (__mmask16)mask[r], p + off[r]);
      return (V)v;
    } else {
      __m512d v = _mm512_loadu_pd(p + off[0]);
      for (int r = 1; r < kCount; ++r) v = _mm512_mask_loadu_pd(v, (__mmask8)mask[r], p + off[r]);
      return (V)v;
    }
#elif VSR_SIMD_BYTES == 32
    if constexpr (sizeof(T) == 4) {
      __m256 v = _mm256_loadu_ps(p + off[0]);
      for (int r = 1; r < kCount; ++r) v = _mm256_blendv_ps(v, _mm256_loadu_ps(p + off[r]), (__m256)mask[r]);
      return (V)v;
    } else {
      __m256d v = _mm256_loadu_pd(p + off[0]);
      for (int r = 1; r < kCount; ++r) v = _mm256_blendv_pd(v, _mm256_loadu_pd(p + off[r]), (__m256d)mask[r]);
      return (V)v;
    }
#else
    return load<V>(p);  // never used: the base copy has no runs
#endif
  }
};

// The number of runs when every cell's runs are cell 0's shifted (then shift[n]), else 0.
template <typename T, int kCells>
inline int shared_runs(const Runs<T>* runs, int64_t* shift) {
  const int count = runs[0].count;
  if (count == 0) return 0;
  shift[0] = 0;
  for (int n = 1; n < kCells; ++n) {
    if (runs[n].count != count) return 0;
    shift[n] = int64_t(runs[n].off[0]) - runs[0].off[0];
    for (int r = 0; r < count; ++r) {
      if (int64_t(runs[n].off[r]) - runs[0].off[r] != shift[n]) return 0;
#if VSR_SIMD_BYTES > 16
      if (std::memcmp(&runs[n].mask[r], &runs[0].mask[r], sizeof(runs[0].mask[r])) != 0) return 0;
#endif
    }
  }
  return count;
}

template <typename T, int kCount, int kCells>
inline SharedRuns<T, kCount, kCells> make_shared_runs(const Runs<T>* runs, const int64_t* shift,
                                                      const int64_t* ahead) {
  SharedRuns<T, kCount, kCells> sr;
  sr.ahead[0] = ahead[0];
  sr.ahead[1] = ahead[1];
  for (int r = 0; r < kCount; ++r) {
    sr.off[r] = runs[0].off[r];
#if VSR_SIMD_BYTES > 16
    sr.mask[r] = runs[0].mask[r];
#endif
  }
  for (int n = 0; n < kCells; ++n) sr.shift[n] = shift[n];
  return sr;
}

// A 2x2 window's cells (w = 2) from whole row segments, AVX-512: cell (a, b) of lane j lies at
// row R_a[j], column X_b[j] (cell n = 2a + b; rows depend on a only, columns on b only). Where
// the block's columns lie within 2L consecutive elements of a row (X in [xb, xb + 2L)) and its
// rows within three consecutive rows u, u + 1, u + 2 (R_0 in {u, u + 1}; R_1 in {u, u + 1} or
// {u + 1, u + 2}), each channel loads those rows' segments once (two vectors per row) and
// builds the four cells in registers: per row and column b one two-source permute
// (vpermt2ps/pd, index X_b - xb), per cell one blend of its two rows. The same elements as
// one load per lane: the arithmetic and its bits do not change. 4 or 6 loads, 4 or 6 permutes
// and 4 blends per plane instead of 4 cells x (number of runs) loads.
#if VSR_SIMD_BYTES == 64
template <typename T>
struct Window {
  using I = typename Plane<T>::Idx;
  static constexpr int L = Plane<T>::kLanes;
  int rows;           // 2 or 3 rows loaded; 0: not this layout
  int64_t row[3];     // row segment k starts at row[k] in each plane: (u + k) * W + xb
  I ix[2];            // X_b - xb, in [0, 2L)
  uint32_t mask[2];   // lanes of cell row a that read the second of its two rows

  static uint32_t bits(I m) {
    if constexpr (sizeof(I) == 64)
      return _mm512_test_epi32_mask((__m512i)m, (__m512i)m);
    else
      return _mm256_test_epi32_mask((__m256i)m, (__m256i)m);
  }
  static int32_t lane_min(I v) {
    int32_t r = v[0];
    for (int j = 1; j < L; ++j) r = v[j] < r ? v[j] : r;
    return r;
  }
  static int32_t lane_max(I v) {
    int32_t r = v[0];
    for (int j = 1; j < L; ++j) r = v[j] > r ? v[j] : r;
    return r;
  }

  // cell[n * cell_stride + j]: the block's pixel indices (valid lanes; the others repeat lane 0).
  void build(const int32_t* cell, int64_t cell_stride, int64_t width, int64_t plane, int64_t valid) {
    rows = 0;
    const int32_t W = static_cast<int32_t>(width);
    I id[4];
    for (int n = 0; n < 4; ++n) {
      id[n] = load<I>(cell + n * cell_stride);
      for (int64_t j = valid; j < L; ++j) id[n][j] = id[n][0];
    }
    // Rows relative to r0 (the row of cell 0 of lane 0): d = index - r0 W, row -1 .. 2.
    const int32_t r0 = id[0][0] / W;
    I rel[4], col[4], bad = {};
    for (int n = 0; n < 4; ++n) {
      const I d = id[n] - r0 * W;
      bad |= (d < -W) | (d >= 3 * W);
      rel[n] = (d < 0) - (d >= W) - (d >= 2 * W);  // -1, 0, 1, 2 (comparisons are -1 where true)
      col[n] = d - rel[n] * W;
    }
    bad |= (rel[1] != rel[0]) | (rel[3] != rel[2]) | (col[2] != col[0]) | (col[3] != col[1]);
    if (bits(bad)) return;
    const int32_t u = lane_min(rel[0]), top = lane_max(rel[0] > rel[2] ? rel[0] : rel[2]);
    const I t0 = rel[0] - u, t1 = rel[2] - u;
    if (lane_max(t0) > 1) return;
    const int32_t t1_lo = lane_min(t1), t1_hi = lane_max(t1);
    if (t1_lo >= 0 && t1_hi <= 1) {
      rows = 2;
      mask[1] = bits(t1 == 1);
    } else if (t1_lo >= 1 && t1_hi <= 2) {
      rows = 3;
      mask[1] = bits(t1 == 2);
    } else {
      return;
    }
    mask[0] = bits(t0 == 1);
    const I lo = col[0] < col[1] ? col[0] : col[1], hi = col[0] > col[1] ? col[0] : col[1];
    int64_t xb = lane_min(lo);
    if (lane_max(hi) - xb >= 2 * L) {
      rows = 0;
      return;
    }
    if (W >= 2 * L && xb > W - 2 * L) xb = W - 2 * L;  // the segments stay inside the row
    for (int k = 0; k < 3; ++k) {
      const int64_t r = r0 + (u + k < top ? u + k : top);
      row[k] = r * W + xb;
      if (row[k] + 2 * L > plane) rows = 0;  // narrow frames: the segments run into later rows
    }
    ix[0] = col[0] - static_cast<int32_t>(xb);
    ix[1] = col[1] - static_cast<int32_t>(xb);
  }
};

// Marks two loaded vectors as opaque to the compiler, so each is loaded once into a register:
// else GCC folds the loads into both permutes that read them (vpermt2ps overwrites its table
// operand), loading every segment vector twice — 12 instead of 6 line-crossing 64-byte loads
// per plane, which the load pipes could not sustain.
template <typename V>
inline void opaque(V& a, V& b) {
  asm("" : "+v"(a), "+v"(b));
}

template <typename T, int kRows>
struct WindowCells {
  using V = typename Plane<T>::Vec;
  int64_t row[kRows];  // Window::row in bytes: the second vector of a segment is a displacement away
  __m512i ix[2];
  uint32_t mask[2];

  explicit WindowCells(const Window<T>& w) {
    for (int k = 0; k < kRows; ++k) row[k] = w.row[k] * int64_t(sizeof(T));  // bytes
    for (int b = 0; b < 2; ++b) {
      if constexpr (sizeof(T) == 4)
        ix[b] = (__m512i)w.ix[b];
      else
        ix[b] = _mm512_cvtepi32_epi64((__m256i)w.ix[b]);
      mask[b] = w.mask[b];
    }
  }

  const T* at(const T* base, int k) const {
    return reinterpret_cast<const T*>(reinterpret_cast<const char*>(base) + row[k]);
  }

  // The next block's segments reach about L elements further: the line of element 3L - 1.
  void prefetch(const T* base) const {
    for (int k = 0; k < kRows; ++k) __builtin_prefetch(at(base, k) + 3 * Plane<T>::kLanes - 1, 0, 2);
  }

  void operator()(const T* base, V* cell) const {
    if constexpr (sizeof(T) == 4) {
      __m512 p[2][kRows];
      for (int k = 0; k < kRows; ++k) {
        __m512 lo = _mm512_loadu_ps(at(base, k)), hi = _mm512_loadu_ps(at(base, k) + 16);
        opaque(lo, hi);
        for (int b = 0; b < 2; ++b) p[b][k] = _mm512_permutex2var_ps(lo, ix[b], hi);
      }
      for (int b = 0; b < 2; ++b) {
        cell[b] = (V)_mm512_mask_blend_ps((__mmask16)mask[0], p[b][0], p[b][1]);
        cell[2 + b] = (V)_mm512_mask_blend_ps((__mmask16)mask[1], p[b][kRows - 2], p[b][kRows - 1]);
      }
    } else {
      __m512d p[2][kRows];
      for (int k = 0; k < kRows; ++k) {
        __m512d lo = _mm512_loadu_pd(at(base, k)), hi = _mm512_loadu_pd(at(base, k) + 8);
        opaque(lo, hi);
        for (int b = 0; b < 2; ++b) p[b][k] = _mm512_permutex2var_pd(lo, ix[b], hi);
      }
      for (int b = 0; b < 2; ++b) {
        cell[b] = (V)_mm512_mask_blend_pd((__mmask8)mask[0], p[b][0], p[b][1]);
        cell[2 + b] = (V)_mm512_mask_blend_pd((__mmask8)mask[1], p[b][kRows - 2], p[b][kRows - 1]);
      }
    }
  }
};
#endif

// The generic runs of every cell (Runs::gather), prefetching like SharedRuns.
template <typename T, int kCells>
struct RunsGather {
  using V = typename Plane<T>::Vec;
  const Runs<T>* runs;
  int64_t ahead[2];
  void operator()(const T* base, V* cell) const {
    for (int n = 0; n < kCells; ++n) cell[n] = runs[n].gather(base);
  }
  void prefetch(const T* base) const { prefetch_rows(base, ahead); }
};

// The loads of one block's cells for the forward and the backward's step 1: calls body(gather)
// with the cheapest gather that serves the block (gather(base, cell) fills cell[n] with the
// lanes' values of cell n in the plane at base; gather.prefetch(base) prefetches the next
// block's new lines in that plane, into L2). In order: the 2x2 window from row segments (AVX-512, w = 2); the shared
// runs (every cell's runs cell 0's shifted, 1 to 4 runs); the generic runs (one load per lane
// where there are too many).
template <typename T, int kCells, typename Body>
inline void with_block_gather(const int32_t* cell, int64_t cell_stride, int64_t width, int64_t plane, int64_t valid,
                              const Body& body) {
#if VSR_SIMD_BYTES == 64
  if constexpr (kCells == 4) {
    Window<T> w;
    w.build(cell, cell_stride, width, plane, valid);
    if (w.rows == 2) return body(WindowCells<T, 2>(w));
    if (w.rows == 3) return body(WindowCells<T, 3>(w));
  }
#else
  (void)width;
#endif
  Runs<T> runs[kCells];
  for (int n = 0; n < kCells; ++n) runs[n].build(cell + n * cell_stride, plane);
  int64_t ahead[2];
  prefetch_targets<T, kCells>(cell, cell_stride, plane, valid, ahead);
#if VSR_SIMD_BYTES > 16
  int64_t shift[kCells];
  switch (shared_runs<T, kCells>(runs, shift)) {
    case 1: return body(make_shared_runs<T, 1, kCells>(runs, shift, ahead));
    case 2: return body(make_shared_runs<T, 2, kCells>(runs, shift, ahead));
    case 3:
      if constexpr (Runs<T>::kMaxRuns >= 3) return body(make_shared_runs<T, 3, kCells>(runs, shift, ahead));
      break;
    case 4:
      if constexpr (Runs<T>::kMaxRuns >= 4) return body(make_shared_runs<T, 4, kCells>(runs, shift, ahead));
      break;
    default: break;
  }
#endif
  return body(RunsGather<T, kCells>{runs, {ahead[0], ahead[1]}});
}

template <typename T, int kCells, bool kBiased, bool kFull>
inline void planes_block(const PlaneArgs<T>& a, int64_t x0, int64_t valid) {
  with_block_gather<T, kCells>(a.cell + x0, a.cell_stride, a.width, a.plane, valid,
                               [&](const auto& gather) { planes_body<T, kCells, kBiased, kFull>(a, x0, valid, gather); });
}

template <typename T, int kCells, bool kBiased>
inline void planes_row(const PlaneArgs<T>& a) {
  constexpr int L = Plane<T>::kLanes;
  int64_t x0 = 0;
  for (; x0 + L <= a.width; x0 += L) planes_block<T, kCells, kBiased, true>(a, x0, L);
  if (x0 < a.width) planes_block<T, kCells, kBiased, false>(a, x0, a.width - x0);
}

// Step 1 of the backward per head and block, the arithmetic of backward_pixel_rows
// (kernels/flow_guided_window_attention.h) across the lanes: s_n = scale * <q, k_n + kb_n>,
// P_n = exp(s_n - lse), dP_n = <g, v_n + vb_n> (channels in increasing order, FMA per lane),
// delta = sum_n P_n dP_n in n order, dS_n = (scale P_n) (dP_n - delta),
// grad_query = sum_n dS_n (k_n + kb_n) in n order.
template <typename T, int kCells, bool kBiased, bool kFull, typename Gather>
inline void planes_backward_body(const PlaneBackwardArgs<T>& a, int64_t x0, int64_t valid, Gather gather) {
  using V = typename Plane<T>::Vec;
  using I = typename Plane<T>::Idx;
  constexpr int L = Plane<T>::kLanes;
  const int64_t D = a.head_dim, C = a.heads * D, cells = kCells;
  const int64_t gs = a.channel[0], qs = a.channel[1], ks = a.channel[2], vs = a.channel[3], os = a.channel[4];
  auto load_part = [&](const T* p) {
    if (kFull) return load<V>(p);
    V v = {};
    std::memcpy(&v, p, valid * sizeof(T));
    return v;
  };
  for (int64_t h = 0; h < a.heads; ++h) {
    V s[kCells], dp[kCells];
    for (int n = 0; n < kCells; ++n) s[n] = dp[n] = V{};
    for (int64_t c = h * D; c < (h + 1) * D; ++c) {
      const V q = load_part(a.query + c * qs + x0);
      const V g = load_part(a.grad_out + c * gs + x0);
      const T* k = a.key + c * ks;
      const T* v = a.value + c * vs;
      if (kPrefetch) {
        __builtin_prefetch(a.query + c * qs + x0 + L, 0, 2);
        __builtin_prefetch(a.grad_out + c * gs + x0 + L, 0, 2);
      }
      gather.prefetch(k);
      gather.prefetch(v);
      V kv[kCells], vv[kCells];
      gather(k, kv);
      gather(v, vv);
      for (int n = 0; n < kCells; ++n) {
        if (kBiased) kv[n] = kv[n] + a.key_bias[c * kCells + n];
        s[n] = pfma(q, kv[n], s[n]);
        if (kBiased) vv[n] = vv[n] + a.value_bias[c * kCells + n];
        dp[n] = pfma(g, vv[n], dp[n]);
      }
    }
    const V lse = load_part(a.lse + h * a.lse_head + x0);
    const auto live = __builtin_convertvector(load<I>(a.live + x0), V) != T(0);  // lane masks of T's width
    V delta = V{};
    for (int n = 0; n < kCells; ++n) {
      s[n] = live ? vexp(s[n] * a.scale - lse) : V{};
      delta = n == 0 ? s[0] * dp[0] : pfma(s[n], dp[n], delta);
    }
    for (int n = 0; n < kCells; ++n) dp[n] = live ? (s[n] * a.scale) * (dp[n] - delta) : V{};
    for (int64_t j = 0; j < (kFull ? L : valid); ++j) {
      T* prob = a.prob + ((x0 + j) * a.heads + h) * cells;
      T* dscore = a.dscore + ((x0 + j) * a.heads + h) * cells;
      for (int n = 0; n < kCells; ++n) {
        prob[n] = s[n][j];
        dscore[n] = dp[n][j];
      }
    }
    for (int64_t c = h * D; c < (h + 1) * D; ++c) {
      const T* k = a.key + c * ks;
      V kv[kCells];
      gather(k, kv);
      V o = {};
      for (int n = 0; n < kCells; ++n) {
        if (kBiased) kv[n] = kv[n] + a.key_bias[c * kCells + n];
        o = n == 0 ? dp[0] * kv[0] : pfma(dp[n], kv[n], o);
      }
      T* out = a.grad_query + c * os + x0;
      if (kFull)
        store(out, o);
      else
        std::memcpy(out, &o, valid * sizeof(T));
      if (kBiased) {
        const V q = load_part(a.query + c * qs + x0), g = load_part(a.grad_out + c * gs + x0);
        for (int n = 0; n < kCells; ++n) {
          T* pk = a.bias_partial + (n * C + c) * L;
          T* pv = a.bias_partial + ((kCells + n) * C + c) * L;
          const auto used = (dp[n] != T(0)) | (s[n] != T(0));
          store(pk, used ? pfma(dp[n], q, load<V>(pk)) : load<V>(pk));
          store(pv, used ? pfma(s[n], g, load<V>(pv)) : load<V>(pv));
        }
      }
    }
  }
}

template <typename T, int kCells, bool kBiased, bool kFull>
inline void planes_backward_block(const PlaneBackwardArgs<T>& a, int64_t x0, int64_t valid) {
  with_block_gather<T, kCells>(a.cell + x0, a.cell_stride, a.width, a.plane, valid,
                               [&](const auto& gather) {
                                 planes_backward_body<T, kCells, kBiased, kFull>(a, x0, valid, gather);
                               });
}

template <typename T, int kCells, bool kBiased>
inline void planes_backward_row(const PlaneBackwardArgs<T>& a) {
  constexpr int L = Plane<T>::kLanes;
  int64_t x0 = 0;
  for (; x0 + L <= a.width; x0 += L) planes_backward_block<T, kCells, kBiased, true>(a, x0, L);
  if (x0 < a.width) planes_backward_block<T, kCells, kBiased, false>(a, x0, a.width - x0);
}

template <typename T>
inline void backward_planes_row_t(const PlaneBackwardArgs<T>& a) {
  const bool biased = a.key_bias != nullptr;
  switch (a.cells) {
    case 1: return biased ? planes_backward_row<T, 1, true>(a) : planes_backward_row<T, 1, false>(a);
    case 4: return biased ? planes_backward_row<T, 4, true>(a) : planes_backward_row<T, 4, false>(a);
    default: return biased ? planes_backward_row<T, 9, true>(a) : planes_backward_row<T, 9, false>(a);
  }
}

void backward_planes_row(const PlaneBackwardArgs<float>& a) { backward_planes_row_t<float>(a); }
void backward_planes_row(const PlaneBackwardArgs<double>& a) { backward_planes_row_t<double>(a); }

template <typename T>
inline void forward_planes_row_t(const PlaneArgs<T>& a) {
  const bool biased = a.key_bias != nullptr;
  switch (a.cells) {
    case 1: return biased ? planes_row<T, 1, true>(a) : planes_row<T, 1, false>(a);
    case 4: return biased ? planes_row<T, 4, true>(a) : planes_row<T, 4, false>(a);
    default: return biased ? planes_row<T, 9, true>(a) : planes_row<T, 9, false>(a);
  }
}

inline void store_fence() {
#if VSR_SIMD_BYTES > 16
  _mm_sfence();  // the non-temporal stores of out (stream_store)
#endif
}
void forward_planes_row(const PlaneArgs<float>& a) {
  forward_planes_row_t<float>(a);
  store_fence();
}
void forward_planes_row(const PlaneArgs<double>& a) {
  forward_planes_row_t<double>(a);
  store_fence();
}
int plane_lanes(float) { return Plane<float>::kLanes; }
int plane_lanes(double) { return Plane<double>::kLanes; }

}  // namespace VSR_SIMD_NS
}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
