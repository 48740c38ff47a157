// CPU launchers of local argmax attention: at::parallel_for over rows of pixels, each
// pixel computed by the shared per-pixel functions in kernels/local_argmax_attention.h.
// Inputs are read channels-last where a pixel's channels are read together (see each launcher).
// float16 and bfloat16 are computed in float32 and rounded once to the input dtype, as on GPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>


#include "../glue/local_argmax_attention.h"
#include "isa.h"
#include "local_argmax_attention_isa.h"

namespace vsr_kernels {
namespace local_argmax_attention {
namespace {

// Rows of pixels per task: enough work to amortise scheduling, small enough to balance.
constexpr int64_t kRowsPerTask = 4;

// ---------------------------------------------------------------------------------------
// Forward: per-ISA row kernels (local_argmax_attention_simd.h) over buffers laid out here.

using cpu::Isa;

template <typename T>
void score_row(Isa isa, const RowArgs<T>& a, int jy, T* best, LaneIndex<T>* best_j) {
  switch (isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))  // elsewhere only base is built
    case Isa::kAvx512: avx512::score_row(a, jy, best, best_j); break;
    case Isa::kAvx2: avx2::score_row(a, jy, best, best_j); break;
#endif
    default: base::score_row(a, jy, best, best_j); break;
  }
}

// Rows per step of the backward's first pass.
constexpr int64_t kRowsPerBlock = 8;

// Channels per step of the backward's second pass, and pixels per chunk in it.
constexpr int64_t kChannelsPerBlock = 16;
constexpr int64_t kPixelsPerChunk = 1024;

// Pixels per row in the buffers: a multiple of every vector width (16 floats).
constexpr int64_t kRowAlign = 16;

// The most recently used rows of a (T, C, H, W) frame stack, converted to T, with unit
// pixel stride and zero padding: slot i holds a row cy with cy / dilation = i (mod K), so
// the K rows y + (jy - r) * dilation one query row reads sit in K different slots, channel c at
// data[(i * C + c) * stride + pad + x], x in [0, W), zero for x in [-pad, W + pad') (the
// padding is never written). Slot K is an all-zero row: what outside candidates read.
template <typename T>
struct RowCache {
  int64_t channels, stride, pad, dilation;
  std::vector<T> data;
  std::vector<int64_t> tags;  // the (frame, row) each slot holds, -1: none

  RowCache(int kernel_size, int dilation, int64_t channels, int64_t stride, int64_t pad)
      : channels(channels), stride(stride), pad(pad), dilation(dilation), data((kernel_size + 1) * channels * stride, T(0)),
        tags(kernel_size, -1) {}

  T* zeros() { return row(static_cast<int64_t>(tags.size())); }
  T* row(int64_t slot) { return data.data() + slot * channels * stride + pad; }

  // Row cy of frame t of `frames` (batch element b, frame index bt = b * T + t); copied only
  // when its slot holds another row.
  template <typename scalar_t>
  T* fetch(const Frames<const scalar_t>& frames, int64_t bt, int64_t t, int64_t cy, int64_t height, int64_t width) {
    const int64_t slot = cy / dilation % static_cast<int64_t>(tags.size()), tag = bt * height + cy;
    T* dst = row(slot);
    if (tags[slot] != tag) {
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* src = &frames.at(t, c, cy * width);  // unit pixel stride (channels_first)
        for (int64_t x = 0; x < width; ++x) dst[c * stride + x] = vsr_kernels::convert<T>(src[x]);
      }
      tags[slot] = tag;
    }
    return dst;
  }
};

