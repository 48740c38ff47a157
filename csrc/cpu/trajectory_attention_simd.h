// The vectorised float32 CPU kernels of trajectory attention (key_pass, chosen_sums and
// gather, see trajectory_attention_isa.h), compiled once per instruction set. Torch-free,
// included only by the per-ISA translation units (trajectory_attention_{base,avx2,avx512}.cpp),
// which define
//   VSR_SIMD_NS    the namespace of this copy (base, avx2, avx512);
//   VSR_SIMD_BITS  512 (16 lanes, masked loads and gathers), 256 (AVX2: 8 lanes, gathers,
//                  fused multiply-add) or 0 (4 lanes of plain C++: separate multiply and add).
//
// Channels-first token maps put a token's channels h*w*4 bytes apart. The forward's key pass
// (key_pass) reads them row by row: per block of W channels (the vector width) and frame, the
// rows of the tokens the band reads are transposed in registers into token-major rows of W
// channels, so a query's dot product with its trajectory key is W contiguous channels, one
// multiply and a share of a transposing reduction (no gathers: hardware gathers ran at ~3
// elements/ns, the whole pass at the gathers' speed). Its block sums follow a fixed pairwise
// tree; the backward's chosen key (chosen_sums, one frame per token, lanes = tokens, gathered)
// sums its products with the same tree (vector_tree), so its score is the forward's bit for
// bit. The value gather runs across tokens: lane i is query token i of the band, and for each
// channel the chosen frames' rows are gathered; the rows ahead of the band's progress are
// prefetched in software (the gathers' scattered lines defeat the stream prefetcher).
#pragma once

// No contraction of a product and a sum into one fused multiply-add behind the code's back:
// key_pass's transposing reduction and chosen_sums's vector tree must round alike (g++
// contracts even intrinsics' vector arithmetic by default, in ISO C++ modes too).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "trajectory_attention_isa.h"

#if VSR_SIMD_BITS
#include <immintrin.h>
#endif

