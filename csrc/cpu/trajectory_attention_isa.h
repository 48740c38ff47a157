// The per-instruction-set float32 kernels of trajectory attention on CPU: what the launcher
// (trajectory_attention.cpp) hands them, and their entry points, one copy per instruction set
// (trajectory_attention_{base,avx2,avx512}.cpp over trajectory_attention_simd.h). Torch-free.
//
// Both kernels work on a band of n consecutive query tokens, vectorised across tokens (lane i
// of a vector = token i of the band): a token's sums are lane-local, so its bits do not depend
// on the band, the lane or the thread count. Gathers read a channel-first row at 32-bit
// offsets; the launcher uses these kernels only where every offset fits.
#pragma once

#include <cstdint>

namespace vsr_kernels {
namespace trajectory_attention {

// Software prefetch of the rows a channel block reads: lines of tokens [lo, hi) of rows
// base + c * channel + rows[r] (r < nrows), `lead` tokens ahead of the band's progress.
struct Prefetch {
  const int64_t* rows;
  int64_t nrows, lo, hi, lead;
};

// Per token i < n and frame slot f < frames, over channels c = 0 .. channels-1 in order:
//   k = key[c * k_channel + idx[f * stride + i]] (0 where idx < 0)
//   qk[f * stride + i] = sum_c q_c * k,  kk[f * stride + i] = sum_c k * k,
//   qq[i] = sum_c q_c * q_c,  poison[i] = sum_c q_c * 0   (qq, poison: null to skip)
// with q_c = query[c * q_channel + i], each sum a sequential chain of multiply-adds (fused
// where the instruction set has them), starting from 0. Buffers idx, qk, kk, qq, poison
// hold `stride` >= n rounded up to 16 lanes; idx is -1 at lanes >= n. With `stage` (one frame
// slot only), the gathered k of channel c is also written to stage[c * stage_channel + i].
struct KeySums {
  const float* query;
  int64_t q_channel;
  const float* key;
  int64_t k_channel;
  const int32_t* idx;
  int64_t stride, frames, channels, n;
  float* qk;
  float* kk;
  float* qq;
  float* poison;
  float* stage;
  int64_t stage_channel;
  Prefetch prefetch;
};

// out[c * out_channel + i] = idx[i] >= 0 ? src[c * src_channel + idx[i]] : 0, for i < n and
// c < channels (idx padded with -1 to a multiple of 16 lanes).
struct Gather {
  const float* src;
  int64_t src_channel;
  const int32_t* idx;
  int64_t channels, n;
  float* out;
  int64_t out_channel;
  Prefetch prefetch;
};

// Lanes every buffer is padded to (the widest vector's).
constexpr int64_t kLanes = 16;

#define VSR_DECLARE_ISA(ns)            \
  namespace ns {                       \
  void key_sums(const KeySums& a);     \
  void gather(const Gather& a);        \
  }
VSR_DECLARE_ISA(base)
VSR_DECLARE_ISA(avx2)
VSR_DECLARE_ISA(avx512)
#undef VSR_DECLARE_ISA

}  // namespace trajectory_attention
}  // namespace vsr_kernels
