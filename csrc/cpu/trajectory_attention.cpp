// CPU launchers of trajectory-aware attention (TTVSR), channels-first throughout: the token
// maps are read where they lie ((B, T, D, h, w) with unit pixel stride, as unfold makes
// them), never copied into another layout and never sampled into T full maps.
//
// Forward, one task per (batch element, run of kTokens consecutive tokens): the T read
// positions of each token are computed once (positions()); then, channel by channel, the
// query row of the run is read once and each frame's key row is gathered at the run's T
// positions, accumulating <q, k_t>, |q|^2 and |k_t|^2 per (t, token) in a small buffer.
// Every key element is read once, the query once, and a run's positions in one key row are
// neighbours (trajectories are smooth), so the gathers hit the cache lines just loaded.
// Then the per-token selection (kernels/trajectory_attention.h) and one gather per output
// channel from the chosen frame only.
//
// Backward, deterministic for any thread count (no two tasks write one element, each
// element's additions happen in a fixed order):
//  1. per token run (parallel): the chosen key's sums again, the gradient coefficients, and
//     grad_query (each token owns its column);
//  2. per batch element: the tokens with an inside choice, bucketed by chosen frame in
//     increasing token order (a counting sort);
//  3. per (batch element, block of channels) (parallel), for each channel and frame: the
//     gradient row zeroed, then the frame's bucket of tokens added in token order: grad_key[t, c, pos] += gain * q[c, p]
//     + k_self * k[t, c, pos], grad_value[t, c, pos] += grad_out[c, p].
// float16 and bfloat16 are computed in float32 and rounded once, as on GPU.
//
// float32 (where the key's gather offsets fit 32 bits) takes the per-ISA kernels of
// trajectory_attention_simd.h instead: the forward's key pass without gathers (channel blocks
// transposed in registers into token-major rows), then, in a second parallel pass over blocks
// of channels, the value gather vectorised across all the tokens; the backward's first pass
// vectorised across a band's tokens; software prefetch ahead of the gathers (see that file). A token's qk is a chain over the channel blocks of a fixed pairwise tree per block,
// its |k|^2, |q|^2 a chain over the channels, in both the forward and the backward's
// recomputation, so the two scores agree bit for bit, for any band size and thread count, as
// in the generic path (whose block sums query_block / block_sums are shared likewise).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../glue/trajectory_attention.h"
#include "huge_pages.h"
#include "isa.h"
#include "trajectory_attention_isa.h"

namespace vsr_kernels {
namespace trajectory_attention {
namespace {

// Tokens per forward/backward task (a band of rows): about one band per thread, within
// [kMinTokens, kMaxTokens]. Within a task the loops run channel by channel, frame by frame, over
// the whole band, so the key (and value) rows a band's trajectories read, which spread a few
// rows above and below the band, are loaded from memory about once per band (a band of 64
// tokens, one row, would load each row ~7 times at +-3 rows of motion). The results do not
// depend on the band size: every token's sums run over the channels in the same order.
constexpr int64_t kMinTokens = 64;
constexpr int64_t kMaxTokens = 4096;

int64_t band_size(int64_t tokens) {
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t band = std::clamp<int64_t>((tokens + threads - 1) / threads, kMinTokens, kMaxTokens);
  return (band + kLanes - 1) / kLanes * kLanes;  // whole vectors (the float32 kernels' lanes)
}
// Channels the forward's gathers handle together.
constexpr int64_t kBlock = 4;
// Channels per gradient-scatter task.
constexpr int64_t kChannels = 16;

// (B, T, h*w) int64: the token each trajectory location reads, or -1 outside.
at::Tensor positions(const at::Tensor& location, const Extent& e) {
  const int64_t B = location.size(0), T = e.frames, N = e.tokens();
  auto pos = at::empty({B, T, N}, location.options().dtype(at::kLong));
  if (pos.numel() == 0) return pos;
  const auto loc = channels_first(location);
  const Strides s = frame_strides(loc);
  const int64_t sb = loc.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loc.scalar_type(), "trajectory_positions_cpu", [&] {
    using loc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* data = loc.const_data_ptr<scalar_t>();
    int64_t* out = pos.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const scalar_t* x = data + (bt / T) * sb + (bt % T) * s.frame;
        const scalar_t* y = x + s.channel;
        for (int64_t p = 0; p < N; ++p)
          out[bt * N + p] = token_at<loc_t>(static_cast<loc_t>(x[p]), static_cast<loc_t>(y[p]), e.height, e.width);
      }
    });
  });
  return pos;
}

