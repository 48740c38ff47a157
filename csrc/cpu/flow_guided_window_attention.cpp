// CPU launchers of flow-guided window attention: at::parallel_for over rows of pixels.
// - float32 and float64 with w <= 3 (the common case): the per-ISA channels-first kernels
//   (forward_planes, backward_planes; flow_guided_window_attention_simd.h), vectorised across
//   the pixels of a row, reading the inputs where they lie (no layout copy).
// - float32 and float64 with w >= 4: the per-ISA row kernels over padded channels-last key
//   and value copies (forward_simd) and the generic backward below.
// - float16 and bfloat16: the shared per-pixel functions of kernels/flow_guided_window_attention.h
//   over channels-last copies, computed in float32 and rounded once to the input dtype.
//
// Backward, deterministic whatever the thread count:
//   1. per pixel (parallel over rows): probabilities recomputed from lse, dS, grad_query;
//      P and dS stored per (pixel, head, cell);
//   2. per batch element, a counting sort of the (pixel, cell) entries by the key position
//      they read (sequential, in increasing (pixel, cell) order);
//   3. per key position (parallel): grad_key and grad_value gathered from its entries in order;
//   4. bias gradients: per fixed chunk of kBiasChunk pixels (parallel) a partial sum in pixel
//      order, then the partials summed in chunk order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../glue/flow_guided_window_attention.h"
#include "flow_guided_window_attention_isa.h"
#include "isa.h"

namespace vsr_kernels {
namespace flow_guided_window_attention {
namespace {

constexpr int64_t kRowsPerTask = 2;
constexpr int64_t kBiasChunk = 1024;  // pixels per partial sum of the bias gradients (fixed: determinism)

#define VSR_DISPATCH_COORD(flow, ...)                          \
  [&] {                                                        \
    if ((flow).scalar_type() == at::kDouble) {                 \
      using coord_t = double;                                  \
      return __VA_ARGS__();                                    \
    } else {                                                   \
      using coord_t = float;                                   \
      return __VA_ARGS__();                                    \
    }                                                          \
  }()

// A (B, C, H, W) tensor as padded channels-last frames: (B, H, W, heads, Dp), channels
// d >= head_dim zero. Transposed here, a row of pixels per task in blocks of pixels (at::
// permute + contiguous transposes several times slower on this shape).
template <typename T>
at::Tensor padded_channels_last(const at::Tensor& t, int64_t heads, int64_t head_dim, int64_t padded_dim) {
  const int64_t B = t.size(0), H = t.size(2), W = t.size(3), Cp = heads * padded_dim;
  auto result = at::empty({B, H, W, Cp}, t.options());
  const auto src = channels_first(t);
  T* dst = result.mutable_data_ptr<T>();
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, B * H, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      const Frames<const T> s = frames_at<const T>(src, b);
      T* d = dst + row * W * Cp;
      const int64_t cs = s.stride.channel, ps = s.stride.pixel;
      const T* row_src = &s.at(0, 0, y * W);
      for (int64_t x0 = 0; x0 < W; x0 += kBlock) {
        const int64_t x1 = std::min(x0 + kBlock, W);
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t c = 0; c < head_dim; ++c) {
            const T* from = row_src + (h * head_dim + c) * cs;
            T* to = d + h * padded_dim + c;
            if (ps == 1) {
              for (int64_t x = x0; x < x1; ++x) to[x * Cp] = from[x];
            } else {
              for (int64_t x = x0; x < x1; ++x) to[x * Cp] = from[x * ps];
            }
          }
          for (int64_t c = head_dim; c < padded_dim; ++c)
            for (int64_t x = x0; x < x1; ++x) d[x * Cp + h * padded_dim + c] = T(0);
        }
      }
    }
  });
  return result;
}

// A (cells, C) bias padded to (cells, heads, Dp), or zeros where absent.
at::Tensor padded_bias(const at::Tensor& bias, int64_t cells, int64_t heads, int64_t head_dim, int64_t padded_dim,
                       const at::TensorOptions& options) {
  if (!bias.defined()) return at::zeros({cells, heads, padded_dim}, options);
  return at::constant_pad_nd(bias.reshape({cells, heads, head_dim}), {0, padded_dim - head_dim}).contiguous();
}

