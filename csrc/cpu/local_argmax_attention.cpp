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
#include "huge_pages.h"
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
  for (const auto& t : {out, score, index}) cpu::advise_huge_pages(t);
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
// Backward: each query pixel p selected one key and value pixel sel per frame, so its
// gradient goes to that one position: with g = scale * (grad_score + <grad_out[p], value[sel]>),
// grad_key[sel] += g * query[p], grad_value[sel] += score[p] * grad_out[p] and
// grad_query[p] += g * key[sel], summed over the frames.
//
// Tiles of output pixels (b, rows [y0, y1), columns [x0, x1)), each owning those pixels of
// grad_query and of every frame's grad_key and grad_value, so that no two tasks write the same
// element (no atomics). A tile visits every query pixel that can select one of its pixels or
// is its own: its pixels and a halo of reach = r * dilation around them. Per frame, rows in
// increasing y, pixels in increasing x: every output element receives its terms in increasing
// p, and grad_query its frames in increasing t, whatever the tiling, so the bits do not depend
// on the number of threads (or of tiles). Everything is computed channels-last (a pixel's
// channels are adjacent: one vector operation per 16 floats), through rings of the 2 * reach
// + 1 rows a row of query pixels can select from: value and key rows are transposed in as
// they enter, the tile's key and value gradient rows out as they complete, and grad_out and
// query rows as they are visited (per-ISA transposes and row kernel, local_argmax_attention_simd.h).
// Tiles are at most kTileColumns wide so that the rings stay in L2.
constexpr int64_t kTileColumns = 64;

template <typename T>
void transpose(Isa isa, const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride,
               bool add) {
  switch (isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    case Isa::kAvx512: avx512::transpose(src, src_stride, rows, cols, dst, dst_stride, add); break;
    case Isa::kAvx2: avx2::transpose(src, src_stride, rows, cols, dst, dst_stride, add); break;
#endif
    default: base::transpose(src, src_stride, rows, cols, dst, dst_stride, add); break;
  }
}

template <typename T>
void backward_row(Isa isa, const BackwardRowArgs<T>& a) {
  switch (isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    case Isa::kAvx512: avx512::backward_row(a); break;
    case Isa::kAvx2: avx2::backward_row(a); break;
#endif
    default: base::backward_row(a); break;
  }
}

// What every tile of one backward call reads and writes.
template <typename scalar_t, typename T>
struct BackwardProblem {
  Isa isa;
  Window w;
  int64_t B, T_, C, Cv, H, W;
  at::Tensor go, q, k, v;  // channels_first(): unit pixel stride
  const scalar_t *gs, *sc;  // (B, T, H, W) contiguous
  const int64_t* ix;
  T *grad_query, *grad_key, *grad_value;  // contiguous, in T
  T scale;
};

// Channels [0, channels) of row y, columns [x0, x0 + n) of frame t of `f` (channel stride
// f.stride.channel, unit pixel stride), transposed into dst[x * pitch + c]; converted to T
// through `scratch` when scalar_t is not T.
template <typename scalar_t, typename T>
void load_row(Isa isa, const Frames<const scalar_t>& f, int64_t t, int64_t channels, int64_t row_start, int64_t n,
              int64_t pitch, T* dst, std::vector<T>& scratch) {
  if (channels == 0 || n == 0) return;
  const scalar_t* src = &f.at(t, 0, row_start);
  if constexpr (std::is_same_v<scalar_t, T>) {
    transpose<T>(isa, src, f.stride.channel, channels, n, dst, pitch, false);
  } else {
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t x = 0; x < n; ++x) scratch[c * n + x] = vsr_kernels::convert<T>(src[c * f.stride.channel + x]);
    transpose<T>(isa, scratch.data(), n, channels, n, dst, pitch, false);
  }
}

// GCC 12 at -O3 drops __builtin_prefetch in these loops (its addresses come from run-time
// strides), so on x86 the instruction is written out.
inline void prefetch_line(const char* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Asks for the cache lines of channels [0, channels) of row y, columns [x0, x0 + n) of frame t
// of `f`, one row ahead of its transposition: 64+ channel planes a power of two apart are more
// streams than the hardware prefetchers follow.
template <typename scalar_t>
void prefetch_row(const Frames<const scalar_t>& f, int64_t t, int64_t channels, int64_t row_start, int64_t n) {
  if (n == 0) return;
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t c = 0; c < channels; ++c) {
    const char* first = reinterpret_cast<const char*>(f.data + t * f.stride.frame + c * f.stride.channel + row_start);
    for (int64_t offset = 0; offset < bytes; offset += 64) prefetch_line(first + offset);
    prefetch_line(first + bytes - 1);
  }
}