// The forward of rows [begin, end) of the (B, T, H) rows, computed in T (float32 for
// float16 and bfloat16). Query, key and value rows are copied (converted, padded) into the
// kernel's buffers, the key and value rows through RowCaches, so consecutive query rows of a
// frame share K - 1 of them and a frame's rows are read from memory about once.
template <typename scalar_t, typename T>
void forward_rows(Isa isa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& score, at::Tensor& index, const Window& w, const Extent& e, T scale, int64_t begin,
                  int64_t end) {
  const int64_t T_ = e.frames, C = e.channels, Cv = e.value_channels, H = w.height, W = w.width;
  const int K = w.kernel_size, r = K / 2;
  const int64_t reach = static_cast<int64_t>(r) * w.dilation;
  const int64_t Wr = (W + kRowAlign - 1) / kRowAlign * kRowAlign, pad = reach < W ? reach : W,
                Ws = Wr + 2 * pad;
  std::vector<T> qbuf(C * Wr, T(0)), best(Wr);
  RowCache<T> keys(K, w.dilation, C, Ws, pad), values(K, w.dilation, Cv, Ws, pad);
  std::vector<LaneIndex<T>> best_j(Wr);
  std::vector<const T*> picked(W);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / (T_ * H), t = row / H % T_, y = row % H, bt = b * T_ + t;
    const auto qf = frames_at<const scalar_t>(q, b), kf = frames_at<const scalar_t>(k, b),
               vf = frames_at<const scalar_t>(v, b);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = &qf.at(0, c, y * W);
      for (int64_t x = 0; x < W; ++x) qbuf[c * Wr + x] = vsr_kernels::convert<T>(src[x]);
    }
    std::fill(best_j.begin(), best_j.end(), LaneIndex<T>(-1));
    std::fill(best.begin(), best.end(), T(0));
    for (int jy = 0; jy < K; ++jy) {
      const int64_t cy = y + static_cast<int64_t>(jy - r) * w.dilation;
      const bool inside = cy >= 0 && cy < H;
      if (!inside && !w.zero_border) continue;
      const T* key = inside ? keys.fetch(kf, bt, t, cy, H, W) : keys.zeros();
      const RowArgs<T> a{qbuf.data(), Wr, key, keys.zeros(), Ws, C, W, Wr, K, w.dilation, scale,
                         w.zero_border, inside};
      score_row<T>(isa, a, jy, best.data(), best_j.data());
    }
    scalar_t* sc = score.data_ptr<scalar_t>() + bt * H * W + y * W;
    int64_t* ix = index.data_ptr<int64_t>() + bt * H * W + y * W;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t j = best_j[x];
      const int64_t sel = j < 0 ? -1 : w.candidate_pixel(y, x, static_cast<int>(j));
      // The selected value pixel's channel 0 in the value cache, or the zero row.
      picked[x] = sel < 0 ? values.zeros() : values.fetch(vf, bt, t, sel / W, H, W) + sel % W;
      sc[x] = vsr_kernels::convert<scalar_t>(best[x]);
      ix[x] = j;
    }
    // out = score * the selected value (0 for a zero-padded one, multiplied for real).
    const auto of = frames_at<scalar_t>(out, b);
    for (int64_t c = 0; c < Cv; ++c) {
      scalar_t* dst = &of.at(t, c, y * W);
      for (int64_t x = 0; x < W; ++x) dst[x] = vsr_kernels::convert<scalar_t>(best[x] * picked[x][c * Ws]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t kernel_size,
    int64_t dilation, double scale, bool zero_border) {
  const Window w = check_forward(at::kCPU, query, key, value, kernel_size, dilation, zero_border);
  const int64_t B = key.size(0), T = key.size(1), H = key.size(3);
  auto [out, score, index] = empty_forward_outputs(query, key, value);
  if (score.numel() == 0) return {out, score, index};
  const Isa isa = cpu::select_isa(kForwardOp);
  // Rows of query, key and value are copied (converted, padded) into the kernel's buffers
  // and out is written row by row: channels-first inputs, unit pixel stride, no copies.
  const auto q = channels_first(query), k = channels_first(key), v = channels_first(value);
  const Extent e = make_extent(key, value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "local_argmax_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, B * T * H, kRowsPerTask, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t, acc_t>(isa, q, k, v, out, score, index, w, e, static_cast<acc_t>(scale), begin, end);
    });
  });
  return {out, score, index};
}