// The generic path's channel block [c0, c0 + width), width <= kBlock, shared by the forward
// and the backward's recomputation of the chosen key (so that its score is the forward's bit
// for bit). query_block: the block's query rows q[c0 + j] of n tokens into qv[j * q_stride],
// and |q|^2 (and, unless null, the poison sum_c q_c * 0) added to qq, poison.
template <typename scalar_t, typename acc_t>
void query_block(const scalar_t* q, int64_t q_channel, int64_t width, int64_t n, acc_t* qv, int64_t q_stride,
                 acc_t* qq, acc_t* poison) {
  for (int64_t j = 0; j < width; ++j) {
    const scalar_t* qrow = q + j * q_channel;
    acc_t* qj = qv + j * q_stride;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = vsr_kernels::convert<acc_t>(qrow[i]);
      qj[i] = x;
      qq[i] += x * x;
      if (poison != nullptr) poison[i] += x * acc_t(0);
    }
  }
}

// block_sums: for every (token i, key token ps) that each(add) passes to add, qk[i] += <q_i, k>
// and kk[i] += |k|^2 over the block, k = key rows k0 + j * k_channel at ps, in one fixed order.
template <typename scalar_t, typename acc_t, typename Each>
void block_sums(const scalar_t* k0, int64_t k_channel, int64_t width, const acc_t* qv, int64_t q_stride, acc_t* qk,
                acc_t* kk, Each&& each) {
  if (width == kBlock) {
    const scalar_t *k1 = k0 + k_channel, *k2 = k1 + k_channel, *k3 = k2 + k_channel;
    const acc_t *q0 = qv, *q1 = q0 + q_stride, *q2 = q1 + q_stride, *q3 = q2 + q_stride;
    each([&](int64_t i, int64_t ps) {
      const acc_t x0 = vsr_kernels::convert<acc_t>(k0[ps]), x1 = vsr_kernels::convert<acc_t>(k1[ps]),
                  x2 = vsr_kernels::convert<acc_t>(k2[ps]), x3 = vsr_kernels::convert<acc_t>(k3[ps]);
      qk[i] += (q0[i] * x0 + q1[i] * x1) + (q2[i] * x2 + q3[i] * x3);
      kk[i] += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3);
    });
    return;
  }
  for (int64_t j = 0; j < width; ++j) {
    const scalar_t* krow = k0 + j * k_channel;
    const acc_t* qj = qv + j * q_stride;
    each([&](int64_t i, int64_t ps) {
      const acc_t x = vsr_kernels::convert<acc_t>(krow[ps]);
      qk[i] += qj[i] * x;
      kk[i] += x * x;
    });
  }
}

// Base pointer and strides of a channels-first (unit pixel stride) tensor.
template <typename T>
struct Rows {
  T* data;
  int64_t batch, frame, channel;
  Rows(const at::Tensor& t, T* ptr) : data(ptr), batch(t.stride(0)) {
    const Strides s = frame_strides(t);
    frame = s.frame;
    channel = s.channel;
  }
  T* row(int64_t b, int64_t t, int64_t c) const { return data + b * batch + t * frame + c * channel; }
};

// ---------------------------------------------------------------------------------------
// float32: the per-ISA kernels (trajectory_attention_simd.h), vectorised across a band's tokens.

using cpu::Isa;

void key_pass(Isa isa, const KeyPass& a) {
  VSR_CPU_ISA_CALL(isa, key_pass, a);
}

void chosen_sums(Isa isa, const KeySums& a) {
  VSR_CPU_ISA_CALL(isa, chosen_sums, a);
}

void gather(Isa isa, const Gather& a) {
  VSR_CPU_ISA_CALL(isa, gather, a);
}

// Whether every offset t * frame + token (t < frames, token < tokens) of a channel-first
// map fits the kernels' 32-bit gather offsets.
bool fits_int32(int64_t frames, int64_t frame, int64_t tokens) {
  if (frame < 0) return false;
  const int64_t last = frames > 1 ? frame : 0;  // (frames - 1) * frame without overflow:
  return last <= INT32_MAX / std::max<int64_t>(frames, 1) && (frames - 1) * last + tokens <= INT32_MAX;
}