namespace vsr_kernels {
namespace trajectory_attention {
namespace VSR_SIMD_NS {
namespace {

#if VSR_SIMD_BITS == 512
constexpr int64_t W = 16;
using V = __m512;
using M = __mmask16;
inline M head(int64_t n) { return n >= W ? M(0xFFFF) : M((1u << n) - 1u); }
inline bool full(M m) { return m == M(0xFFFF); }
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vload_head(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
inline void vstore_head(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
inline V vgather(const float* base, const int32_t* idx) {
  const __m512i i = _mm512_loadu_si512(idx);
  const M ok = _mm512_cmpge_epi32_mask(i, _mm512_setzero_si512());
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok, i, base, 4);
}
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline void vstream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
inline void vfence() { _mm_sfence(); }
// r[c] (lane j = token j) -> r[j] (lane c = channel c): 4 rounds of 16 shuffles.
inline void transpose(V* r) {
  V t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 2; ++j) {
      const __m512d x = _mm512_castps_pd(t[4 * k + j]), y = _mm512_castps_pd(t[4 * k + 2 + j]);
      u[4 * k + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
      u[4 * k + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
    }
  // u[4k + j], 128-bit lane L: rows 4k .. 4k + 3 of column 4L + j.
  for (int j = 0; j < 4; ++j) {
    const V a01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), b01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const V a23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44), b23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(a01, a23, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(a01, a23, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(b01, b23, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(b01, b23, 0xDD);
  }
}
// Lane j of the result = the tree sum (vector_tree's) of the lanes of p[s] with kSlot[s] = j.
constexpr int kSlot[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
inline V reduce(const V* p) {
  V u[8], w[4], z[2];
  for (int k = 0; k < 8; ++k)  // lanes c + 8 (c < 8): slot 2k in lanes 0-7, 2k + 1 in 8-15
    u[k] = vadd(_mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0x44), _mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)  // c + 4: 128-bit lane L = slot 4k + L
    w[k] = vadd(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0x88), _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k) {  // c + 2: 128-bit lane L = slots 8k + L, 8k + 4 + L
    const __m512d x = _mm512_castps_pd(w[2 * k]), y = _mm512_castps_pd(w[2 * k + 1]);
    z[k] = vadd(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // c + 1: lane 4L + m = slot 4m + L
  return vadd(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}
#elif VSR_SIMD_BITS == 256
constexpr int64_t W = 8;
using V = __m256;
using M = __m256i;
inline M head(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, W))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline bool full(M m) { return _mm256_movemask_epi8(m) == -1; }
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vload_head(const float* p, M m) { return _mm256_maskload_ps(p, m); }
inline void vstore_head(float* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
inline V vgather(const float* base, const int32_t* idx) {
  const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  const __m256 ok = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(-1)));
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, i, ok, 4);
}
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline void vstream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
inline void vfence() { _mm_sfence(); }
inline void transpose(V* r) {
  V t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k)
    for (int j = 0; j < 2; ++j) {
      u[4 * k + 2 * j] = _mm256_shuffle_ps(t[4 * k + j], t[4 * k + 2 + j], 0x44);
      u[4 * k + 2 * j + 1] = _mm256_shuffle_ps(t[4 * k + j], t[4 * k + 2 + j], 0xEE);
    }
  // u[4k + j], 128-bit lane L: rows 4k .. 4k + 3 of column 4L + j.
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}
constexpr int kSlot[8] = {0, 4, 1, 5, 2, 6, 3, 7};
inline V reduce(const V* p) {
  V u[4], w[2];
  for (int k = 0; k < 4; ++k)  // lanes c + 4: slot 2k in lanes 0-3, 2k + 1 in 4-7
    u[k] = vadd(_mm256_permute2f128_ps(p[2 * k], p[2 * k + 1], 0x20), _mm256_permute2f128_ps(p[2 * k], p[2 * k + 1], 0x31));
  for (int k = 0; k < 2; ++k) {  // c + 2: 128-bit lane L = slots 4k + L, 4k + 2 + L
    const __m256d x = _mm256_castps_pd(u[2 * k]), y = _mm256_castps_pd(u[2 * k + 1]);
    w[k] = vadd(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  // c + 1: lane 4L + m = slot 2m + L
  return vadd(_mm256_shuffle_ps(w[0], w[1], 0x88), _mm256_shuffle_ps(w[0], w[1], 0xDD));
}
#else
constexpr int64_t W = 4;
struct V {
  float v[W];
};
using M = int64_t;  // lanes in use
inline M head(int64_t n) { return std::min<int64_t>(n, W); }
inline bool full(M m) { return m == W; }
inline V vzero() { return V{{0.f, 0.f, 0.f, 0.f}}; }
inline V vload(const float* p) { return V{{p[0], p[1], p[2], p[3]}}; }
inline void vstore(float* p, V v) {
  for (int64_t l = 0; l < W; ++l) p[l] = v.v[l];
}
inline V vload_head(const float* p, M m) {
  V r = vzero();
  for (int64_t l = 0; l < m; ++l) r.v[l] = p[l];
  return r;
}
inline void vstore_head(float* p, M m, V v) {
  for (int64_t l = 0; l < m; ++l) p[l] = v.v[l];
}
inline V vgather(const float* base, const int32_t* idx) {
  V r;
  for (int64_t l = 0; l < W; ++l) r.v[l] = idx[l] >= 0 ? base[idx[l]] : 0.f;
  return r;
}
inline V vfma(V a, V b, V c) {
  V r;
  for (int64_t l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
  return r;
}
inline V vmul(V a, V b) {
  V r;
  for (int64_t l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l];
  return r;
}
inline V vadd(V a, V b) {
  V r;
  for (int64_t l = 0; l < W; ++l) r.v[l] = a.v[l] + b.v[l];
  return r;
}
inline void vstream(float* p, V v) { vstore(p, v); }
inline void vfence() {}
inline void transpose(V* r) {
  for (int64_t i = 0; i < W; ++i)
    for (int64_t j = i + 1; j < W; ++j) std::swap(r[i].v[j], r[j].v[i]);
}
constexpr int kSlot[4] = {0, 1, 2, 3};
inline V reduce(const V* p) {
  V r;
  for (int64_t j = 0; j < W; ++j) r.v[j] = (p[j].v[0] + p[j].v[2]) + (p[j].v[1] + p[j].v[3]);
  return r;
}
#endif

constexpr int64_t kLineFloats = 16;  // 64-byte cache lines

// Software prefetch, a few lines per step of the band's loop, running `lead` lines ahead of
// the band's progress through the region [lo, hi) of a channel block's rows (all rows of one
// line of the region at a time, then the next line), and on into the next block's rows: the
// lines of the region are needed roughly in order as the band's queries advance, so what is
// in L2 at a time is a window of the region, not the whole block.
struct Cursor {
  const float* base;
  int64_t channel, channels, block;
  const Prefetch& p;
  int64_t lines = 0, lead = 0, done = 0;

  Cursor(const float* b, int64_t ch, int64_t nchannels, int64_t blk, int64_t lead_tokens, const Prefetch& pf)
      : base(b), channel(ch), channels(nchannels), block(blk), p(pf) {
    lines = p.hi > p.lo && p.nrows > 0 && lead_tokens >= 0 ? (p.hi - p.lo + kLineFloats - 1) / kLineFloats + 1 : 0;
    lead = std::min(lines, (lead_tokens + kLineFloats - 1) / kLineFloats);
  }
  // At step `g` of `steps` of channel block `k`: everything up to lead + (g + 1) / steps of
  // the block's lines.
  void step(int64_t k, int64_t g, int64_t steps) {
    if (lines == 0) return;
    const int64_t target = k * lines + lead + (g + 1) * lines / steps;
    for (; done < target; ++done) {
      const int64_t c0 = done / lines * block;
      if (c0 >= channels) {
        done = target;
        break;
      }
      const int64_t o = p.lo + done % lines * kLineFloats;
      for (int64_t c = c0; c < std::min(c0 + block, channels); ++c)
        for (int64_t r = 0; r < p.nrows; ++r) __builtin_prefetch(base + c * channel + p.rows[r] + o, 0, 2);
    }
  }
};

// The per-block sum of qk: a pairwise tree over the block's W channels, halving (p[c] +=
// p[c + W/2] for c < W/2, then W/4, ... 1). p[c] holds the products of channel c (lanes:
// tokens); reduce() computes the same tree across the lanes of W token-major vectors.
inline V vector_tree(V* p) {
  for (int64_t h = W / 2; h >= 1; h /= 2)
    for (int64_t c = 0; c < h; ++c) p[c] = vadd(p[c], p[c + h]);
  return p[0];
}

// A float buffer aligned to 64 bytes.
struct Aligned {
  std::vector<float> storage;
  float* data;
  explicit Aligned(int64_t n) : storage(n + kLineFloats) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(storage.data());
    data = storage.data() + (kLineFloats - a / sizeof(float) % kLineFloats) % kLineFloats;
  }
};

// One tile of W channel rows [0, cb) x W tokens [0, W) of src (lanes < `m` only; rows >= cb
// and lanes outside the mask read as 0), transposed into W token-major rows of W channels at
// out[j * W], with the chains sq = fma(x, x, sq) and, with `poison`, poison = fma(x, 0, poison)
// over the rows in order, lanes = tokens. kWhole: cb = W and every lane (all in registers).
template <bool kWhole>
inline void tile(const float* src, int64_t channel, int64_t cb, M m, float* sq, float* poison, float* out) {
  V r[W];
  V s = vload(sq), z = poison != nullptr ? vload(poison) : vzero();
  if constexpr (kWhole) {
#pragma GCC unroll 16
    for (int64_t c = 0; c < W; ++c) r[c] = vload(src + c * channel);
#pragma GCC unroll 16
    for (int64_t c = 0; c < W; ++c) s = vfma(r[c], r[c], s);
    if (poison != nullptr) {
#pragma GCC unroll 16
      for (int64_t c = 0; c < W; ++c) z = vfma(r[c], vzero(), z);
    }
  } else {
    const bool whole = full(m);
    for (int64_t c = 0; c < cb; ++c) r[c] = whole ? vload(src + c * channel) : vload_head(src + c * channel, m);
    for (int64_t c = cb; c < W; ++c) r[c] = vzero();
    for (int64_t c = 0; c < cb; ++c) s = vfma(r[c], r[c], s);
    if (poison != nullptr)
      for (int64_t c = 0; c < cb; ++c) z = vfma(r[c], vzero(), z);
  }
  vstore(sq, s);
  if (poison != nullptr) vstore(poison, z);
  transpose(r);
#pragma GCC unroll 16
  for (int64_t j = 0; j < W; ++j) vstore(out + j * W, r[j]);
}

inline void any_tile(const float* src, int64_t channel, int64_t cb, M m, float* sq, float* poison, float* out) {
  if (cb == W && full(m))
    tile<true>(src, channel, cb, m, sq, poison, out);
  else
    tile<false>(src, channel, cb, m, sq, poison, out);
}

}  // namespace

// Per channel block of W channels: the band's query block transposed into token-major rows
// (qt: W channels per token), then per frame the rows [lo, hi) of the key block transposed
// likewise (kt), |k|^2 summed per key token (kkt, not per query that reads it), and per group
// of W queries, W contiguous loads of a key token's block, the products and one transposing
// reduction (reduce()) into the W queries' qk lanes. No gathers: the key is read row by row.
void key_pass(const KeyPass& a) {
  const int64_t T = a.frames, S = a.stride, n = a.n;
  const int64_t groups = (n + W - 1) / W;
  std::vector<int64_t> lo(T), len(T);
  int64_t longest = 0;
  for (int64_t f = 0; f < T; ++f) {
    lo[f] = a.lo[f];
    len[f] = std::max<int64_t>(a.hi[f] - a.lo[f], 0);
    longest = std::max(longest, len[f]);
  }
  const int64_t span = (longest + W - 1) / W * W;  // key tokens per frame, whole tiles
  Aligned kt((span + 1) * W), qt(groups * W * W), kkt(std::max<int64_t>(T * span, 1));
  std::vector<int32_t> row(T * S);  // kt offset (floats) of each (frame, query); `span`: a zero row
  for (int64_t f = 0; f < T; ++f)
    for (int64_t i = 0; i < S; ++i) {
      const int32_t p = a.pos[f * S + i];
      row[f * S + i] = static_cast<int32_t>((p >= 0 ? p - lo[f] : span) * W);
    }
  std::fill(kt.data + span * W, kt.data + (span + 1) * W, 0.f);
  std::fill(kkt.data, kkt.data + T * span, 0.f);
  std::fill(a.qk, a.qk + T * S, 0.f);
  std::fill(a.qq, a.qq + S, 0.f);
  std::fill(a.poison, a.poison + S, 0.f);
  V p[W];
  for (int64_t c0 = 0; c0 < a.channels; c0 += W) {
    const int64_t cb = std::min<int64_t>(W, a.channels - c0);
    const float* qb = a.query + c0 * a.q_channel;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = g * W;
      any_tile(qb + i, a.q_channel, cb, head(n - i), a.qq + i, a.poison + i, qt.data + i * W);
    }
    for (int64_t f = 0; f < T; ++f) {
      if (len[f] == 0) continue;
      const float* kb = a.key + f * a.k_frame + c0 * a.k_channel + lo[f];
      float* kk = kkt.data + f * span;
      for (int64_t u = 0; u < len[f]; u += W) {
        any_tile(kb + u, a.k_channel, cb, head(len[f] - u), kk + u, nullptr, kt.data + u * W);
      }
      const int32_t* rf = row.data() + f * S;
      float* qk = a.qk + f * S;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = g * W;
        for (int64_t s = 0; s < W; ++s) {
          const int64_t j = i + kSlot[s];
          p[s] = vmul(vload(qt.data + j * W), vload(kt.data + rf[j]));
        }
        vstore(qk + i, vadd(vload(qk + i), reduce(p)));
      }
    }
  }
  for (int64_t f = 0; f < T; ++f)
    for (int64_t i = 0; i < S; ++i) {
      const int32_t q = a.pos[f * S + i];
      a.kk[f * S + i] = q >= 0 ? kkt.data[f * span + q - lo[f]] : 0.f;
    }
}

// The backward's chosen key: vectorised across tokens (lane = token), the key gathered per
// channel; the products of a block summed by vector_tree (reduce()'s tree), the chains as in
// key_pass.
void chosen_sums(const KeySums& a) {
  const int64_t groups = (a.n + W - 1) / W;
  Cursor pf(a.key, a.k_channel, a.channels, W, a.prefetch.lead, a.prefetch);
  std::fill(a.qk, a.qk + a.stride, 0.f);
  std::fill(a.kk, a.kk + a.stride, 0.f);
  std::fill(a.qq, a.qq + a.stride, 0.f);
  std::fill(a.poison, a.poison + a.stride, 0.f);
  V p[W];
  for (int64_t c0 = 0; c0 < a.channels; c0 += W) {
    const int64_t cb = std::min<int64_t>(W, a.channels - c0);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = g * W;
      const M m = head(a.n - i);
      const bool whole = full(m);
      V qq = vload(a.qq + i), ps = vload(a.poison + i), kk = vload(a.kk + i);
      for (int64_t c = 0; c < cb; ++c) {
        const float* qp = a.query + (c0 + c) * a.q_channel + i;
        const V q = whole ? vload(qp) : vload_head(qp, m);
        const V k = vgather(a.key + (c0 + c) * a.k_channel, a.idx + i);
        if (a.stage != nullptr) vstore_head(a.stage + (c0 + c) * a.stage_channel + i, m, k);
        qq = vfma(q, q, qq);
        ps = vfma(q, vzero(), ps);
        kk = vfma(k, k, kk);
        p[c] = vmul(q, k);
      }
      for (int64_t c = cb; c < W; ++c) p[c] = vzero();
      vstore(a.qk + i, vadd(vload(a.qk + i), vector_tree(p)));
      vstore(a.kk + i, kk);
      vstore(a.qq + i, qq);
      vstore(a.poison + i, ps);
      pf.step(c0 / W, g, groups);
    }
  }
}

void gather(const Gather& a) {
  const int64_t groups = (a.n + W - 1) / W;
  Cursor pf(a.src, a.src_channel, a.channels, 1, a.prefetch.lead, a.prefetch);
  for (int64_t c = 0; c < a.channels; ++c) {
    const float* s = a.src + c * a.src_channel;
    float* o = a.out + c * a.out_channel;
    // Rows aligned to whole vectors are written with non-temporal stores: out is written
    // once and not read here, so its lines need not be read in first (44 MB of 400 at the
    // issue's shape).
    const bool aligned = reinterpret_cast<uintptr_t>(o) % (W * sizeof(float)) == 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = g * W;
      const M m = head(a.n - i);
      const V v = vgather(s, a.idx + i);
      if (!full(m))
        vstore_head(o + i, m, v);
      else if (aligned)
        vstream(o + i, v);
      else
        vstore(o + i, v);
      pf.step(c, g, groups);
    }
  }
  vfence();
}

}  // namespace VSR_SIMD_NS
}  // namespace trajectory_attention
}  // namespace vsr_kernels
