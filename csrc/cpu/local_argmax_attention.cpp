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

// Both passes hold a selected pixel of a frame in int32.
void check_int32_pixels(const char* op, int64_t H, int64_t W) {
  TORCH_CHECK(H * W <= std::numeric_limits<int32_t>::max(), op,
              ": frames of 2^31 pixels or more are not supported on CPU, got ", H, "x", W);
}

template <typename T>
void score_rows(Isa isa, const RowArgs<T>& a, const QueryRow<T>* rows, int n) {
  VSR_CPU_ISA_CALL(isa, score_rows, a, rows, n);
}

template <typename T>
void select_values(Isa isa, const SelectArgs<T>& a) {
  VSR_CPU_ISA_CALL(isa, select_values, a);
}

// Pixels per row in the buffers: a multiple of every vector width (16 floats).
constexpr int64_t kRowAlign = 16;

// A zero-filled buffer of n elements starting on a 64-byte boundary (a cache line, and the
// AVX-512 kernel's aligned loads: see RowArgs).
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n) : storage_(n + 64 / sizeof(T), T(0)) {
    const auto misalignment = reinterpret_cast<uintptr_t>(storage_.data()) % 64;
    data_ = storage_.data() + (misalignment ? (64 - misalignment) / sizeof(T) : 0);
  }
  T* data() { return data_; }
  T& operator[](int64_t i) { return data_[i]; }

 private:
  std::vector<T> storage_;
  T* data_;
};

// The most recently used rows of a (T, C, H, W) frame stack, converted to T, with unit
// pixel stride and zero padding: slot i holds a row cy with cy / dilation = i (mod K + 1), so
// the K rows y + (jy - r) * dilation one query row reads, and the K + 1 two neighbouring query
// rows read (dilation 1), sit in different slots, channel c at data[(i * C + c) * stride + pad +
// x], x in [0, W), zero for x in [-pad, W + pad') (the padding is never written). Slot K + 1 is
// an all-zero row: what outside candidates read. With stride and pad multiples of 16 elements,
// every row's x = 0 starts a 64-byte line.
template <typename T>
struct RowCache {
  int64_t channels, stride, pad, dilation;
  AlignedBuffer<T> data;
  std::vector<int64_t> tags;  // the (frame, row) each slot holds, -1: none

  RowCache(int kernel_size, int dilation, int64_t channels, int64_t stride, int64_t pad)
      : channels(channels), stride(stride), pad(pad), dilation(dilation), data((kernel_size + 2) * channels * stride),
        tags(kernel_size + 1, -1) {}

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

// The channel rows the next query rows will copy that these rows do not (their query rows, and
// the key and value rows entering their window), prefetched into L2 a part at a time while these
// rows compute: without it the copies wait on memory, one 64-byte line of each of C planes a
// power of two apart at a time, which the hardware prefetchers do not follow.
class RowPrefetch {
 public:
  // Row cy of channels [0, channels) of a plane stack: `row0` is channel 0's row.
  void add(const void* row0, int64_t channel_stride_bytes, int64_t channels, int64_t row_bytes) {
    // Every channel's row from its line down to row_bytes past it: row_bytes / 64 + 1 lines.
    rows_.push_back({static_cast<const char*>(row0), channel_stride_bytes, channels, row_bytes / 64 + 1});
    lines_ += channels * (row_bytes / 64 + 1);
  }
  // The next ~1/steps of the lines.
  void step(int64_t steps) {
    int64_t n = lines_ / steps + 1;
    for (; n > 0 && next_ < rows_.size(); ++next_, channel_ = 0) {
      const Rows r = rows_[next_];
      for (; channel_ < r.channels && n > 0; ++channel_, n -= r.lines) {
        const char* p = r.row0 + channel_ * r.stride;
        p -= reinterpret_cast<uintptr_t>(p) & 63;
        for (int64_t l = 0; l < r.lines; ++l) prefetch_line<1>(p + l * 64);
      }
      if (channel_ < r.channels) break;
    }
  }
  void clear() { rows_.clear(), next_ = 0, channel_ = 0, lines_ = 0; }