// The float32 kernels run where the key's offsets fit (the forward and the backward decide
// alike, so the backward's sums are the forward's); a value whose offsets do not fit is
// gathered by a plain loop.
bool simd_fits(const at::Tensor& k, const Extent& e) {
  return fits_int32(e.frames, frame_strides(k).frame, e.tokens());
}

// How far ahead of a band's progress the kernels prefetch, in tokens: the rows within reach
// of trajectories near the current query row (TTVSR's move a few tokens a frame) and a margin.
// (Measured at the shape: no prefetch 43 ms, 4 rows 19-20 ms, 8 rows 16-18 ms,
// 16 rows 16 ms for the key pass; the value pass 38 ms without, 28 ms with.)
int64_t lead(const Extent& e) { return 8 * e.width; }

int64_t round_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// The gather offsets of a band: idx[i] = frame[i] * frame_stride + token[i] for i < n with
// token[i] >= 0, else -1 (also at the padding lanes [n, stride)); [lo, hi) the tokens read.
void band_offsets(const int64_t* frame, const int64_t* token, int64_t n, int64_t stride, int64_t frame_stride,
                  int32_t* idx, int64_t& lo, int64_t& hi) {
  for (int64_t i = 0; i < stride; ++i) {
    const int64_t ps = i < n ? token[i] : -1;
    idx[i] = ps >= 0 ? static_cast<int32_t>(frame[i] * frame_stride + ps) : -1;
    if (ps >= 0) {
      lo = std::min(lo, ps);
      hi = std::max(hi, ps + 1);
    }
  }
}

// Channels per task of the forward's value gather.
constexpr int64_t kValueChannels = 64;