// The forward of float32 and float64 inputs: per-ISA row kernels
// (flow_guided_window_attention_simd.h) over padded channels-last key and value copies and
// padded row buffers of the query and out.
template <typename T, typename coord_t>
void forward_simd(cpu::Isa isa, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& coords, const at::Tensor& kb, const at::Tensor& vb, const Geometry& g,
                  double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = query.size(0), HW = g.pixels(), C = g.channels(), D = g.head_dim, cells = g.cells();
  constexpr int64_t L = kGranuleBytes / sizeof(T);
  const int64_t Dp = (D + L - 1) / L * L, Cp = g.heads * Dp;
  const auto qf = channels_first(query);
  const at::Tensor k = padded_channels_last<T>(key, g.heads, D, Dp), v = padded_channels_last<T>(value, g.heads, D, Dp);
  const bool biased = kb.defined() || vb.defined();
  at::Tensor kbp, vbp;
  if (biased) {
    kbp = padded_bias(kb, cells, g.heads, D, Dp, query.options());
    vbp = padded_bias(vb, cells, g.heads, D, Dp, query.options());
  }
  const coord_t* f = coords.const_data_ptr<coord_t>();
  T* lp = lse.mutable_data_ptr<T>();
  at::parallel_for(0, B * g.height, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<T> q_row(g.width * Cp, T(0)), out_row(g.width * Cp);
    std::vector<int64_t> cell(g.width * cells);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.height, y = row % g.height, p0 = y * g.width;
      const Frames<const T> qb = frames_at<const T>(qf, b);
      const Frames<T> ob = frames_at<T>(out, b);
      for (int64_t h = 0; h < g.heads; ++h)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t x = 0; x < g.width; ++x) q_row[x * Cp + h * Dp + d] = qb.at(0, h * D + d, p0 + x);
      for (int64_t x = 0; x < g.width; ++x) {
        const int64_t p = p0 + x;
        int64_t by, bx;
        if (window_base(g, p, f[(b * 2) * HW + p], f[(b * 2 + 1) * HW + p], &by, &bx)) {
          for (int n = 0; n < cells; ++n) cell[x * cells + n] = cell_pixel(g, by, bx, n);
        } else {
          cell[x * cells] = -1;
          for (int64_t c = 0; c < Cp; ++c) out_row[x * Cp + c] = std::numeric_limits<T>::quiet_NaN();
          for (int64_t h = 0; h < g.heads; ++h) lp[(b * g.heads + h) * HW + p] = std::numeric_limits<T>::quiet_NaN();
        }
      }
      RowArgs<T> a{q_row.data(), k.const_data_ptr<T>() + b * HW * Cp, v.const_data_ptr<T>() + b * HW * Cp,
                   biased ? kbp.const_data_ptr<T>() : nullptr, biased ? vbp.const_data_ptr<T>() : nullptr,
                   cell.data(), out_row.data(), lp + b * g.heads * HW + p0, HW, g.width, g.heads, Dp, cells,
                   static_cast<T>(scale)};
      VSR_CPU_ISA_CALL(isa, forward_row, a);
      for (int64_t h = 0; h < g.heads; ++h)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t x = 0; x < g.width; ++x) ob.at(0, h * D + d, p0 + x) = out_row[x * Cp + h * Dp + d];
    }
  });
  (void)C;
}

// Step 2 of the backward: per batch element, a counting sort of the (pixel, cell) entries
// e = p * cells + n by the key position they read (sequential, in increasing e); pixels with
// non-finite flow have no entries. offsets: B * (HW + 1) + 1, entries: B * HW * cells.
template <typename coord_t>
void sort_entries(const Geometry& g, const coord_t* f, int64_t B, std::vector<int64_t>& entries,
                  std::vector<int64_t>& offsets) {
  const int64_t HW = g.pixels();
  const int cells = g.cells();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* off = offsets.data() + b * (HW + 1);
      std::vector<int64_t> fill(HW, 0);
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t p = 0; p < HW; ++p) {
          int64_t by, bx;
          if (!window_base(g, p, f[(b * 2) * HW + p], f[(b * 2 + 1) * HW + p], &by, &bx)) continue;
          for (int n = 0; n < cells; ++n) {
            const int64_t t = cell_pixel(g, by, bx, n);
            if (pass == 0)
              ++fill[t];
            else
              entries[b * HW * cells + off[t] + fill[t]++] = p * cells + n;
          }
        }
        if (pass == 0) {
          off[0] = 0;
          for (int64_t t = 0; t < HW; ++t) off[t + 1] = off[t] + fill[t];
          std::fill(fill.begin(), fill.end(), 0);
        }
      }
    }
  });
}