template <typename scalar_t, typename T>
void backward_tile(const BackwardProblem<scalar_t, T>& pb, int64_t b, int64_t y0, int64_t y1, int64_t x0,
                   int64_t x1) {
  const Window& w = pb.w;
  const int64_t H = pb.H, W = pb.W, C = pb.C, Cv = pb.Cv, P = H * W, K = w.kernel_size, K2 = w.candidates();
  const int r = w.kernel_size / 2;
  const int64_t reach = static_cast<int64_t>(r) * w.dilation;
  const int64_t ye0 = std::max<int64_t>(0, y0 - std::min(reach, H)), ye1 = std::min(H, y1 + std::min(reach, H)),
                xe0 = std::max<int64_t>(0, x0 - std::min(reach, W)), xe1 = std::min(W, x1 + std::min(reach, W));
  const int64_t We = xe1 - xe0, Wo = x1 - x0;
  // Ring slots: rows y - reach .. y + reach of the extended rows are distinct mod S.
  const int64_t S = std::min(2 * std::min(reach, H) + 1, ye1 - ye0);
  constexpr int64_t align = kPitchBytes / static_cast<int64_t>(sizeof(T));
  const int64_t pitch = (C + align - 1) / align * align, vpitch = (Cv + align - 1) / align * align;
  std::vector<T> vring(S * We * vpitch, T(0)), kring(S * We * pitch, T(0)), gkring(S * We * pitch),
      gvring(S * We * vpitch), go_cl(We * vpitch, T(0)), q_cl(We * pitch, T(0)), gq_cl(Wo * pitch),
      scratch(std::is_same_v<scalar_t, T> ? 0 : std::max(C, Cv) * We);
  std::vector<BackwardItem<T>> items(We);
  const auto qf = frames_at<const scalar_t>(pb.q, b), kf = frames_at<const scalar_t>(pb.k, b),
             vf = frames_at<const scalar_t>(pb.v, b), gof = frames_at<const scalar_t>(pb.go, b);
  auto slot = [&](int64_t row) { return (row - ye0) % S; };
  for (int64_t t = 0; t < pb.T_; ++t) {
    const int64_t bt = b * pb.T_ + t;
    T* grad_key = pb.grad_key + bt * C * P;
    T* grad_value = pb.grad_value + bt * Cv * P;
    int64_t loaded = ye0, flushed = y0;
    // Transposes out the tile's columns of completed rows [flushed, until) of the gradient rings.
    auto flush = [&](int64_t until) {
      for (; flushed < until; ++flushed) {
        const int64_t offset = (slot(flushed) * We + x0 - xe0);
        transpose<T>(pb.isa, gkring.data() + offset * pitch, pitch, Wo, C, grad_key + flushed * W + x0, P, false);
        transpose<T>(pb.isa, gvring.data() + offset * vpitch, vpitch, Wo, Cv, grad_value + flushed * W + x0, P,
                     false);
      }
    };
    for (int64_t y = ye0; y < ye1; ++y) {
      // Rows up to y + reach enter the rings; the tile's own get zeroed gradient rows.
      for (const int64_t until = std::min(ye1, y + std::min(reach, H) + 1); loaded < until; ++loaded) {
        const int64_t sl = slot(loaded);
        load_row<scalar_t, T>(pb.isa, vf, t, Cv, loaded * W + xe0, We, vpitch, vring.data() + sl * We * vpitch,
                              scratch);
        load_row<scalar_t, T>(pb.isa, kf, t, C, loaded * W + xe0, We, pitch, kring.data() + sl * We * pitch,
                              scratch);
        if (loaded >= y0 && loaded < y1) {
          std::fill_n(gkring.data() + sl * We * pitch, We * pitch, T(0));
          std::fill_n(gvring.data() + sl * We * vpitch, We * vpitch, T(0));
        }
      }
      if (const int64_t next = y + std::min(reach, H) + 1; next < ye1) {
        prefetch_row(vf, t, Cv, next * W + xe0, We);
        prefetch_row(kf, t, C, next * W + xe0, We);
      }
      if (y + 1 < ye1) {
        prefetch_row(gof, t, Cv, (y + 1) * W + xe0, We);
        prefetch_row(qf, 0, C, (y + 1) * W + xe0, We);
      }
      const bool own_row = y >= y0 && y < y1;
      // The selections of row y this tile needs, in increasing x.
      int64_t count = 0;
      const int64_t* index_row = pb.ix + bt * P + y * W;
      for (int64_t x = xe0; x < xe1; ++x) {
        // An index outside [0, K * K) selects nothing (only a direct call can pass one).
        const int64_t j = index_row[x];
        if (j < 0 || j >= K2) continue;
        const int64_t sy = y + (j / K - r) * static_cast<int64_t>(w.dilation),
                      sx = x + (j % K - r) * static_cast<int64_t>(w.dilation);
        if (sy < 0 || sy >= H || sx < 0 || sx >= W) continue;  // a zero-padded key: nothing to differentiate
        const bool own = own_row && x >= x0 && x < x1, own_sel = sy >= y0 && sy < y1 && sx >= x0 && sx < x1;
        if (!own && !own_sel) continue;
        const int64_t p = bt * P + y * W + x;
        items[count++] = {x - xe0, slot(sy) * We + sx - xe0, own ? x - x0 : -1,
                          vsr_kernels::convert<T>(pb.gs[p]), vsr_kernels::convert<T>(pb.sc[p]), own_sel};
      }
      if (count > 0) {
        load_row<scalar_t, T>(pb.isa, gof, t, Cv, y * W + xe0, We, vpitch, go_cl.data(), scratch);
        load_row<scalar_t, T>(pb.isa, qf, 0, C, y * W + xe0, We, pitch, q_cl.data(), scratch);
      }
      if (own_row) std::fill(gq_cl.begin(), gq_cl.end(), T(0));
      const BackwardRowArgs<T> a{items.data(), count, go_cl.data(), q_cl.data(), vring.data(), kring.data(),
                                 gkring.data(), gvring.data(), gq_cl.data(), pitch, vpitch, pb.scale};
      backward_row<T>(pb.isa, a);
      // grad_query: frame 0 stores, later frames add, in increasing t.
      if (own_row)
        transpose<T>(pb.isa, gq_cl.data(), pitch, Wo, C, pb.grad_query + b * C * P + y * W + x0, P, t > 0);
      flush(std::min(y1, y - std::min(reach, H) + 1));
    }
    flush(y1);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_score, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& score, const at::Tensor& index,
    int64_t kernel_size, int64_t dilation, double scale, bool zero_border) {
  const Window w = check_backward(at::kCPU, grad_out, grad_score, query, key, value, score, index, kernel_size,
                                  dilation, zero_border);
  const int64_t B = key.size(0), T = key.size(1), C = key.size(2), Cv = value.size(2), H = key.size(3),
                W = key.size(4);
  if (B == 0 || H == 0 || W == 0)
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
  const auto acc_options = query.options().dtype(accumulation_dtype(query.scalar_type()));
  if (T == 0) return {at::zeros(query.sizes(), query.options()), at::zeros(key.sizes(), key.options()),
                      at::zeros(value.sizes(), value.options())};
  const Isa isa = cpu::select_isa(kBackwardOp);
  auto grad_query = at::empty(query.sizes(), acc_options), grad_key = at::empty(key.sizes(), acc_options),
       grad_value = at::empty(value.sizes(), acc_options);
  for (const auto& g : {grad_query, grad_key, grad_value}) cpu::advise_huge_pages(g);
  const auto gs = grad_score.contiguous(), sc = score.contiguous(), ix = index.contiguous();
  // Tiles: column tiles of at most kTileColumns, and row bands so that the tasks split evenly
  // over the threads (the bits do not depend on the tiling).
  const int64_t col_tiles = (W + kTileColumns - 1) / kTileColumns, threads = at::get_num_threads();
  int64_t bands = 1;
  while (bands < H && (B * col_tiles * bands) % threads != 0 && B * col_tiles * bands < 4 * threads) ++bands;
  const int64_t band_rows = (H + bands - 1) / bands, tile_cols = (W + col_tiles - 1) / col_tiles;
  bands = (H + band_rows - 1) / band_rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "local_argmax_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardProblem<scalar_t, acc_t> pb{isa, w, B, T, C, Cv, H, W,
        channels_first(grad_out), channels_first(query), channels_first(key), channels_first(value),
        gs.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), ix.data_ptr<int64_t>(),
        grad_query.data_ptr<acc_t>(), grad_key.data_ptr<acc_t>(), grad_value.data_ptr<acc_t>(),
        static_cast<acc_t>(scale)};
    at::parallel_for(0, B * bands * col_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (bands * col_tiles), band = task / col_tiles % bands, col = task % col_tiles;
        backward_tile<scalar_t, acc_t>(pb, b, band * band_rows, std::min(H, (band + 1) * band_rows),
                                       col * tile_cols, std::min(W, (col + 1) * tile_cols));
      }
    });
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
