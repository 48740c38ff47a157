// Flow-guided window attention (IART): the per-pixel arithmetic of the CPU launcher and the
// CUDA kernels. Both share the geometry (window_base, cell_pixel), the online-softmax step and
// the key/value gather (key_value_grad_target). The per-pixel forward and backward come in two
// forms with the same arithmetic per head: forward_head / backward_head (one head, any strides:
// the CUDA kernels, one thread per pixel and head) and forward_pixel_rows /
// backward_pixel_rows (all heads over channels-last rows, vectorisable: the CPU launcher).
// The CPU tests therefore exercise the geometry and the gather the GPU runs, but not
// forward_head / backward_head themselves (tests/test_flow_guided_window_attention.py runs
// them on CUDA tensors where a GPU is present).
//
// Semantics (see README and vsr_kernels/reference/flow_guided_window_attention.py): pixel
// p = (y, x) of batch element b has the coordinate (y + dy, x + dx), computed in coord_t
// (float32, float64 for float64 flow), clamped to [-(w + 1), H + w] x [-(w + 1), W + w] (which
// changes no clamped cell and keeps huge flows in integer range) and floored: base (by, bx).
// Cell n = (a - lo) * w + (c - lo), a, c in lo .. lo + w - 1, lo = -((w - 1) / 2), lies at
// (clamp(by + a, 0, H - 1), clamp(bx + c, 0, W - 1)). Per head h (channels [h D, (h + 1) D)):
//   s_n = scale * <q_h(p), k_h(cell n) + key_bias[n]_h>,  P = softmax_n(s),
//   out_h(p) = sum_n P_n (v_h(cell n) + value_bias[n]_h),  lse_h(p) = log sum_n exp(s_n).
// The forward is an online softmax over the cells; nothing per cell is stored. A pixel with
// non-finite flow reads nothing: out = NaN, lse = NaN, and it passes no gradient.
//
// Backward, per pixel and head (backward_head): P_n = exp(s_n - lse), dP_n = <g, v_n + vb_n>,
// delta = sum_n P_n dP_n (= <g, out>), dS_n = scale P_n (dP_n - delta),
// dq = sum_n dS_n (k_n + kb_n). dS_n and P_n are written to per-(pixel, head, cell) buffers,
// and the cell's key position to a per-(pixel, cell) target list. Key and value gradients
// are then gathered per key position (key_value_grad_target) from the (pixel, cell) entries
// that target it, in increasing (pixel, cell) order (a counting sort or a stable sort of the
// target list: deterministic, no atomics): dk += dS_n q, dv += P_n g. Bias gradients are
// sums over pixels in a fixed order (see the launchers).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/frames.h"
#include "../common/host_device.h"

namespace vsr_kernels {
namespace flow_guided_window_attention {

// window_size * window_size cells fit an int with room to spare, and so do their offsets.
constexpr int64_t kMaxWindowSize = 1024;
// The largest head_dim chunk the forward keeps in its accumulator (see forward_head).
constexpr int kCpuChunk = 64;

struct Geometry {
  int64_t height, width;
  int window;  // w in [1, kMaxWindowSize]
  int64_t heads, head_dim;