// The int32 cell indices of row y of batch element b (cell[n * Wp + x]; 0 for pixels with
// non-finite flow, which are listed in `nonfinite`): window_base and cell_pixel of
// kernels/flow_guided_window_attention.h restated in loops the compiler vectorises (three
// integer divisions and two floor calls per pixel took ~15 % of the forward's instructions).
// The floor of the clamped coordinate c, |c| < 2^31: t = trunc(c), minus one where t > c,
// exactly std::floor. scratch: 3 * W int32.
template <typename coord_t>
void row_cells(const Geometry& g, const coord_t* f, int64_t b, int64_t y, int64_t Wp, int32_t* cell,
               int32_t* scratch, std::vector<int64_t>& nonfinite) {
  const int64_t HW = g.pixels(), W = g.width, H = g.height, p0 = y * W;
  const int w = g.window, lo = g.lo();
  const coord_t* fx = f + (b * 2) * HW + p0;
  const coord_t* fy = f + (b * 2 + 1) * HW + p0;
  int32_t* by = scratch;
  int32_t* bx = scratch + W;
  int32_t* ok = scratch + 2 * W;
  const coord_t lo_c = -static_cast<coord_t>(w + 1), hi_y = static_cast<coord_t>(H + w),
                hi_x = static_cast<coord_t>(W + w), yc = static_cast<coord_t>(y);
  int32_t all = 1;
  for (int64_t x = 0; x < W; ++x) {
    const coord_t dy = fy[x], dx = fx[x];
    const int32_t finite = (dy - dy == coord_t(0)) & (dx - dx == coord_t(0));
    coord_t cy = yc + dy, cx = static_cast<coord_t>(x) + dx;
    cy = cy < lo_c ? lo_c : (cy > hi_y ? hi_y : cy);
    cx = cx < lo_c ? lo_c : (cx > hi_x ? hi_x : cx);
    cy = finite ? cy : coord_t(0);
    cx = finite ? cx : coord_t(0);
    const int32_t ty = static_cast<int32_t>(cy), tx = static_cast<int32_t>(cx);
    by[x] = ty - (static_cast<coord_t>(ty) > cy);
    bx[x] = tx - (static_cast<coord_t>(tx) > cx);
    ok[x] = finite;
    all &= finite;
  }
  const int32_t h1 = static_cast<int32_t>(H - 1), w1 = static_cast<int32_t>(W - 1), w32 = static_cast<int32_t>(W);
  int32_t* to = cell;
  for (int a = 0; a < w; ++a) {
    for (int c = 0; c < w; ++c, to += Wp) {
      for (int64_t x = 0; x < W; ++x) {
        int32_t cy = by[x] + lo + a, cx = bx[x] + lo + c;
        cy = cy < 0 ? 0 : (cy > h1 ? h1 : cy);
        cx = cx < 0 ? 0 : (cx > w1 ? w1 : cx);
        to[x] = ok[x] ? cy * w32 + cx : 0;
      }
    }
  }
  nonfinite.clear();
  if (!all)
    for (int64_t x = 0; x < W; ++x)
      if (!ok[x]) nonfinite.push_back(x);
}

int plane_lanes(cpu::Isa isa, bool is_double) {
  return is_double ? VSR_CPU_ISA_CALL(isa, plane_lanes, 0.0) : VSR_CPU_ISA_CALL(isa, plane_lanes, 0.0f);
}

