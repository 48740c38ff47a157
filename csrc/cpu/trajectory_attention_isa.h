// The per-instruction-set float32 kernels of trajectory attention on CPU: what the launcher
// (trajectory_attention.cpp) hands them, and their entry points, one copy per instruction set
// (trajectory_attention_{base,avx2,avx512}.cpp over trajectory_attention_simd.h). Torch-free.
//
// The kernels work on a band of n consecutive query tokens. A token's sums depend on its own
// query and key channels only (fixed order and tree, whatever its lane or band), so its bits
// do not depend on the band, the lane or the thread count. Gathers read a channel-first row at
// 32-bit offsets; the launcher uses these kernels only where every offset fits.
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

// The forward's key pass, gather-free. Per token i < n and frame f < frames, with the key
// token k = key[f * k_frame + c * k_channel + pos[f * stride + i]] (pos < 0: outside, sums unused):
//   qk[f * stride + i] = sum over channel blocks b of block_sum_b(q * k), in block order, from 0
//   kk[f * stride + i] = sum_c k * k,  qq[i] = sum_c q_c * q_c,  poison[i] = sum_c q_c * 0
// with q_c = query[c * q_channel + i]. A channel block is the instruction set's vector width
// (16, 8, 4 channels; the last one padded with zeros) and block_sum is a fixed pairwise tree
// over the block (halving: lanes c and c + W/2 first, ...: vector_tree in
// trajectory_attention_simd.h); kk, qq, poison are sequential multiply-add chains over the
// channels in order (fused where the instruction set has them). chosen_sums computes the
// same sums the same way for one frame per token, so the backward's score is the forward's
// bit for bit. [lo[f], hi[f]) bounds the tokens of frame f read (lo >= hi: none); pos, qk, kk
// hold `stride` >= n lanes rounded up to 16, pos -1 at lanes >= n.
struct KeyPass {
  const float* query;
  int64_t q_channel;
  const float* key;
  int64_t k_channel, k_frame;
  const int32_t* pos;
  const int64_t* lo;
  const int64_t* hi;
  int64_t stride, frames, channels, n;
  float* qk;
  float* kk;
  float* qq;
  float* poison;
};

// The backward's sums of the chosen key: per token i < n, k = key[c * k_channel + idx[i]]
// (0 where idx < 0), qk[i], kk[i], qq[i], poison[i] exactly as KeyPass computes them for the
// frame and token idx points at; the gathered k of channel c is also written to
// stage[c * stage_channel + i]. idx, qk, kk, qq, poison hold `stride` >= n lanes rounded up
// to 16; idx is -1 at lanes >= n.
struct KeySums {
  const float* query;
  int64_t q_channel;
  const float* key;
  int64_t k_channel;
  const int32_t* idx;
  int64_t stride, channels, n;
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
  void key_pass(const KeyPass& a);     \
  void chosen_sums(const KeySums& a);  \
  void gather(const Gather& a);        \
  }
VSR_DECLARE_ISA(base)
VSR_DECLARE_ISA(avx2)
VSR_DECLARE_ISA(avx512)
#undef VSR_DECLARE_ISA

}  // namespace trajectory_attention
}  // namespace vsr_kernels