  VSR_HOST_DEVICE int64_t pixels() const { return height * width; }
  VSR_HOST_DEVICE int64_t channels() const { return heads * head_dim; }
  VSR_HOST_DEVICE int cells() const { return window * window; }
  VSR_HOST_DEVICE int lo() const { return -((window - 1) / 2); }
};

template <typename T>
VSR_HOST_DEVICE T floor_of(T v) {
#if defined(__CUDA_ARCH__)
  return floor(v);
#else
  return std::floor(v);
#endif
}

VSR_HOST_DEVICE float exp_of(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  return std::exp(v);
#endif
}
VSR_HOST_DEVICE double exp_of(double v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}
VSR_HOST_DEVICE float log_of(float v) {
#if defined(__CUDA_ARCH__)
  return logf(v);
#else
  return std::log(v);
#endif
}
VSR_HOST_DEVICE double log_of(double v) {
#if defined(__CUDA_ARCH__)
  return ::log(v);
#else
  return std::log(v);
#endif
}

template <typename T>
VSR_HOST_DEVICE T infinity() {
  return std::numeric_limits<T>::infinity();
}

// The floored, clamped coordinate y + d along a side of `size` pixels; false when d is not
// finite (then nothing is read for the pixel).
template <typename coord_t>
VSR_HOST_DEVICE bool base_coordinate(int64_t y, coord_t d, int64_t size, int window, int64_t* base) {
  if (!(d - d == coord_t(0))) return false;  // NaN or +-inf
  coord_t c = static_cast<coord_t>(y) + d;
  const coord_t lo = -static_cast<coord_t>(window + 1), hi = static_cast<coord_t>(size + window);
  c = c < lo ? lo : (c > hi ? hi : c);
  *base = static_cast<int64_t>(floor_of(c));
  return true;
}

// Base (by, bx) of pixel p from its flow (dx, dy); false for non-finite flow.
template <typename coord_t>
VSR_HOST_DEVICE bool window_base(const Geometry& g, int64_t p, coord_t dx, coord_t dy, int64_t* by, int64_t* bx) {
  const bool fy = base_coordinate(p / g.width, dy, g.height, g.window, by);
  const bool fx = base_coordinate(p % g.width, dx, g.width, g.window, bx);
  return fy && fx;
}

VSR_HOST_DEVICE int64_t clamp_index(int64_t v, int64_t size) { return v < 0 ? 0 : (v >= size ? size - 1 : v); }

// The pixel (y * W + x) of cell n of the window based at (by, bx).
VSR_HOST_DEVICE int64_t cell_pixel(const Geometry& g, int64_t by, int64_t bx, int n) {
  const int64_t cy = clamp_index(by + g.lo() + n / g.window, g.height);
  const int64_t cx = clamp_index(bx + g.lo() + n % g.window, g.width);
  return cy * g.width + cx;
}

// scale * <a[c0 .. c0 + D), pa>, b[c0 .. c0 + D), pb> + bias[c0 .. c0 + D)> (bias may be null), in
// four interleaved partial sums.
template <typename acc_t, typename scalar_t, typename InputA, typename InputB>
VSR_HOST_DEVICE acc_t biased_dot(InputA a, int64_t pa, InputB b, int64_t pb, const scalar_t* bias, int64_t c0,
                                 int64_t n) {
  acc_t part0 = 0, part1 = 0, part2 = 0, part3 = 0;
  const auto term = [&](int64_t c) {
    acc_t other = vsr_kernels::convert<acc_t>(b.at(0, c0 + c, pb));
    if (bias != nullptr) other += vsr_kernels::convert<acc_t>(bias[c0 + c]);
    return vsr_kernels::convert<acc_t>(a.at(0, c0 + c, pa)) * other;
  };
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    part0 += term(c);
    part1 += term(c + 1);
    part2 += term(c + 2);
    part3 += term(c + 3);
  }
  for (; c < n; ++c) part0 += term(c);
  return (part0 + part1) + (part2 + part3);
}

// One step of the online softmax: logit s joins the running maximum m and sum l; returns
// (via alpha and weight) the factor of the old accumulator and the weight of the new cell.
// A -inf logit weighs 0 (all -inf cells give 0 / 0 = NaN, as softmax does); NaN propagates.
template <typename acc_t>
VSR_HOST_DEVICE void online_step(acc_t s, acc_t& m, acc_t& l, acc_t& alpha, acc_t& weight) {
  const acc_t m_new = s > m ? s : m;
  alpha = m == m_new ? acc_t(1) : exp_of(m - m_new);
  weight = s == -infinity<acc_t>() ? acc_t(0) : exp_of(s - m_new);
  l = l * alpha + weight;
  m = m_new;
}

// Forward of head h at pixel p, window based at (by, bx): computes the logits over the whole
// head and accumulates channels [c0, c0 + kChunk) of the head (fewer at its end) in
// registers; writes them to out and returns lse. Q is the query view, KV the key/value views.
template <int kChunk, typename scalar_t, typename acc_t, typename Q, typename KV, typename Output>
VSR_HOST_DEVICE acc_t forward_head(Q query, KV key, KV value, const scalar_t* key_bias, const scalar_t* value_bias,
                                   Output out, const Geometry& g, acc_t scale, int64_t p, int64_t by, int64_t bx,
                                   int64_t h, int64_t c0) {
  const int64_t D = g.head_dim, hc = h * D, C = g.channels();
  const int64_t chunk = D - c0 < kChunk ? D - c0 : kChunk;
  acc_t acc[kChunk];
  for (int j = 0; j < kChunk; ++j) acc[j] = 0;
  acc_t m = -infinity<acc_t>(), l = 0;
  for (int n = 0; n < g.cells(); ++n) {
    const int64_t cell = cell_pixel(g, by, bx, n);
    const acc_t s =
        scale * biased_dot<acc_t>(query, p, key, cell, key_bias == nullptr ? key_bias : key_bias + n * C, hc, D);
    acc_t alpha, weight;
    online_step(s, m, l, alpha, weight);
    const int64_t vc = hc + c0;
    if (value_bias != nullptr) {
      const scalar_t* vb = value_bias + n * C + vc;
      for (int64_t j = 0; j < chunk; ++j)
        acc[j] = acc[j] * alpha +
                 weight * (vsr_kernels::convert<acc_t>(value.at(0, vc + j, cell)) + vsr_kernels::convert<acc_t>(vb[j]));
    } else {
      for (int64_t j = 0; j < chunk; ++j)
        acc[j] = acc[j] * alpha + weight * vsr_kernels::convert<acc_t>(value.at(0, vc + j, cell));
    }
  }
  const acc_t inv = acc_t(1) / l;
  for (int64_t j = 0; j < chunk; ++j) out.at(0, hc + c0 + j, p) = vsr_kernels::convert<scalar_t>(acc[j] * inv);
  return m + log_of(l);
}

// All heads of pixel p at once, for the CPU launcher: query, key and value are
// channels-last rows of C contiguous elements (q: this pixel's row; key, value: the frame,
// pixel stride `pixel`), so every loop over channels is a unit-stride loop the compiler
// vectorises; per-head quantities are spread over their channels (scratch arrays of C).
// The same arithmetic as forward_head per head: s_n = scale * sum over the head's channels of
// q (k + kb), the online softmax of online_step, acc = acc * alpha + weight (v + vb).
// scratch: 4 * C accumulators; m, l: heads. Writes out (channels-first, channel stride
// `out_channel`) and lse (stride `lse_head` between heads).
// q (k + kb) summed over n channels in kLanes interleaved partial sums (kb may be null): a
// fixed-width array of partials the compiler turns into vector registers.
constexpr int kLanes = 8;

template <typename acc_t, typename scalar_t>
inline acc_t row_dot(const scalar_t* q, const scalar_t* k, const scalar_t* kb, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t c = 0;
  if (kb != nullptr) {
    for (; c + kLanes <= n; c += kLanes)
      for (int j = 0; j < kLanes; ++j)
        part[j] += vsr_kernels::convert<acc_t>(q[c + j]) *
                   (vsr_kernels::convert<acc_t>(k[c + j]) + vsr_kernels::convert<acc_t>(kb[c + j]));
    for (; c < n; ++c)
      part[0] += vsr_kernels::convert<acc_t>(q[c]) * (vsr_kernels::convert<acc_t>(k[c]) + vsr_kernels::convert<acc_t>(kb[c]));
  } else {
    for (; c + kLanes <= n; c += kLanes)
      for (int j = 0; j < kLanes; ++j) part[j] += vsr_kernels::convert<acc_t>(q[c + j]) * vsr_kernels::convert<acc_t>(k[c + j]);
    for (; c < n; ++c) part[0] += vsr_kernels::convert<acc_t>(q[c]) * vsr_kernels::convert<acc_t>(k[c]);
  }
  acc_t total = 0;
  for (int j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

// All heads of pixel p at once, for the CPU launcher: q is this pixel's channels-last row of C
// elements, key and value channels-last frames (pixel stride `pixel`), so every loop over
// channels is a unit-stride loop the compiler vectorises. Per cell and head: s = scale *
// row_dot, online_step, acc = acc * alpha + weight (v + vb) over the head's channels.
// acc: C accumulators; m, l: heads. Writes out (channel stride `out_channel`) and lse (stride
// `lse_head` between heads).
template <typename scalar_t, typename acc_t>
inline void forward_pixel_rows(const scalar_t* q, const scalar_t* key, const scalar_t* value, int64_t pixel,
                               const scalar_t* key_bias, const scalar_t* value_bias, const Geometry& g, acc_t scale,
                               int64_t by, int64_t bx, acc_t* acc, acc_t* m, acc_t* l, scalar_t* out,
                               int64_t out_channel, acc_t* lse, int64_t lse_head) {
  const int64_t C = g.channels(), D = g.head_dim;
  for (int64_t c = 0; c < C; ++c) acc[c] = 0;
  for (int64_t h = 0; h < g.heads; ++h) {
    m[h] = -infinity<acc_t>();
    l[h] = 0;
  }
  for (int n = 0; n < g.cells(); ++n) {
    const int64_t cell = cell_pixel(g, by, bx, n);
    const scalar_t* k = key + cell * pixel;
    const scalar_t* v = value + cell * pixel;
    const scalar_t* kb = key_bias == nullptr ? nullptr : key_bias + n * C;
    const scalar_t* vb = value_bias == nullptr ? nullptr : value_bias + n * C;
    for (int64_t h = 0; h < g.heads; ++h) {
      const int64_t hc = h * D;
      const acc_t s = scale * row_dot<acc_t>(q + hc, k + hc, kb == nullptr ? kb : kb + hc, D);
      acc_t alpha, weight;
      online_step(s, m[h], l[h], alpha, weight);
      acc_t* a = acc + hc;
      if (vb != nullptr) {
        for (int64_t d = 0; d < D; ++d)
          a[d] = a[d] * alpha +
                 weight * (vsr_kernels::convert<acc_t>(v[hc + d]) + vsr_kernels::convert<acc_t>(vb[hc + d]));
      } else {
        for (int64_t d = 0; d < D; ++d) a[d] = a[d] * alpha + weight * vsr_kernels::convert<acc_t>(v[hc + d]);
      }
    }
  }
  for (int64_t h = 0; h < g.heads; ++h) {
    const acc_t inv = acc_t(1) / l[h];
    for (int64_t d = 0; d < D; ++d) out[(h * D + d) * out_channel] = vsr_kernels::convert<scalar_t>(acc[h * D + d] * inv);
    lse[h * lse_head] = m[h] + log_of(l[h]);
  }
}

// Backward of all heads of pixel p at once, for the CPU launcher (rows as in
// forward_pixel_rows; g and q are this pixel's channels-last rows of grad_out and query): the
// arithmetic of backward_head per head. prob and dscore: this pixel's (heads, cells) slots;
// lse: stride lse_head between heads; grad_query: this pixel's C accumulators.
template <typename scalar_t, typename acc_t>
inline void backward_pixel_rows(const scalar_t* g, const scalar_t* q, const scalar_t* key, const scalar_t* value,
                                int64_t pixel, const scalar_t* key_bias, const scalar_t* value_bias, const Geometry& geo,
                                acc_t scale, const acc_t* lse, int64_t lse_head, int64_t by, int64_t bx, acc_t* prob,
                                acc_t* dscore, acc_t* delta, acc_t* grad_query) {
  const int64_t C = geo.channels(), D = geo.head_dim;
  const int cells = geo.cells();
  for (int64_t h = 0; h < geo.heads; ++h) delta[h] = 0;
  for (int n = 0; n < cells; ++n) {
    const int64_t cell = cell_pixel(geo, by, bx, n);
    const scalar_t* k = key + cell * pixel;
    const scalar_t* v = value + cell * pixel;
    const scalar_t* kb = key_bias == nullptr ? nullptr : key_bias + n * C;
    const scalar_t* vb = value_bias == nullptr ? nullptr : value_bias + n * C;
    for (int64_t h = 0; h < geo.heads; ++h) {
      const int64_t hc = h * D;
      const acc_t s = scale * row_dot<acc_t>(q + hc, k + hc, kb == nullptr ? kb : kb + hc, D);
      const acc_t P = exp_of(s - lse[h * lse_head]);
      const acc_t dP = row_dot<acc_t>(g + hc, v + hc, vb == nullptr ? vb : vb + hc, D);
      prob[h * cells + n] = P;
      dscore[h * cells + n] = dP;
      delta[h] += P * dP;
    }
  }
  for (int64_t c = 0; c < C; ++c) grad_query[c] = 0;
  for (int n = 0; n < cells; ++n) {
    const int64_t cell = cell_pixel(geo, by, bx, n);
    const scalar_t* k = key + cell * pixel;
    const scalar_t* kb = key_bias == nullptr ? nullptr : key_bias + n * C;
    for (int64_t h = 0; h < geo.heads; ++h) {
      const int64_t hc = h * D;
      const acc_t ds = scale * prob[h * cells + n] * (dscore[h * cells + n] - delta[h]);
      dscore[h * cells + n] = ds;
      acc_t* gq = grad_query + hc;
      if (kb != nullptr) {
        for (int64_t d = 0; d < D; ++d)
          gq[d] += ds * (vsr_kernels::convert<acc_t>(k[hc + d]) + vsr_kernels::convert<acc_t>(kb[hc + d]));
      } else {
        for (int64_t d = 0; d < D; ++d) gq[d] += ds * vsr_kernels::convert<acc_t>(k[hc + d]);
      }
    }
  }
}

// The forward's output at a pixel with non-finite flow: NaN in channels [c0, c0 + n).
template <typename scalar_t, typename Output>
VSR_HOST_DEVICE void nan_pixel(Output out, int64_t p, int64_t c0, int64_t n) {
  for (int64_t c = 0; c < n; ++c)
    out.at(0, c0 + c, p) = vsr_kernels::convert<scalar_t>(std::numeric_limits<float>::quiet_NaN());
}

// Backward of head h at pixel p (finite flow, window based at (by, bx)): writes
// prob[n] = P_n and dscore[n] = dS_n (this pixel and head's cells slots) and
// grad_query's channels of head h at p (in the accumulation type).
template <typename scalar_t, typename acc_t, typename Input, typename Output>
VSR_HOST_DEVICE void backward_head(Input grad_out, Input query, Input key, Input value, const scalar_t* key_bias,
                                   const scalar_t* value_bias, Output grad_query, acc_t* prob, acc_t* dscore,
                                   const Geometry& g, acc_t scale, acc_t lse, int64_t p, int64_t by, int64_t bx,
                                   int64_t h) {
  const int64_t D = g.head_dim, hc = h * D, C = g.channels();
  acc_t delta = 0;
  for (int n = 0; n < g.cells(); ++n) {
    const int64_t cell = cell_pixel(g, by, bx, n);
    const acc_t s =
        scale * biased_dot<acc_t>(query, p, key, cell, key_bias == nullptr ? key_bias : key_bias + n * C, hc, D);
    const acc_t P = exp_of(s - lse);
    const acc_t dP =
        biased_dot<acc_t>(grad_out, p, value, cell, value_bias == nullptr ? value_bias : value_bias + n * C, hc, D);
    prob[n] = P;
    dscore[n] = dP;
    delta += P * dP;
  }
  for (int64_t c = 0; c < D; ++c) grad_query.at(0, hc + c, p) = 0;
  for (int n = 0; n < g.cells(); ++n) {
    const int64_t cell = cell_pixel(g, by, bx, n);
    const acc_t ds = scale * prob[n] * (dscore[n] - delta);
    dscore[n] = ds;
    if (key_bias != nullptr) {
      const scalar_t* kb = key_bias + n * C + hc;
      for (int64_t c = 0; c < D; ++c)
        grad_query.at(0, hc + c, p) +=
            ds * (vsr_kernels::convert<acc_t>(key.at(0, hc + c, cell)) + vsr_kernels::convert<acc_t>(kb[c]));
    } else {
      for (int64_t c = 0; c < D; ++c)
        grad_query.at(0, hc + c, p) += ds * vsr_kernels::convert<acc_t>(key.at(0, hc + c, cell));
    }
  }
}

// Gradients of key and value at one key position, channels [c0, c0 + n): gathered from the
// entries e = p * cells + cell of its segment of the sorted target list, in order.
// prob and dscore are this batch element's (pixels, heads, cells) buffers; grad_key and
// grad_value point at this position's channels c0 .. (accumulation type, unit stride = step).
template <typename scalar_t, typename acc_t, typename Input>
VSR_HOST_DEVICE void key_value_grad_target(Input grad_out, Input query, const acc_t* prob, const acc_t* dscore,
                                           const int64_t* entries, int64_t begin, int64_t end, const Geometry& g,
                                           acc_t* grad_key, acc_t* grad_value, int64_t step, int64_t c0, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    grad_key[c * step] = 0;
    grad_value[c * step] = 0;
  }
  const int cells = g.cells();
  for (int64_t i = begin; i < end; ++i) {
    const int64_t e = entries[i];
    const int64_t p = e / cells;
    const int cell = static_cast<int>(e % cells);
    int64_t c = 0;
    while (c < n) {
      const int64_t h = (c0 + c) / g.head_dim;
      const int64_t head_end = (h + 1) * g.head_dim - c0 < n ? (h + 1) * g.head_dim - c0 : n;
      const int64_t slot = (p * g.heads + h) * cells + cell;
      const acc_t ds = dscore[slot], P = prob[slot];
      for (; c < head_end; ++c) {
        grad_key[c * step] += ds * vsr_kernels::convert<acc_t>(query.at(0, c0 + c, p));
        grad_value[c * step] += P * vsr_kernels::convert<acc_t>(grad_out.at(0, c0 + c, p));
      }
    }
  }
}

}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