// The forward of float32 and float64 inputs with windows of at most kPlaneCells cells: the
// per-ISA channels-first row kernels (PlaneArgs in flow_guided_window_attention_isa.h) read
// query, key and value and write out where they lie; per row of pixels the launcher computes
// the int32 cell indices (rows padded to whole vectors) and writes the NaNs of pixels with
// non-finite flow after the kernel.
template <typename T, typename coord_t>
void forward_planes(cpu::Isa isa, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& coords, const at::Tensor& kb, const at::Tensor& vb, const Geometry& g,
                    double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = query.size(0), HW = g.pixels(), C = g.channels(), cells = g.cells(), W = g.width;
  const auto qf = channels_first(query), kf = channels_first(key), vf = channels_first(value);
  const bool biased = kb.defined() || vb.defined();
  at::Tensor kbz, vbz;  // both or neither: zeros for the absent one; (C, cells), a channel's cells adjacent
  if (biased) {
    kbz = (kb.defined() ? kb : at::zeros({cells, C}, query.options())).t().contiguous();
    vbz = (vb.defined() ? vb : at::zeros({cells, C}, query.options())).t().contiguous();
  }
  const int lanes = plane_lanes(isa, std::is_same_v<T, double>);
  const int64_t Wp = (W + lanes - 1) / lanes * lanes;
  const coord_t* f = coords.const_data_ptr<coord_t>();
  T* lp = lse.mutable_data_ptr<T>();
  constexpr T nan = std::numeric_limits<T>::quiet_NaN();
  at::parallel_for(0, B * g.height, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cell(cells * Wp, 0), scratch(3 * W);
    std::vector<int64_t> nonfinite;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.height, y = row % g.height, p0 = y * W;
      const Frames<const T> qb = frames_at<const T>(qf, b), kk = frames_at<const T>(kf, b),
                            vv = frames_at<const T>(vf, b);
      const Frames<T> ob = frames_at<T>(out, b);
      row_cells(g, f, b, y, Wp, cell.data(), scratch.data(), nonfinite);
      PlaneArgs<T> a{&qb.at(0, 0, p0), kk.data, vv.data, &ob.at(0, 0, p0),
                     {qb.stride.channel, kk.stride.channel, vv.stride.channel, ob.stride.channel},
                     biased ? kbz.const_data_ptr<T>() : nullptr, biased ? vbz.const_data_ptr<T>() : nullptr,
                     cell.data(), Wp, HW, lp + b * g.heads * HW + p0, HW, W, g.heads, g.head_dim, cells,
                     static_cast<T>(scale)};
      VSR_CPU_ISA_CALL(isa, forward_planes_row, a);
      for (const int64_t x : nonfinite) {
        for (int64_t c = 0; c < C; ++c) ob.at(0, c, p0 + x) = nan;
        for (int64_t h = 0; h < g.heads; ++h) lp[(b * g.heads + h) * HW + p0 + x] = nan;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value, const at::Tensor& flow, int64_t window_size,
                                               int64_t num_heads, const std::optional<at::Tensor>& key_bias,
                                               const std::optional<at::Tensor>& value_bias, double scale) {
  const Geometry g = check_inputs(kForwardOp, at::kCPU, query, key, value, flow, window_size, num_heads, key_bias,
                                  value_bias);
  const int64_t B = query.size(0), HW = g.pixels(), C = g.channels();
  auto out = at::empty(query.sizes(), query.options());
  auto lse = at::empty({B, g.heads, g.height, g.width}, query.options().dtype(lse_dtype(query)));
  if (out.numel() == 0) return {out, lse};
  if (query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble) {
    const cpu::Isa isa = cpu::select_isa(kForwardOp);
    const auto coords = coordinates(flow);
    const auto kb = bias_or_undefined(key_bias), vb = bias_or_undefined(value_bias);
    AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "flow_guided_window_attention_cpu", [&] {
      VSR_DISPATCH_COORD(coords, [&] {
        // int32 cell indices: frames below 2^31 pixels (always, in practice).
        if (g.cells() <= kPlaneCells && HW < (int64_t(1) << 31))
          forward_planes<scalar_t, coord_t>(isa, query, key, value, coords, kb, vb, g, scale, out, lse);
        else
          forward_simd<scalar_t, coord_t>(isa, query, key, value, coords, kb, vb, g, scale, out, lse);
      });
    });
    return {out, lse};
  }
  // float16 and bfloat16: the generic per-pixel functions.
  // Key and value are read at arbitrary cells: channels-last copies make each cell's C channels
  // one contiguous row. The query and out are read and written row by row through a small
  // transposed buffer (channels-last per row of pixels), so they need no copy.
  const auto qf = channels_first(query), k = channels_last(key), v = channels_last(value);
  const auto coords = coordinates(flow);
  const auto kb = bias_or_undefined(key_bias), vb = bias_or_undefined(value_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "flow_guided_window_attention_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    VSR_DISPATCH_COORD(coords, [&] {
      const coord_t* f = coords.const_data_ptr<coord_t>();
      const scalar_t* kbp = data_or_null<scalar_t>(kb);
      const scalar_t* vbp = data_or_null<scalar_t>(vb);
      acc_t* lp = lse.mutable_data_ptr<acc_t>();
      at::parallel_for(0, B * g.height, kRowsPerTask, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(C + 2 * g.heads);
        std::vector<scalar_t> q_row(g.width * C), out_row(g.width * C);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / g.height, y = row % g.height;
          const auto kk = channels_last_at<const scalar_t>(k, b), vv = channels_last_at<const scalar_t>(v, b);
          const Frames<const scalar_t> qb = frames_at<const scalar_t>(qf, b);
          const Frames<scalar_t> ob = frames_at<scalar_t>(out, b);
          const int64_t p0 = y * g.width;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t x = 0; x < g.width; ++x) q_row[x * C + c] = qb.at(0, c, p0 + x);
          for (int64_t x = 0; x < g.width; ++x) {
            const int64_t p = p0 + x;
            int64_t by, bx;
            if (window_base(g, p, f[(b * 2) * HW + p], f[(b * 2 + 1) * HW + p], &by, &bx)) {
              forward_pixel_rows<scalar_t, acc_t>(q_row.data() + x * C, kk.data, vv.data, kk.stride.pixel, kbp, vbp, g,
                                                  static_cast<acc_t>(scale), by, bx, scratch.data(),
                                                  scratch.data() + C, scratch.data() + C + g.heads,
                                                  out_row.data() + x * C, 1, lp + b * g.heads * HW + p, HW);
            } else {
              for (int64_t c = 0; c < C; ++c)
                out_row[x * C + c] = vsr_kernels::convert<scalar_t>(std::numeric_limits<float>::quiet_NaN());
              for (int64_t h = 0; h < g.heads; ++h)
                lp[(b * g.heads + h) * HW + p] = std::numeric_limits<acc_t>::quiet_NaN();
            }
          }
          for (int64_t c = 0; c < C; ++c)
            for (int64_t x = 0; x < g.width; ++x) ob.at(0, c, p0 + x) = out_row[x * C + c];
        }
      });
    });
  });
  (void)C;
  return {out, lse};
}