// ---------------------------------------------------------------------------------------
// Backward: each query pixel selected one key and value pixel per frame, so its gradient
// goes to that one position. Two passes over channels-first planes (unit pixel stride),
// each output element written by one task, in a fixed order (deterministic, no atomics):
// 1. per (b, t, block of rows): the selected pixel sel (-1: none, or a zero-padded key) and
//    g = scale * (grad_score + <grad_out, value[sel]>), the gradient of the selection's
//    score before the query-key product;
// 2. per (b, block of channels) of the C key and the Cv value channels, frames in
//    increasing t and pixels p in increasing p: a key channel adds g[t, p] * query[c, p] to grad_key[t, c, sel[t, p]] and
//    g[t, p] * key[t, c, sel[t, p]] to grad_query[c, p]; a value channel adds
//    score[t, p] * grad_out[t, c, p] to grad_value[t, c, sel[t, p]].
// Empty T, C or Cv need no special case: the loops over them run zero times.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_score, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& score, const at::Tensor& index,
    int64_t kernel_size, int64_t dilation, double scale, bool zero_border) {
  const Window w = check_backward(at::kCPU, grad_out, grad_score, query, key, value, score, index, kernel_size,
                                  dilation, zero_border);
  const int64_t B = key.size(0), T = key.size(1), C = key.size(2), Cv = value.size(2), H = key.size(3),
                W = key.size(4), P = H * W;
  if (B == 0 || H == 0 || W == 0)
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
  const auto go = channels_first(grad_out), q = channels_first(query), k = channels_first(key),
             v = channels_first(value);
  const auto acc_options = query.options().dtype(accumulation_dtype(query.scalar_type()));
  auto grad_query = at::empty(query.sizes(), acc_options), grad_key = at::empty(key.sizes(), acc_options),
       grad_value = at::empty(value.sizes(), acc_options);
  const auto gs = grad_score.contiguous(), sc = score.contiguous(), ix = index.contiguous();
  // sel as int32 when a frame's pixel numbers fit: half the bytes of the map both passes stream.
  const bool narrow = P <= std::numeric_limits<int32_t>::max();
  auto selected = at::empty({B, T, H, W}, index.options().dtype(narrow ? at::kInt : at::kLong)),
       g_map = at::empty({B, T, H, W}, acc_options);
  const int64_t K2 = w.candidates();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "local_argmax_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    const int64_t* index_map = ix.data_ptr<int64_t>();
    const scalar_t *gs_map = gs.data_ptr<scalar_t>(), *score_map = sc.data_ptr<scalar_t>();
    acc_t* g_all = g_map.data_ptr<acc_t>();
    // Channel c of frame t of batch element b of a channels_first() tensor: P pixels at unit stride.
    auto plane = [](const at::Tensor& x, int64_t b, int64_t t, int64_t c) {
      const Frames<const scalar_t> f = frames_at<const scalar_t>(x, b);
      return &f.at(t, c, 0);
    };
    auto run = [&](auto* sel_map) {
      using index_t = std::remove_pointer_t<decltype(sel_map)>;
      // 1. sel and g, a block of rows of one frame per step, channel by channel: the value
      //    rows one block gathers from stay in L1 while the channel's grad_out rows stream by
      //    (row by row, the Cv planes' rows, a power-of-two stride apart, evict each other).
      const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
      at::parallel_for(0, B * T * row_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bt = task / row_blocks, b = bt / T, t = bt % T, y0 = task % row_blocks * kRowsPerBlock,
                        y1 = std::min(H, y0 + kRowsPerBlock), first = bt * P + y0 * W, n = (y1 - y0) * W;
          index_t* sel = sel_map + first;
          acc_t* g = g_all + first;
          for (int64_t i = 0; i < n; ++i) {
            // An index outside [0, K * K) selects nothing (only a direct call can pass one).
            const int64_t j = index_map[first + i];
            sel[i] = static_cast<index_t>(j < 0 || j >= K2 ? -1 : w.candidate_pixel(y0 + i / W, i % W, static_cast<int>(j)));
            g[i] = 0;
          }
          for (int64_t c = 0; c < Cv; ++c) {
            const scalar_t *gor = plane(go, b, t, c) + y0 * W, *vp = plane(v, b, t, c);
            for (int64_t i = 0; i < n; ++i)
              if (sel[i] >= 0) g[i] += vsr_kernels::convert<acc_t>(gor[i]) * vsr_kernels::convert<acc_t>(vp[sel[i]]);
          }
          for (int64_t i = 0; i < n; ++i)
            g[i] = sel[i] < 0 ? acc_t(0) : s * (vsr_kernels::convert<acc_t>(gs_map[first + i]) + g[i]);
        }
      });
      // 2. One (b, block of channels) per step, the key channels' blocks (grad_key and
      //    grad_query) interleaved with the value channels' (grad_value) so that both threads
      //    of a split get both kinds. Frames in increasing t, pixels in chunks that keep their
      //    sel and g in L1 while every channel of the block uses them, and within a chunk in
      //    increasing p: each element gets its terms in increasing p.
      const int64_t key_blocks = (C + kChannelsPerBlock - 1) / kChannelsPerBlock,
                    value_blocks = (Cv + kChannelsPerBlock - 1) / kChannelsPerBlock,
                    pairs = std::min(key_blocks, value_blocks), blocks = key_blocks + value_blocks;
      at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / blocks, slot = task % blocks;
          // slots 0 .. 2 * pairs - 1 alternate key, value; the rest are the longer kind's.
          const bool keys = slot < 2 * pairs ? slot % 2 == 0 : key_blocks > value_blocks;
          const int64_t block = slot < 2 * pairs ? slot / 2 : slot - pairs;
          const int64_t channels = keys ? C : Cv, c0 = block * kChannelsPerBlock,
                        c1 = std::min(channels, c0 + kChannelsPerBlock);
          if (keys)
            for (int64_t c = c0; c < c1; ++c) {
              acc_t* gq = grad_query.data_ptr<acc_t>() + (b * C + c) * P;
              std::fill(gq, gq + P, acc_t(0));
            }
          for (int64_t t = 0; t < T; ++t) {
            const int64_t bt = b * T + t;
            acc_t* grad = (keys ? grad_key.data_ptr<acc_t>() : grad_value.data_ptr<acc_t>()) + bt * channels * P;
            std::fill(grad + c0 * P, grad + c1 * P, acc_t(0));
            for (int64_t p0 = 0; p0 < P; p0 += kPixelsPerChunk) {
              const int64_t p1 = std::min(P, p0 + kPixelsPerChunk);
              const index_t* sel = sel_map + bt * P;
              for (int64_t c = c0; c < c1; ++c) {
                acc_t* gc = grad + c * P;
                if (keys) {
                  const acc_t* g = g_all + bt * P;
                  const scalar_t *qp = plane(q, b, 0, c), *kp = plane(k, b, t, c);
                  acc_t* gq = grad_query.data_ptr<acc_t>() + (b * C + c) * P;
                  for (int64_t p = p0; p < p1; ++p) {
                    if (sel[p] < 0) continue;
                    gc[sel[p]] += g[p] * vsr_kernels::convert<acc_t>(qp[p]);
                    gq[p] += g[p] * vsr_kernels::convert<acc_t>(kp[sel[p]]);
                  }
                } else {
                  const scalar_t *score_bt = score_map + bt * P, *gop = plane(go, b, t, c);
                  for (int64_t p = p0; p < p1; ++p)
                    if (sel[p] >= 0)
                      gc[sel[p]] += vsr_kernels::convert<acc_t>(score_bt[p]) * vsr_kernels::convert<acc_t>(gop[p]);
                }
              }
            }
          }
        }
      });
    };
    if (narrow)
      run(selected.data_ptr<int32_t>());
    else
      run(selected.data_ptr<int64_t>());
  });
  const auto dtype = query.scalar_type();
  return {to_contiguous(grad_query, dtype), to_contiguous(grad_key, dtype), to_contiguous(grad_value, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CPU, m) {
  m.impl("local_argmax_attention", &forward_cpu);
  m.impl("local_argmax_attention_backward", &backward_cpu);
}

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