// The forward in float32, in two parallel passes. 1. Per band: the T frames' channel sums
// (key_pass) and the selection. A token's sums are a chain of multiply-adds over the channels
// in order, in its own lane: the same bits for any band, lane or thread count. 2. Per block of
// kValueChannels channels: the chosen value tokens of all the batch element's tokens
// (gather). Split by channels, not by bands: each task reads whole rows, so no value line is
// read by two threads (bands share the rows within a trajectory's reach of their edges: ~13 %
// of the lines at 2 threads) and the threads write disjoint runs of out's pages.
void forward_simd(Isa isa, const at::Tensor& q, const at::Tensor& k, const std::vector<at::Tensor>& vs,
                  const at::Tensor& pos, std::vector<at::Tensor>& outs, at::Tensor& score, at::Tensor& index,
                  const Extent& e) {
  const int64_t B = k.size(0), T = e.frames, D = e.channels, N = e.tokens();
  const Rows<const float> qr(q, q.const_data_ptr<float>()), kr(k, k.const_data_ptr<float>());
  const int64_t kTokens = band_size(N);
  const int64_t runs = (N + kTokens - 1) / kTokens;
  const int64_t* pos_data = pos.const_data_ptr<int64_t>();
  float* score_data = score.mutable_data_ptr<float>();
  int64_t* index_data = index.mutable_data_ptr<int64_t>();
  std::vector<int64_t> chosen_data(B * N);  // the chosen token of each (b, token), -1 outside
  at::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
    const int64_t stride = round_lanes(kTokens);
    std::vector<int32_t> idx(T * stride);
    std::vector<float> qk(T * stride), kk(T * stride), qq(stride), poison(stride);
    std::vector<int64_t> lo(T), hi(T), zero(stride, 0);
    for (int64_t task = begin; task < end; ++task) {
      for (auto& o : outs) cpu::populate_share(o, task, B * runs);
      const int64_t b = task / runs, p0 = task % runs * kTokens, n = std::min(kTokens, N - p0);
      const int64_t* pb = pos_data + b * T * N + p0;  // pb[t * N + i]: token p0 + i in frame t
      for (int64_t t = 0; t < T; ++t) {
        lo[t] = N;
        hi[t] = 0;
        band_offsets(zero.data(), pb + t * N, n, stride, 0, idx.data() + t * stride, lo[t], hi[t]);
      }
      key_pass(isa, KeyPass{qr.row(b, 0, 0) + p0, qr.channel, kr.row(b, 0, 0), kr.channel, kr.frame, idx.data(),
                            lo.data(), hi.data(), stride, T, D, n, qk.data(), kk.data(), qq.data(), poison.data()});
      for (int64_t i = 0; i < n; ++i) {
        Best<float> best{0.f, -1};
        for (int64_t t = 0; t < T; ++t)
          best.offer(similarity<float>(pb[t * N + i] >= 0, qk[t * stride + i], qq[i], kk[t * stride + i], poison[i]),
                     t);
        score_data[b * N + p0 + i] = best.sim;
        index_data[b * N + p0 + i] = best.frame;
        chosen_data[b * N + p0 + i] = pb[best.frame * N + i];
      }
    }
  });
  for (size_t m = 0; m < vs.size(); ++m) {
    const Rows<const float> vr(vs[m], vs[m].const_data_ptr<float>());
    const int64_t Dv = vs[m].size(2), blocks = (Dv + kValueChannels - 1) / kValueChannels;
    const bool simd = fits_int32(T, vr.frame, N);
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t stride = round_lanes(N);
      std::vector<int32_t> vidx(stride);
      std::vector<int64_t> rows(T);
      for (int64_t t = 0; t < T; ++t) rows[t] = t * vr.frame;
      int64_t ready = -1;  // the batch element vidx holds
      int64_t vlo = N, vhi = 0;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, c0 = task % blocks * kValueChannels, cn = std::min(kValueChannels, Dv - c0);
        const int64_t* frame = index_data + b * N;
        const int64_t* chosen = chosen_data.data() + b * N;
        float* out = outs[m].mutable_data_ptr<float>() + b * outs[m].stride(0) + c0 * N;
        if (!simd) {
          for (int64_t c = c0; c < c0 + cn; ++c, out += N)
            for (int64_t i = 0; i < N; ++i) out[i] = chosen[i] >= 0 ? vr.row(b, frame[i], c)[chosen[i]] : 0.f;
          continue;
        }
        if (ready != b) {
          vlo = N;
          vhi = 0;
          band_offsets(frame, chosen, N, stride, vr.frame, vidx.data(), vlo, vhi);
          ready = b;
        }
        gather(isa, Gather{vr.row(b, 0, c0), vr.channel, vidx.data(), cn, N, out, N,
                           Prefetch{rows.data(), T, vlo, vhi, lead(e)}});
      }
    });
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& query, const at::Tensor& key, at::TensorList values_in, const at::Tensor& location) {
  const std::vector<at::Tensor> values_list(values_in.begin(), values_in.end());
  check_forward(at::kCPU, query, key, values_list, location);
  const Extent e = make_extent(key);
  const int64_t B = key.size(0), T = e.frames, D = e.channels, N = e.tokens();
  auto [outs, score, index] = empty_forward_outputs(query, key, values_list);
  if (score.numel() == 0) return {outs, score, index};
  for (const auto& o : outs) cpu::advise_huge_pages(o);
  const auto pos = positions(location, e);
  const auto q = channels_first(query), k = channels_first(key);
  std::vector<at::Tensor> vs;
  for (const auto& v : values_list) vs.push_back(channels_first(v));
  if (query.scalar_type() == at::kFloat && simd_fits(k, e)) {
    forward_simd(cpu::select_isa("trajectory_attention"), q, k, vs, pos, outs, score, index, e);
    return {outs, score, index};
  }
  const int64_t kTokens = band_size(N);
  const int64_t runs = (N + kTokens - 1) / kTokens;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "trajectory_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<const scalar_t> qr(q, q.const_data_ptr<scalar_t>()), kr(k, k.const_data_ptr<scalar_t>());
    const int64_t* pos_data = pos.const_data_ptr<int64_t>();
    scalar_t* score_data = score.mutable_data_ptr<scalar_t>();
    int64_t* index_data = index.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qv(kBlock * kTokens), qq(kTokens), poison(kTokens), qk(T * kTokens), kk(T * kTokens);
      std::vector<int64_t> chosen(kTokens), frame(kTokens), grouped(kTokens), start(T + 1), next(T);
      for (int64_t task = begin; task < end; ++task) {
        for (auto& o : outs) cpu::populate_share(o, task, B * runs);
        const int64_t b = task / runs, p0 = task % runs * kTokens, n = std::min(kTokens, N - p0);
        const int64_t* pb = pos_data + b * T * N + p0;  // pb[t * N + i]: token p0 + i in frame t
        std::fill(qq.begin(), qq.end(), acc_t(0));
        std::fill(poison.begin(), poison.end(), acc_t(0));
        std::fill(qk.begin(), qk.end(), acc_t(0));
        std::fill(kk.begin(), kk.end(), acc_t(0));
        // Channels in blocks of kBlock: each token's position is loaded, tested and its two
        // running sums read and written once per block instead of once per channel.
        for (int64_t c0 = 0; c0 < D; c0 += kBlock) {
          const int64_t width = std::min(kBlock, D - c0);
          query_block(qr.row(b, 0, c0) + p0, qr.channel, width, n, qv.data(), kTokens, qq.data(), poison.data());
          for (int64_t t = 0; t < T; ++t) {
            const int64_t* pt = pb + t * N;
            block_sums(kr.row(b, t, c0), kr.channel, width, qv.data(), kTokens, qk.data() + t * kTokens,
                       kk.data() + t * kTokens, [&](auto&& add) {
                         for (int64_t i = 0; i < n; ++i)
                           if (pt[i] >= 0) add(i, pt[i]);  // outside: similarity() uses the poison instead
                       });
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          Best<acc_t> best{acc_t(0), -1};
          for (int64_t t = 0; t < T; ++t)
            best.offer(similarity<acc_t>(pb[t * N + i] >= 0, qk[t * kTokens + i], qq[i], kk[t * kTokens + i],
                                         poison[i]), t);
          score_data[b * N + p0 + i] = vsr_kernels::convert<scalar_t>(best.sim);
          index_data[b * N + p0 + i] = best.frame;
          frame[i] = best.frame;
          chosen[i] = pb[best.frame * N + i];
        }
        // The band's tokens with an inside choice, grouped by frame in token order
        // (counting sort): per (channel, frame) the reads then move forward through one
        // row range of one value map, which the hardware prefetcher follows.
        std::fill(start.begin(), start.end(), int64_t(0));
        for (int64_t i = 0; i < n; ++i)
          if (chosen[i] >= 0) ++start[frame[i] + 1];
        for (int64_t t = 0; t < T; ++t) start[t + 1] += start[t];
        std::copy(start.begin(), start.end() - 1, next.begin());
        for (int64_t i = 0; i < n; ++i)
          if (chosen[i] >= 0) grouped[next[frame[i]]++] = i;
        for (size_t m = 0; m < vs.size(); ++m) {
          const Rows<const scalar_t> vr(vs[m], vs[m].const_data_ptr<scalar_t>());
          scalar_t* out = outs[m].mutable_data_ptr<scalar_t>() + b * outs[m].stride(0) + p0;
          for (int64_t c = 0; c < vs[m].size(2); ++c) {
            scalar_t* orow = out + c * N;
            if (start[T] != n)  // some token chose an outside location: zero first
              for (int64_t i = 0; i < n; ++i) orow[i] = scalar_t(0);
            for (int64_t t = 0; t < T; ++t) {
              const scalar_t* vrow = vr.row(b, t, c);
              for (int64_t j = start[t]; j < start[t + 1]; ++j) {
                const int64_t i = grouped[j];
                orow[i] = vrow[chosen[i]];
              }
            }
          }
        }
      }
    });
  });
  return {outs, score, index};
}