// Rows of a frame held channels-last in a ring of kRingRows rows: pixel p = y * W + x at slot
// y % kRingRows (the caller keeps the rows it reads there).
constexpr int64_t kRingRows = 16;
template <typename T>
struct RingRows {
  const T* data;
  int64_t width, channels;
  T at(int64_t, int64_t c, int64_t p) const {
    return data[((p / width) % kRingRows * width + p % width) * channels + c];
  }
};

// The backward of float32 and float64 inputs with windows of at most kPlaneCells cells, with
// no layout copy of any input: step 1 by the per-ISA channels-first row kernels
// (PlaneBackwardArgs), which write grad_query in place; steps 2-4 as in backward_cpu, reading
// grad_out and query channels-first (a source pixel's channels lie a plane apart; the
// entries of neighbouring key positions come from neighbouring pixels, so those lines stay
// in cache). Deterministic: every output element is written by one thread in a fixed order.
template <typename T, typename coord_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_planes(
    cpu::Isa isa, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& coords, const at::Tensor& lse, const at::Tensor& kb,
    const at::Tensor& vb, const Geometry& g, double scale) {
  const int64_t B = query.size(0), HW = g.pixels(), C = g.channels(), cells = g.cells(), W = g.width, D = g.head_dim;
  const auto gf = channels_first(grad_out), qf = channels_first(query), kf = channels_first(key),
             vf = channels_first(value);
  const auto ls = lse.contiguous();
  const bool biased = kb.defined() || vb.defined();
  at::Tensor kbz, vbz;  // both or neither: zeros for the absent one; (C, cells), a channel's cells adjacent
  if (biased) {
    kbz = (kb.defined() ? kb : at::zeros({cells, C}, query.options())).t().contiguous();
    vbz = (vb.defined() ? vb : at::zeros({cells, C}, query.options())).t().contiguous();
  }
  auto grad_query = at::empty(query.sizes(), query.options());
  auto prob = at::empty({B, HW, g.heads, cells}, query.options()), dscore = at::empty({B, HW, g.heads, cells}, query.options());
  const int lanes = plane_lanes(isa, std::is_same_v<T, double>);
  const int64_t Wp = (W + lanes - 1) / lanes * lanes;
  const coord_t* f = coords.const_data_ptr<coord_t>();
  const T* lp = ls.const_data_ptr<T>();
  T* pp = prob.mutable_data_ptr<T>();
  T* dp = dscore.mutable_data_ptr<T>();
  // 1. Per pixel, in groups of rows of at least kBiasChunk pixels (whole rows; fixed by the
  // shape, not the thread count): with biases, the kernel accumulates the bias gradients
  // lane-wise over a group's pixels, the lanes are then summed in order into the group's
  // partial, and the partials in group order below.
  const int64_t group_rows = std::max<int64_t>(1, (kBiasChunk + W - 1) / W);
  const int64_t groups_per_frame = (g.height + group_rows - 1) / group_rows, groups = B * groups_per_frame;
  std::vector<T> group_partial(biased ? groups * 2 * cells * C : 0, T(0));
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cell(cells * Wp, 0), live(Wp, 0), scratch(3 * W);
    std::vector<int64_t> nonfinite;
    std::vector<T> lanes_partial(biased ? 2 * cells * C * lanes : 0);
    for (int64_t group = begin; group < end; ++group) {
      const int64_t b = group / groups_per_frame, y0 = group % groups_per_frame * group_rows;
      std::fill(lanes_partial.begin(), lanes_partial.end(), T(0));
      for (int64_t y = y0; y < std::min(y0 + group_rows, g.height); ++y) {
        const int64_t p0 = y * W;
        const Frames<const T> gb = frames_at<const T>(gf, b), qb = frames_at<const T>(qf, b),
                              kk = frames_at<const T>(kf, b), vv = frames_at<const T>(vf, b);
        const Frames<T> ob = frames_at<T>(grad_query, b);
        row_cells(g, f, b, y, Wp, cell.data(), scratch.data(), nonfinite);
        std::fill(live.begin(), live.begin() + W, -1);
        for (const int64_t x : nonfinite) live[x] = 0;
        T* prow = pp + (b * HW + p0) * g.heads * cells;
        T* drow = dp + (b * HW + p0) * g.heads * cells;
        PlaneBackwardArgs<T> a{&gb.at(0, 0, p0), &qb.at(0, 0, p0), kk.data, vv.data, &ob.at(0, 0, p0),
                               {gb.stride.channel, qb.stride.channel, kk.stride.channel, vv.stride.channel,
                                ob.stride.channel},
                               biased ? kbz.const_data_ptr<T>() : nullptr, biased ? vbz.const_data_ptr<T>() : nullptr,
                               cell.data(), Wp, HW, lp + b * g.heads * HW + p0, HW, prow, drow, live.data(),
                               biased ? lanes_partial.data() : nullptr, W, g.heads, D, cells, static_cast<T>(scale)};
        VSR_CPU_ISA_CALL(isa, backward_planes_row, a);
        for (const int64_t x : nonfinite)
          for (int64_t c = 0; c < C; ++c) ob.at(0, c, p0 + x) = T(0);
      }
      if (biased) {
        T* part = group_partial.data() + group * 2 * cells * C;
        for (int64_t i = 0; i < 2 * cells * C; ++i) {
          T sum = 0;
          for (int j = 0; j < lanes; ++j) sum += lanes_partial[i * lanes + j];
          part[i] = sum;
        }
      }
    }
  });
  auto grad_key = at::empty(query.sizes(), query.options()), grad_value = at::empty(query.sizes(), query.options());
  std::vector<int64_t> entries(B * HW * cells), offsets(B * (HW + 1) + 1, 0);
  // 2. Counting sort of the entries by target.
  sort_entries(g, f, B, entries, offsets);
  // 3. Per key position, a row of positions at a time, into channels-last row buffers
  // stored transposed. The entries of a row of key positions come from the source rows their
  // flow points from: those rows of grad_out and query are transposed on demand into a
  // per-thread ring of kRingRows channels-last rows (row r in slot r % kRingRows), so the
  // gather reads contiguous channels; a row of key positions whose sources span more rows
  // than the ring reads the channels-first planes directly (same arithmetic, same order).
  at::parallel_for(0, B * g.height, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<T> gk_row(W * C), gv_row(W * C);
    std::vector<T> ring_q(kRingRows * W * C), ring_g(kRingRows * W * C);
    std::vector<int64_t> ring_row(kRingRows, -1);  // b * H + y held by each slot
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.height, y = row % g.height;
      const int64_t* off = offsets.data() + b * (HW + 1);
      const int64_t* ent = entries.data() + b * HW * cells;
      const Frames<const T> gb = frames_at<const T>(gf, b), qb = frames_at<const T>(qf, b);
      int64_t lo = g.height, hi = -1;
      for (int64_t i = off[y * W]; i < off[y * W + W]; ++i) {
        const int64_t r = ent[i] / cells / W;
        lo = std::min(lo, r);
        hi = std::max(hi, r);
      }
      const bool ringed = hi - lo < kRingRows;
      if (ringed) {
        for (int64_t r = lo; r <= hi; ++r) {
          const int64_t slot = r % kRingRows;
          if (ring_row[slot] == b * g.height + r) continue;
          ring_row[slot] = b * g.height + r;
          T* tq = ring_q.data() + slot * W * C;
          T* tg = ring_g.data() + slot * W * C;
          for (int64_t c = 0; c < C; ++c) {
            const T* sq = &qb.at(0, c, r * W);
            const T* sg = &gb.at(0, c, r * W);
            for (int64_t x = 0; x < W; ++x) {
              tq[x * C + c] = sq[x];
              tg[x * C + c] = sg[x];
            }
          }
        }
      }
      const RingRows<T> rq{ring_q.data(), W, C}, rg{ring_g.data(), W, C};
      for (int64_t x = 0; x < W; ++x) {
        const int64_t t = y * W + x;
        if (ringed)
          key_value_grad_target<T, T>(rg, rq, pp + b * HW * g.heads * cells, dp + b * HW * g.heads * cells, ent,
                                      off[t], off[t + 1], g, gk_row.data() + x * C, gv_row.data() + x * C, 1, 0, C);
        else
          key_value_grad_target<T, T>(gb, qb, pp + b * HW * g.heads * cells, dp + b * HW * g.heads * cells, ent,
                                      off[t], off[t + 1], g, gk_row.data() + x * C, gv_row.data() + x * C, 1, 0, C);
      }
      const Frames<T> ok = frames_at<T>(grad_key, b), ov = frames_at<T>(grad_value, b);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t x = 0; x < W; ++x) {
          ok.at(0, c, y * W + x) = gk_row[x * C + c];
          ov.at(0, c, y * W + x) = gv_row[x * C + c];
        }
    }
  });
  // 4. Bias gradients: the groups' partials (step 1) in group order.
  auto grad_key_bias = at::zeros({cells, C}, query.options()), grad_value_bias = at::zeros({cells, C}, query.options());
  if (biased) {
    T* dkb = grad_key_bias.mutable_data_ptr<T>();
    T* dvb = grad_value_bias.mutable_data_ptr<T>();
    for (int64_t group = 0; group < groups; ++group)
      for (int64_t i = 0; i < cells * C; ++i) {
        dkb[i] += group_partial[group * 2 * cells * C + i];
        dvb[i] += group_partial[group * 2 * cells * C + cells * C + i];
      }
  }
  return {grad_query, grad_key, grad_value, grad_key_bias, grad_value_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& flow, const at::Tensor& lse, int64_t window_size, int64_t num_heads,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& value_bias, double scale) {
  const Geometry g = check_inputs(kBackwardOp, at::kCPU, query, key, value, flow, window_size, num_heads, key_bias,
                                  value_bias);
  check_backward(at::kCPU, grad_out, query, lse, g);
  const auto dtype = query.scalar_type();
  const int64_t B = query.size(0), HW = g.pixels(), C = g.channels(), cells = g.cells();
  const auto acc_options = query.options().dtype(accumulation_dtype(dtype));
  const bool biased = key_bias.has_value() || value_bias.has_value();
  if (query.numel() == 0) {
    return {at::zeros_like(query, at::MemoryFormat::Contiguous), at::zeros_like(key, at::MemoryFormat::Contiguous),
            at::zeros_like(value, at::MemoryFormat::Contiguous), at::zeros({cells, C}, query.options()),
            at::zeros({cells, C}, query.options())};
  }
  if ((dtype == at::kFloat || dtype == at::kDouble) && cells <= kPlaneCells && HW < (int64_t(1) << 31)) {
    const cpu::Isa isa = cpu::select_isa(kBackwardOp);
    const auto coords = coordinates(flow);
    const auto kb = bias_or_undefined(key_bias), vb = bias_or_undefined(value_bias);
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
    AT_DISPATCH_FLOATING_TYPES(dtype, "flow_guided_window_attention_backward_cpu", [&] {
      VSR_DISPATCH_COORD(coords, [&] {
        result = backward_planes<scalar_t, coord_t>(isa, grad_out, query, key, value, coords, lse, kb, vb, g, scale);
      });
    });
    return result;
  }
  // Channels-last copies: key and value for the cells (released after step 1, before the key
  // and value gradients are allocated, to keep the peak low), grad_out and query for steps 1
  // and 3 (step 3 reads them at arbitrary source pixels).
  const auto go = channels_last(grad_out), q = channels_last(query);
  auto k = channels_last(key), v = channels_last(value);
  const auto coords = coordinates(flow);
  const auto kb = bias_or_undefined(key_bias), vb = bias_or_undefined(value_bias);
  const auto ls = lse.contiguous();
  // Gradients are accumulated per row of pixels in channels-last row buffers and stored
  // transposed into contiguous results of the input dtype: no layout copies on the way out.
  auto grad_query = at::empty(query.sizes(), query.options());
  at::Tensor grad_key, grad_value;
  auto prob = at::empty({B, HW, g.heads, cells}, acc_options), dscore = at::empty({B, HW, g.heads, cells}, acc_options);
  auto grad_key_bias = at::zeros({cells, C}, acc_options), grad_value_bias = at::zeros({cells, C}, acc_options);
  std::vector<int64_t> entries(B * HW * cells), offsets(B * (HW + 1) + 1, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "flow_guided_window_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    VSR_DISPATCH_COORD(coords, [&] {
      const coord_t* f = coords.const_data_ptr<coord_t>();
      const scalar_t* kbp = data_or_null<scalar_t>(kb);
      const scalar_t* vbp = data_or_null<scalar_t>(vb);
      const acc_t* lp = ls.const_data_ptr<acc_t>();
      acc_t* pp = prob.mutable_data_ptr<acc_t>();
      acc_t* dp = dscore.mutable_data_ptr<acc_t>();
      const acc_t s = static_cast<acc_t>(scale);
      auto in = [&](const at::Tensor& t, int64_t b) { return channels_last_at<const scalar_t>(t, b); };
      // Row y of batch element b of a (B, C, H, W) result from a channels-last row buffer.
      auto store_row = [&](at::Tensor& t, int64_t b, int64_t y, const acc_t* row) {
        const Frames<scalar_t> o = frames_at<scalar_t>(t, b);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t x = 0; x < g.width; ++x)
            o.at(0, c, y * g.width + x) = vsr_kernels::convert<scalar_t>(row[x * C + c]);
      };
      // 1. Per pixel.
      at::parallel_for(0, B * g.height, kRowsPerTask, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> gq_row(g.width * C), delta(g.heads);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / g.height, y = row % g.height;
          const auto gob = in(go, b), qb = in(q, b), kk = in(k, b), vv = in(v, b);
          for (int64_t x = 0; x < g.width; ++x) {
            const int64_t p = y * g.width + x;
            int64_t by, bx;
            const bool finite = window_base(g, p, f[(b * 2) * HW + p], f[(b * 2 + 1) * HW + p], &by, &bx);
            acc_t* pslot = pp + (b * HW + p) * g.heads * cells;
            acc_t* dslot = dp + (b * HW + p) * g.heads * cells;
            if (!finite) {
              for (int64_t c = 0; c < C; ++c) gq_row[x * C + c] = 0;
              for (int64_t i = 0; i < g.heads * cells; ++i) pslot[i] = dslot[i] = 0;
              continue;
            }
            backward_pixel_rows<scalar_t, acc_t>(&gob.at(0, 0, p), &qb.at(0, 0, p), kk.data, vv.data, kk.stride.pixel,
                                                 kbp, vbp, g, s, lp + b * g.heads * HW + p, HW, by, bx, pslot, dslot,
                                                 delta.data(), gq_row.data() + x * C);
          }
          store_row(grad_query, b, y, gq_row.data());
        }
      });
      k.reset();
      v.reset();
      grad_key = at::empty(query.sizes(), query.options());
      grad_value = at::empty(query.sizes(), query.options());
      // 2. Counting sort of the entries by target.
      sort_entries(g, f, B, entries, offsets);
      // 3. Per key position, a row of positions at a time.
      at::parallel_for(0, B * g.height, kRowsPerTask, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> gk_row(g.width * C), gv_row(g.width * C);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / g.height, y = row % g.height;
          const int64_t* off = offsets.data() + b * (HW + 1);
          for (int64_t x = 0; x < g.width; ++x) {
            const int64_t t = y * g.width + x;
            key_value_grad_target<scalar_t, acc_t>(in(go, b), in(q, b), pp + b * HW * g.heads * cells,
                                                   dp + b * HW * g.heads * cells, entries.data() + b * HW * cells,
                                                   off[t], off[t + 1], g, gk_row.data() + x * C,
                                                   gv_row.data() + x * C, 1, 0, C);
          }
          store_row(grad_key, b, y, gk_row.data());
          store_row(grad_value, b, y, gv_row.data());
        }
      });
      // 4. Bias gradients.
      if (!biased) return;
      const int64_t chunks = (B * HW + kBiasChunk - 1) / kBiasChunk;
      std::vector<acc_t> partial(chunks * 2 * cells * C, acc_t(0));
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          acc_t* dkb = partial.data() + chunk * 2 * cells * C;
          acc_t* dvb = dkb + cells * C;
          for (int64_t i = chunk * kBiasChunk; i < std::min((chunk + 1) * kBiasChunk, B * HW); ++i) {
            const int64_t b = i / HW, p = i % HW;
            const auto qb = in(q, b), gob = in(go, b);
            for (int64_t h = 0; h < g.heads; ++h) {
              const int64_t hc = h * g.head_dim;
              for (int n = 0; n < cells; ++n) {
                const int64_t slot = (i * g.heads + h) * cells + n;
                const acc_t ds = dp[slot], P = pp[slot];
                if (ds == 0 && P == 0) continue;  // a pixel with non-finite flow (or nothing to add)
                for (int64_t c = 0; c < g.head_dim; ++c) {
                  dkb[n * C + hc + c] += ds * vsr_kernels::convert<acc_t>(qb.at(0, hc + c, p));
                  dvb[n * C + hc + c] += P * vsr_kernels::convert<acc_t>(gob.at(0, hc + c, p));
                }
              }
            }
          }
        }
      });
      acc_t* dkb = grad_key_bias.mutable_data_ptr<acc_t>();
      acc_t* dvb = grad_value_bias.mutable_data_ptr<acc_t>();
      for (int64_t chunk = 0; chunk < chunks; ++chunk)
        for (int64_t i = 0; i < cells * C; ++i) {
          dkb[i] += partial[chunk * 2 * cells * C + i];
          dvb[i] += partial[chunk * 2 * cells * C + cells * C + i];
        }
    });
  });
  return {grad_query, grad_key, grad_value, to_contiguous(grad_key_bias, dtype), to_contiguous(grad_value_bias, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CPU, m) {
  m.impl("flow_guided_window_attention", &forward_cpu);
  m.impl("flow_guided_window_attention_backward", &backward_cpu);
}

}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
