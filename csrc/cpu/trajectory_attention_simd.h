// The vectorised float32 CPU kernels of trajectory attention (key_sums and gather, see
// trajectory_attention_isa.h), compiled once per instruction set. Torch-free, included only by
// the per-ISA translation units (trajectory_attention_{base,avx2,avx512}.cpp), which define
//   VSR_SIMD_NS    the namespace of this copy (base, avx2, avx512);
//   VSR_SIMD_BITS  512 (16 lanes, masked loads and gathers), 256 (AVX2: 8 lanes, gathers,
//                  fused multiply-add) or 0 (4 lanes of plain C++: separate multiply and add).
//
// Channels-first token maps put a token's channels h*w*4 bytes apart, so the kernels run
// across tokens: lane i is query token i of the band, and for each channel the key (value)
// row of each frame is gathered at the band's trajectory positions. Neighbouring queries read
// neighbouring key tokens, so a gather touches a few cache lines of a few rows; the loops run
// channel block by channel block over the whole band (all frames of a block inside), so a
// line, once loaded, serves every query of the band that reads it while it is still in L2,
// and the rows of the next channel block are prefetched while the current one is summed
// (the gathers' scattered lines defeat the hardware's stream prefetcher).
#pragma once

#include <algorithm>
#include <cstdint>

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
inline void vstream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
inline void vfence() { _mm_sfence(); }
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
inline void vstream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
inline void vfence() { _mm_sfence(); }
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
inline void vstream(float* p, V v) { vstore(p, v); }
inline void vfence() {}
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

// Channels per block of key_sums: the block's rows of every frame over the band stay in L2
// while the band's gathers walk them (measured at the shape, one thread: 2 channels
// 14.5 ms, 4: 15.1-16.5 ms, 8: 17.4-17.9 ms).
constexpr int64_t kBlockChannels = 2;

// Frame slots [f0, f0 + F) of lanes [i, i + W), channels [c0, c0 + cb).
template <int F>
inline void sums_chunk(const KeySums& a, int64_t c0, int64_t cb, int64_t i, int64_t f0, M m) {
  const bool first = c0 == 0;
  const bool with_q = f0 == 0 && a.qq != nullptr;
  V qk[F], kk[F];
  const int32_t* ix[F];
  for (int f = 0; f < F; ++f) {
    const int64_t o = (f0 + f) * a.stride + i;
    qk[f] = first ? vzero() : vload(a.qk + o);
    kk[f] = first ? vzero() : vload(a.kk + o);
    ix[f] = a.idx + o;
  }
  V qq = vzero(), ps = vzero();
  if (with_q && !first) {
    qq = vload(a.qq + i);
    ps = vload(a.poison + i);
  }
  const bool whole = full(m);
  for (int64_t c = c0; c < c0 + cb; ++c) {
    const float* qp = a.query + c * a.q_channel + i;
    const V q = whole ? vload(qp) : vload_head(qp, m);
    if (with_q) {
      qq = vfma(q, q, qq);
      ps = vfma(q, vzero(), ps);
    }
    const float* kb = a.key + c * a.k_channel;
    for (int f = 0; f < F; ++f) {
      const V k = vgather(kb, ix[f]);
      qk[f] = vfma(q, k, qk[f]);
      kk[f] = vfma(k, k, kk[f]);
      if (a.stage != nullptr) vstore_head(a.stage + c * a.stage_channel + i, m, k);
    }
  }
  for (int f = 0; f < F; ++f) {
    const int64_t o = (f0 + f) * a.stride + i;
    vstore(a.qk + o, qk[f]);
    vstore(a.kk + o, kk[f]);
  }
  if (with_q) {
    vstore(a.qq + i, qq);
    vstore(a.poison + i, ps);
  }
}

}  // namespace

void key_sums(const KeySums& a) {
  const int64_t groups = (a.n + W - 1) / W;
  Cursor pf(a.key, a.k_channel, a.channels, kBlockChannels, a.prefetch.lead, a.prefetch);
  for (int64_t c0 = 0; c0 < a.channels; c0 += kBlockChannels) {
    const int64_t cb = std::min(kBlockChannels, a.channels - c0);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = g * W;
      const M m = head(a.n - i);
      for (int64_t f0 = 0; f0 < a.frames; f0 += 4) {
        switch (std::min<int64_t>(4, a.frames - f0)) {
          case 4: sums_chunk<4>(a, c0, cb, i, f0, m); break;
          case 3: sums_chunk<3>(a, c0, cb, i, f0, m); break;
          case 2: sums_chunk<2>(a, c0, cb, i, f0, m); break;
          default: sums_chunk<1>(a, c0, cb, i, f0, m); break;
        }
      }
      pf.step(c0 / kBlockChannels, g, groups);
    }
  }
  if (a.channels == 0) {  // empty sums: zeros
    for (int64_t f = 0; f < a.frames; ++f)
      for (int64_t i = 0; i < a.stride; ++i) a.qk[f * a.stride + i] = a.kk[f * a.stride + i] = 0.f;
    if (a.qq != nullptr)
      for (int64_t i = 0; i < a.stride; ++i) a.qq[i] = a.poison[i] = 0.f;
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