// The backward's first pass in float32: per band, the chosen key's sums with the forward's
// kernel (one frame slot, offsets into the whole key: the same chain per token, so s is the
// forward's score bit for bit), the chosen key tokens gathered into grad_query's rows on the
// way (so they are read from the key maps once), then the coefficients and, in place,
// grad_query = q_self * q + gain * k.
void backward_keys_simd(Isa isa, const at::Tensor& q, const at::Tensor& k, const Extent& e, const int64_t* pos_data,
                        const int64_t* ix_data, const float* gs_data, int64_t* chosen_data, int64_t* frame_data,
                        float* gain_data, float* kself_data, float* gq_data) {
  const int64_t B = k.size(0), T = e.frames, D = e.channels, N = e.tokens();
  const Rows<const float> qr(q, q.const_data_ptr<float>()), kr(k, k.const_data_ptr<float>());
  const int64_t kTokens = band_size(N);
  const int64_t runs = (N + kTokens - 1) / kTokens;
  at::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
    const int64_t stride = round_lanes(kTokens);
    std::vector<int32_t> idx(stride);
    std::vector<float> qk(stride), kk(stride), qq(stride), poison(stride), qself(stride);
    std::vector<int64_t> rows(T);
    for (int64_t t = 0; t < T; ++t) rows[t] = t * kr.frame;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / runs, p0 = task % runs * kTokens, n = std::min(kTokens, N - p0);
      int64_t* ch = chosen_data + b * N + p0;
      int64_t* fr = frame_data + b * N + p0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = ix_data[b * N + p0 + i];
        const int64_t ps = t >= 0 && t < T ? pos_data[(b * T + t) * N + p0 + i] : -1;
        ch[i] = ps;
        fr[i] = ps >= 0 ? t : -1;
      }
      int64_t lo = N, hi = 0;
      band_offsets(fr, ch, n, stride, kr.frame, idx.data(), lo, hi);
      float* gq = gq_data + b * D * N + p0;
      chosen_sums(isa, KeySums{qr.row(b, 0, 0) + p0, qr.channel, kr.row(b, 0, 0), kr.channel, idx.data(), stride, D, n,
                               qk.data(), kk.data(), qq.data(), poison.data(), gq, N,
                               Prefetch{rows.data(), T, lo, hi, lead(e)}});
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = b * N + p0 + i;
        Coefficients<float> cf{0.f, 0.f, 0.f};
        if (ch[i] >= 0) cf = coefficients<float>(qk[i], qq[i], kk[i], gs_data[p]);
        gain_data[p] = cf.gain;
        kself_data[p] = cf.k_self;
        qself[i] = cf.q_self;
      }
      const float* gain = gain_data + b * N + p0;
      for (int64_t c = 0; c < D; ++c) {
        const float* qrow = qr.row(b, 0, c) + p0;
        float* grow = gq + c * N;
        // A token whose choice is outside (or none) reads a zero key: no gradient.
        for (int64_t i = 0; i < n; ++i) grow[i] = ch[i] >= 0 ? qself[i] * qrow[i] + gain[i] * grow[i] : 0.f;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> backward_cpu(
    at::TensorList grad_outs_in, const at::Tensor& grad_score, const at::Tensor& query, const at::Tensor& key,
    at::TensorList values_in, const at::Tensor& location, const at::Tensor& index) {
  const std::vector<at::Tensor> grad_outs(grad_outs_in.begin(), grad_outs_in.end());
  const std::vector<at::Tensor> values_list(values_in.begin(), values_in.end());
  check_backward(at::kCPU, grad_outs, grad_score, query, key, values_list, location, index);
  const Extent e = make_extent(key);
  const int64_t B = key.size(0), T = e.frames, D = e.channels, N = e.tokens();
  const auto dtype = query.scalar_type();
  const auto acc_options = query.options().dtype(accumulation_dtype(dtype));
  // The gradients in the inputs' dtype, written row by row from float32 (float64) sums held
  // in per-thread row buffers: no full-size accumulation copy for float16 / bfloat16.
  auto grad_query = at::empty(query.sizes(), query.options());
  auto grad_key = at::empty(key.sizes(), query.options());
  std::vector<at::Tensor> grad_values;
  for (const auto& v : values_list) grad_values.push_back(at::empty(v.sizes(), query.options()));
  cpu::advise_huge_pages(grad_query);
  cpu::advise_huge_pages(grad_key);
  for (const auto& g : grad_values) cpu::advise_huge_pages(g);
  auto finish = [&] { return std::make_tuple(grad_query, grad_key, grad_values); };
  if (B * N == 0) {
    grad_query.zero_();
    grad_key.zero_();
    for (auto& g : grad_values) g.zero_();
    return finish();
  }
  const auto pos = positions(location, e);
  const auto q = channels_first(query), k = channels_first(key);
  const auto ix = index.contiguous();
  const auto gs = grad_score.contiguous();
  std::vector<at::Tensor> gos;
  for (const auto& g : grad_outs) gos.push_back(channels_first(g));
  // Per token: the chosen token (-1: none), the frame, and two gradient coefficients.
  auto chosen = at::empty({B, N}, ix.options());
  auto frame = at::empty({B, N}, ix.options());
  auto coef = at::empty({2, B, N}, acc_options);
  // Tokens with an inside choice, bucketed by frame: order[b, bucket[b, t] : bucket[b, t + 1]].
  auto order = at::empty({B, N}, ix.options());
  auto bucket = at::empty({B, T + 1}, ix.options());
  const int64_t kTokens = band_size(N);
  const int64_t runs = (N + kTokens - 1) / kTokens;
  const bool simd = dtype == at::kFloat && simd_fits(k, e);
  if (simd) {
    float* gain = coef.mutable_data_ptr<float>();
    backward_keys_simd(cpu::select_isa("trajectory_attention_backward"), q, k, e, pos.const_data_ptr<int64_t>(),
                       ix.const_data_ptr<int64_t>(), gs.const_data_ptr<float>(), chosen.mutable_data_ptr<int64_t>(),
                       frame.mutable_data_ptr<int64_t>(), gain, gain + B * N, grad_query.mutable_data_ptr<float>());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "trajectory_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<const scalar_t> qr(q, q.const_data_ptr<scalar_t>()), kr(k, k.const_data_ptr<scalar_t>());
    const int64_t* pos_data = pos.const_data_ptr<int64_t>();
    const int64_t* ix_data = ix.const_data_ptr<int64_t>();
    const scalar_t* gs_data = gs.const_data_ptr<scalar_t>();
    int64_t* chosen_data = chosen.mutable_data_ptr<int64_t>();
    int64_t* frame_data = frame.mutable_data_ptr<int64_t>();
    acc_t* gain_data = coef.mutable_data_ptr<acc_t>();
    acc_t* kself_data = gain_data + B * N;
    scalar_t* gq_data = grad_query.mutable_data_ptr<scalar_t>();
    // 1. grad_query and the coefficients, per band of tokens. The band's tokens with an
    // inside choice are grouped by frame (token order within a frame), so that the chosen
    // keys are read as in the forward: per (channel block, frame), forward through one map.
    // The sums use the forward's channel blocks, so s is the forward's score bit for bit.
    if (!simd) at::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qv(kBlock * kTokens), qq(kTokens), qk(kTokens), kk(kTokens), qself(kTokens), gbuf(kTokens);
      std::vector<int64_t> grouped(kTokens), start(T + 1), next(T);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / runs, p0 = task % runs * kTokens, n = std::min(kTokens, N - p0);
        const int64_t* ch = chosen_data + b * N + p0;
        const int64_t* fr = frame_data + b * N + p0;
        std::fill(start.begin(), start.end(), int64_t(0));
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = b * N + p0 + i, t = ix_data[p];
          const int64_t ps = t >= 0 && t < T ? pos_data[(b * T + t) * N + p0 + i] : -1;
          chosen_data[p] = ps;
          frame_data[p] = ps >= 0 ? t : -1;
          if (ps >= 0) ++start[t + 1];
        }
        for (int64_t t = 0; t < T; ++t) start[t + 1] += start[t];
        std::copy(start.begin(), start.end() - 1, next.begin());
        for (int64_t i = 0; i < n; ++i)
          if (fr[i] >= 0) grouped[next[fr[i]]++] = i;
        std::fill(qq.begin(), qq.end(), acc_t(0));
        std::fill(qk.begin(), qk.end(), acc_t(0));
        std::fill(kk.begin(), kk.end(), acc_t(0));
        for (int64_t c0 = 0; c0 < D; c0 += kBlock) {
          const int64_t width = std::min(kBlock, D - c0);
          query_block(qr.row(b, 0, c0) + p0, qr.channel, width, n, qv.data(), kTokens, qq.data(),
                      static_cast<acc_t*>(nullptr));
          for (int64_t t = 0; t < T; ++t)
            block_sums(kr.row(b, t, c0), kr.channel, width, qv.data(), kTokens, qk.data(), kk.data(),
                       [&](auto&& add) {
                         for (int64_t j = start[t]; j < start[t + 1]; ++j) add(grouped[j], ch[grouped[j]]);
                       });
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = b * N + p0 + i;
          Coefficients<acc_t> cf{acc_t(0), acc_t(0), acc_t(0)};
          if (ch[i] >= 0) cf = coefficients<acc_t>(qk[i], qq[i], kk[i], vsr_kernels::convert<acc_t>(gs_data[p]));
          gain_data[p] = cf.gain;
          kself_data[p] = cf.k_self;
          qself[i] = cf.q_self;
        }
        const acc_t* gain = gain_data + b * N + p0;
        for (int64_t c = 0; c < D; ++c) {
          const scalar_t* qrow = qr.row(b, 0, c) + p0;
          acc_t* grow = gbuf.data();
          // A token whose choice is outside (or none) reads a zero key: no gradient.
          for (int64_t i = 0; i < n; ++i)
            grow[i] = ch[i] >= 0 ? qself[i] * vsr_kernels::convert<acc_t>(qrow[i]) : acc_t(0);
          for (int64_t t = 0; t < T; ++t) {
            const scalar_t* krow = kr.row(b, t, c);
            for (int64_t j = start[t]; j < start[t + 1]; ++j) {
              const int64_t i = grouped[j];
              grow[i] += gain[i] * vsr_kernels::convert<acc_t>(krow[ch[i]]);
            }
          }
          scalar_t* gout = gq_data + (b * D + c) * N + p0;
          for (int64_t i = 0; i < n; ++i) gout[i] = vsr_kernels::convert<scalar_t>(grow[i]);
        }
      }
    });
    // 2. Buckets by frame, tokens in increasing order within each.
    int64_t* order_data = order.mutable_data_ptr<int64_t>();
    int64_t* bucket_data = bucket.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> fill(T);
      for (int64_t b = begin; b < end; ++b) {
        int64_t* bk = bucket_data + b * (T + 1);
        std::fill(bk, bk + T + 1, int64_t(0));
        for (int64_t p = 0; p < N; ++p)
          if (frame_data[b * N + p] >= 0) ++bk[frame_data[b * N + p] + 1];
        for (int64_t t = 0; t < T; ++t) bk[t + 1] += bk[t];
        std::copy(bk, bk + T, fill.begin());
        for (int64_t p = 0; p < N; ++p)
          if (frame_data[b * N + p] >= 0) order_data[b * N + fill[frame_data[b * N + p]]++] = p;
      }
    });
    // 3. grad_key and grad_values, per (b, channel block); for each channel the T frames'
    // rows in turn, each zeroed, then its bucket added in token order. Frames inner: the
    // channel's source row (query or grad_out) stays in L1 across the T frames.
    // float16 / bfloat16: each row summed in a per-thread float32 row, then rounded once.
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
    auto scatter = [&](at::Tensor& grad, int64_t channels, auto&& add_row) {
      scalar_t* g = grad.mutable_data_ptr<scalar_t>();
      const int64_t blocks = (channels + kChannels - 1) / kChannels;
      at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buffer(direct ? 0 : N);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / blocks, c0 = task % blocks * kChannels;
          const int64_t* bk = bucket_data + b * (T + 1);
          for (int64_t c = c0; c < std::min(c0 + kChannels, channels); ++c)
            for (int64_t t = 0; t < T; ++t) {
              scalar_t* out = g + ((b * T + t) * channels + c) * N;
              acc_t* row = direct ? reinterpret_cast<acc_t*>(out) : buffer.data();
              std::fill(row, row + N, acc_t(0));
              add_row(row, b, t, c, order_data + b * N + bk[t], bk[t + 1] - bk[t]);
              if (!direct)
                for (int64_t p = 0; p < N; ++p) out[p] = vsr_kernels::convert<scalar_t>(row[p]);
            }
        }
      });
    };
    scatter(grad_key, D, [&](acc_t* row, int64_t b, int64_t t, int64_t c, const int64_t* tokens, int64_t n) {
      const scalar_t* qrow = qr.row(b, 0, c);
      const scalar_t* krow = kr.row(b, t, c);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t p = tokens[j], ps = chosen_data[b * N + p];
        row[ps] += gain_data[b * N + p] * vsr_kernels::convert<acc_t>(qrow[p]) +
                   kself_data[b * N + p] * vsr_kernels::convert<acc_t>(krow[ps]);
      }
    });
    for (size_t m = 0; m < grad_values.size(); ++m) {
      const Rows<const scalar_t> gr(gos[m], gos[m].const_data_ptr<scalar_t>());
      scatter(grad_values[m], values_list[m].size(2),
              [&](acc_t* row, int64_t b, int64_t t, int64_t c, const int64_t* tokens, int64_t n) {
                const scalar_t* grow = gr.row(b, 0, c);
                for (int64_t j = 0; j < n; ++j) {
                  const int64_t p = tokens[j];
                  row[chosen_data[b * N + p]] += vsr_kernels::convert<acc_t>(grow[p]);
                }
              });
    }
  });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CPU, m) {
  m.impl("trajectory_attention", &forward_cpu);
  m.impl("trajectory_attention_backward", &backward_cpu);
}

}  // namespace trajectory_attention
}  // namespace vsr_kernels