 private:
  struct Rows {
    const char* row0;
    int64_t stride, channels, lines;
  };
  std::vector<Rows> rows_;
  size_t next_ = 0;
  int64_t channel_ = 0, lines_ = 0;
};

// The forward of rows [begin, end) of the (B, T, H) rows, computed in T (float32 for
// float16 and bfloat16), one or two query rows at a time (two where the dilation is 1 and the
// next row is of the same frame and range: they share K - 1 key rows, see score_rows). Query and
// key rows are copied (converted, padded) into the kernel's buffers, the key rows through a
// RowCache, so consecutive query rows of a frame share them and a frame's rows are read from
// memory about once. out is gathered from v (in T) in place: each channel's selected pixels lie
// in a window of 2 * reach + 1 contiguous rows.
template <typename scalar_t, typename T>
void forward_rows(Isa isa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& score, at::Tensor& index, const Window& w, const Extent& e, T scale, int64_t begin,
                  int64_t end) {
  const int64_t T_ = e.frames, C = e.channels, Cv = e.value_channels, H = w.height, W = w.width;
  const int K = w.kernel_size, r = K / 2, d = w.dilation;
  const int64_t reach = static_cast<int64_t>(r) * d;
  auto align = [](int64_t n) { return (n + kRowAlign - 1) / kRowAlign * kRowAlign; };
  const int64_t Wr = align(W), pad = align(std::max<int64_t>(reach < W ? reach : W, 1)), Ws = Wr + 2 * pad;
  // Per query row of a pair: its channels, running best and candidate.
  AlignedBuffer<T> qbuf(2 * C * Wr);
  std::vector<T> best(2 * Wr);
  std::vector<LaneIndex<T>> best_j(2 * Wr);
  RowCache<T> keys(K, d, C, Ws, pad);
  std::vector<int32_t> sel(W);
  // out's row in T, converted into out where out is not in T.
  std::vector<T> out_row(std::is_same_v<scalar_t, T> ? 0 : Cv * W);
  // How many query rows from `row` on are scored together.
  auto rows_at = [&](int64_t row) -> int { return d == 1 && row + 1 < end && row % H + 1 < H ? 2 : 1; };
  RowPrefetch ahead;
  for (int64_t row = begin, n = 0; row < end; row += n) {
    n = rows_at(row);
    const int64_t b = row / (T_ * H), t = row / H % T_, y = row % H, bt = b * T_ + t;
    // Key rows y - reach .. y + n - 1 + reach, every d-th.
    const int64_t first_key = y - reach, last_key = y + n - 1 + reach;
    const auto qf = frames_at<const scalar_t>(q, b), kf = frames_at<const scalar_t>(k, b),
               vf = frames_at<const T>(v, b);
    const auto of = frames_at<scalar_t>(out, b);
    ahead.clear();
    if (row + n < end) {
      const int64_t next = row + n, nn = rows_at(next);
      const int64_t nb = next / (T_ * H), nt = next / H % T_, ny = next % H, nbt = nb * T_ + nt;
      const auto nqf = frames_at<const scalar_t>(q, nb), nkf = frames_at<const scalar_t>(k, nb),
                 nvf = frames_at<const T>(v, nb);
      constexpr int64_t e_ = sizeof(scalar_t);
      ahead.add(&nqf.at(0, 0, ny * W), nqf.stride.channel * e_, C, nn * W * e_);
      for (int64_t cy = ny - reach; cy <= ny + nn - 1 + reach; cy += d) {
        const bool cached = nbt == bt && (cy - y) % d == 0 && cy >= first_key && cy <= last_key;
        if (cy < 0 || cy >= H || cached) continue;
        ahead.add(&nkf.at(nt, 0, cy * W), nkf.stride.channel * e_, C, W * e_);
        ahead.add(&nvf.at(nt, 0, cy * W), nvf.stride.channel * sizeof(T), Cv, W * sizeof(T));
      }
    }
    QueryRow<T> rows[2];
    for (int i = 0; i < n; ++i) {
      T* qrow = qbuf.data() + i * C * Wr;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* src = &qf.at(0, c, (y + i) * W);
        for (int64_t x = 0; x < W; ++x) qrow[c * Wr + x] = vsr_kernels::convert<T>(src[x]);
      }
      rows[i] = QueryRow<T>{qrow, 0, best.data() + i * Wr, best_j.data() + i * Wr};
      std::fill_n(rows[i].best_j, Wr, LaneIndex<T>(-1));
      std::fill_n(rows[i].best, Wr, T(0));
    }
    const int steps = K + static_cast<int>(n) - 1;
    for (int64_t cy = first_key; cy <= last_key; cy += d) {
      ahead.step(steps);
      const bool inside = cy >= 0 && cy < H;
      if (!inside && !w.zero_border) continue;
      // The query rows this key row is a candidate row of, in increasing y.
      QueryRow<T> targets[2];
      int m = 0;
      for (int i = 0; i < n; ++i)
        if (const int64_t jy = (cy - y - i) / d + r; jy >= 0 && jy < K) {
          targets[m] = rows[i];
          targets[m++].jy = static_cast<int>(jy);
        }
      const T* key = inside ? keys.fetch(kf, bt, t, cy, H, W) : keys.zeros();
      const RowArgs<T> a{Wr, key, keys.zeros(), Ws, C, W, Wr, K, d, scale, w.zero_border, inside};
      score_rows<T>(isa, a, targets, m);
    }
    for (int i = 0; i < n; ++i) {
      const int64_t yi = y + i;
      scalar_t* sc = score.data_ptr<scalar_t>() + bt * H * W + yi * W;
      int64_t* ix = index.data_ptr<int64_t>() + bt * H * W + yi * W;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t j = rows[i].best_j[x];
        // The selected value pixel, -1 for none or a zero-padded one (H * W < 2^31: checked).
        sel[x] = static_cast<int32_t>(j < 0 ? -1 : w.candidate_pixel(yi, x, static_cast<int>(j)));
        sc[x] = vsr_kernels::convert<scalar_t>(rows[i].best[x]);
        ix[x] = j;
      }
      // out = score * the selected value (0 for a zero-padded one, multiplied for real).
      if constexpr (std::is_same_v<scalar_t, T>) {
        select_values<T>(isa, SelectArgs<T>{rows[i].best, sel.data(), &vf.at(t, 0, 0), vf.stride.channel,
                                            &of.at(t, 0, yi * W), of.stride.channel, Cv, W});
      } else {
        select_values<T>(isa, SelectArgs<T>{rows[i].best, sel.data(), &vf.at(t, 0, 0), vf.stride.channel,
                                            out_row.data(), W, Cv, W});
        for (int64_t c = 0; c < Cv; ++c) {
          scalar_t* dst = &of.at(t, c, yi * W);
          for (int64_t x = 0; x < W; ++x) dst[x] = vsr_kernels::convert<scalar_t>(out_row[c * W + x]);
        }
      }
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
  // Rows of query and key are copied (converted, padded) into the kernel's buffers and out is
  // written row by row: channels-first inputs, unit pixel stride, no copies.
  // out's values are gathered in place, in the accumulation type: float16 and bfloat16 value
  // is converted once.
  const auto q = channels_first(query), k = channels_first(key);
  const Extent e = make_extent(key, value);
  check_int32_pixels(kForwardOp, key.size(3), key.size(4));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "local_argmax_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = channels_first(value.to(accumulation_dtype(query.scalar_type())));
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
// Everything runs channels-first, on the inputs' own unit-stride channel planes, in two phases:
// 1. per (b, t, band of rows), sel and g of each pixel (int32 and T maps, (B, T, H, W)), the
//    dot product channel by channel;
// 2. per (b, block of channels), for each band of query rows in increasing y, each channel c of
//    the block and each frame in increasing t: the gather of grad_query's band (AVX-512/AVX2
//    gathers for whole vectors), then one scalar pass scattering the band's terms into key
//    channel c's and value channel c's gradient planes (their rows zeroed just before the first
//    term they can receive: rows below the band's last row + reach). On this Zen 5 core the
//    vector gathers and scatters cost about as much per element as scalar accesses: see
//    benchmarks/NOTES.md, session 4.
// Where the ISA has them (float32 with AVX-512 or AVX2: tile_channels = 16 or 8 on AVX-512,
// chosen by the planes' stride, 8 on AVX2), both phases move each block of that many channels
// through channels-last tiles instead (local_argmax_attention_tiles.h): phase 1's value gathers,
// and phase 2 as one task per (b, block of channels that are key and value channels alike),
// frames outer, rows inner; the leftover channels take the kernels above. Same terms, same order.
// Each output element receives its terms in increasing p (and grad_query its frames in
// increasing t) whatever the number of threads: the same bits for any of them. A band's rows
// of every plane it touches (2 * reach + rows of a key or value plane) stay in L1/L2, and no
// access walks across channel planes a power of two apart.
// Pixels per band of phase 2 (the sel/g/score maps of a band over all frames stay in L2) and
// of phase 1 (smaller: more tasks to balance over the threads).
constexpr int64_t kBandPixels = 4096, kSelectionBandPixels = 2048;
// Channels per phase-2 task (of both the key and the value channels).
constexpr int64_t kChannelBlock = 8;

template <typename T>
void selection_grad(Isa isa, const SelectionArgs<T>& a) {
  VSR_CPU_ISA_CALL(isa, selection_grad, a);
}

template <typename T>
void key_band(Isa isa, const KeyBandArgs<T>& a) {
  VSR_CPU_ISA_CALL(isa, key_band, a);
}

template <typename T>
void value_band(Isa isa, const ValueBandArgs<T>& a) {
  VSR_CPU_ISA_CALL(isa, value_band, a);
}

// The tile width where the ISA has the tiled backward for T (float32 only) over channel planes
// of P pixels, else 0.
template <typename T>
int tile_channels(Isa isa, int64_t P) {
  if constexpr (std::is_same_v<T, float>)
    return VSR_CPU_ISA_CALL(isa, tile_channels, 0.0f, P * int64_t(sizeof(float)));
  else
    return 0;
}

// The backward in T (float or double) over contiguous (B, C, H, W) query, (B, T, C|Cv, H, W)
// key, value, grad_out and (B, T, H, W) grad_score, score, index, into contiguous gradients.
template <typename T>
void backward_planes(Isa isa, const Window& w, int64_t B, int64_t T_, int64_t C, int64_t Cv, const T* go,
                     const T* gs, const T* q, const T* k, const T* v, const T* sc, const int64_t* ix, T* grad_query,
                     T* grad_key, T* grad_value, T scale) {
  const int64_t H = w.height, W = w.width, P = H * W;
  const int64_t reach = static_cast<int64_t>(w.kernel_size / 2) * w.dilation;
  std::vector<int32_t> sel(B * T_ * P);
  std::vector<T> g(B * T_ * P);
  // The reach in pixels of a band's selections is band_reach * (W + 1) (capped: H + W covers the frame).
  const int64_t band_reach = std::min(reach, H + W);
  const int tile = tile_channels<T>(isa, P);
  const int64_t rows1 = std::max<int64_t>(1, std::min<int64_t>(H, kSelectionBandPixels / W)),
                bands1 = (H + rows1 - 1) / rows1;
  at::parallel_for(0, B * T_ * bands1, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(rows1 * W);
    // The tiles of the value pixels a band can select (see SelectionArgs).
    std::vector<T> window(tile ? std::min(P, rows1 * W + 2 * band_reach * (W + 1)) * tile : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / bands1, band = task % bands1;
      const int64_t o = bt * P;
      const SelectionArgs<T> a{ix + o, go + bt * Cv * P, v + bt * Cv * P, gs + o, P, sel.data() + o, g.data() + o,
                               acc.data(), window.data(), Cv, H, W, band * rows1 * W,
                               std::min(H, (band + 1) * rows1) * W, band_reach, w.kernel_size,
                               w.dilation, scale, tile};
      selection_grad<T>(isa, a);
    }
  });
  const int64_t band_rows = std::max<int64_t>(1, std::min<int64_t>(H, kBandPixels / W)),
                bands = (H + band_rows - 1) / band_rows;
  // Tasks per batch element: the tiles of channels that are key and value channels alike (where
  // the ISA has them, and there are enough of them to keep every thread busy: the blocks below
  // are half as wide), then blocks of the remaining channels. Either way the same bits.
  const int64_t tiles = tile && B * (std::min(C, Cv) / tile) >= at::get_num_threads() ? std::min(C, Cv) / tile : 0,
                tiled = tiles * tile;
  const int64_t blocks = (std::max(C, Cv) - tiled + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, B * (tiles + blocks), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (tiles + blocks), i = task % (tiles + blocks);
      if constexpr (std::is_same_v<T, float>)
        if (i < tiles) {
          const int64_t c = i * tile;
          VSR_CPU_ISA_CALL(isa, key_value_tiles,
                           TileArgs{sel.data() + b * T_ * P, g.data() + b * T_ * P, sc + b * T_ * P,
                                    q + (b * C + c) * P, go + (b * T_ * Cv + c) * P, k + (b * T_ * C + c) * P,
                                    grad_query + (b * C + c) * P, grad_key + (b * T_ * C + c) * P,
                                    grad_value + (b * T_ * Cv + c) * P, H, W, T_, reach, C * P, Cv * P, tile});
          continue;
        }
      const int64_t c0 = tiled + (i - tiles) * kChannelBlock;
      const int32_t* bsel = sel.data() + b * T_ * P;
      const T* bg = g.data() + b * T_ * P;
      int64_t zeroed = 0;  // rows of every gradient plane zeroed so far
      for (int64_t band = 0; band < bands; ++band) {
        const int64_t y0 = band * band_rows, y1 = std::min(H, y0 + band_rows);
        // The band's terms reach rows up to y1 - 1 + reach.
        const int64_t zero_until = reach >= H - y1 ? H : y1 + reach;
        auto value_args = [&](int64_t c) {
          return ValueBandArgs<T>{bsel, sc + b * T_ * P, go + (b * T_ * Cv + c) * P,
                                  grad_value + (b * T_ * Cv + c) * P, P, Cv * P, T_, y0 * W, y1 * W,
                                  zeroed * W, zero_until * W};
        };
        // Key channels [c, c + n), with as many value channels in the same pass or none.
        auto keys = [&](int64_t c, int64_t n, const ValueBandArgs<T>* value) {
          key_band<T>(isa, KeyBandArgs<T>{bsel, bg, q + (b * C + c) * P, grad_query + (b * C + c) * P,
                                          k + (b * T_ * C + c) * P, grad_key + (b * T_ * C + c) * P, P, W,
                                          band_reach, C * P, T_, y0 * W, y1 * W, zeroed * W,
                                          zero_until * W, n, value});
        };
        // The block's channels that are both key and value channels in one pass, then the
        // key-only or value-only rest.
        const int64_t c1 = c0 + kChannelBlock, both_end = std::max(c0, std::min({c1, C, Cv}));
        if (both_end > c0) {
          const ValueBandArgs<T> value = value_args(c0);
          keys(c0, both_end - c0, &value);
        }
        if (std::min(c1, C) > both_end) keys(both_end, std::min(c1, C) - both_end, nullptr);
        for (int64_t c = both_end; c < std::min(c1, Cv); ++c) value_band<T>(isa, value_args(c));
        zeroed = zero_until;
      }
    }
  });
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
  if (T == 0) return {at::zeros(query.sizes(), query.options()), at::zeros(key.sizes(), key.options()),
                      at::zeros(value.sizes(), value.options())};
  check_int32_pixels(kBackwardOp, H, W);
  const Isa isa = cpu::select_isa(kBackwardOp);
  const auto acc_dtype = accumulation_dtype(query.scalar_type());
  const auto acc_options = query.options().dtype(acc_dtype);
  auto grad_query = at::empty(query.sizes(), acc_options), grad_key = at::empty(key.sizes(), acc_options),
       grad_value = at::empty(value.sizes(), acc_options);
  for (const auto& g : {grad_query, grad_key, grad_value}) cpu::advise_huge_pages(g);
  // The kernels read contiguous planes in the accumulation type: float16 and bfloat16 inputs
  // are converted once (float32 and float64 ones are used in place when contiguous).
  auto in = [&](const at::Tensor& t) { return t.to(acc_dtype).contiguous(); };
  const auto go = in(grad_out), gs = in(grad_score), q = in(query), k = in(key), v = in(value), sc = in(score);
  const auto ix = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "local_argmax_attention_backward_cpu", [&] {
    backward_planes<scalar_t>(isa, w, B, T, C, Cv, go.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(),
                              q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              sc.data_ptr<scalar_t>(), ix.data_ptr<int64_t>(), grad_query.data_ptr<scalar_t>(),
                              grad_key.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
                              static_cast<scalar_t>(scale));
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
