// What the CPU launchers of deform_kernel_conv2d (depthwise deformable-kernel convolution)
// share: the forward's (deform_kernel_conv2d.cpp) and the backward's
// (deform_kernel_conv2d_backward.cpp) layouts, sampling taps and channel loops.
//
// Layout: the work runs channels-last. The input (and, in the backward, grad_out) is copied
// once into a buffer in the accumulation dtype, the input in a zero border (Padded), and every
// channel's kernel scope into a zero-padded, transposed (scope position, C) table. The
// sampling taps (the bilinear rule of common/bilinear.h, in a branch-free vectorised copy:
// sample_lanes) are built for 16 output positions of a row at a time, then applied to all
// channels of their group by unit-stride loops over the channels (vectors, no gathers),
// reading four neighbour rows of the scope table and four of the input buffer from one base
// each; a neighbour outside the input or the scope reads a zero of the border. Nothing of the
// size of the output times the taps is ever built.
// float16 and bfloat16 are computed in float32 and rounded once to the input dtype.
//
// Everything below the backward's declaration has internal linkage (an unnamed namespace): each
// launcher compiles the instruction-set copies of what it inlines. Two translation units, so that
// a build compiles the forward and the backward in parallel.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../glue/deform_kernel_conv2d.h"
#include "huge_pages.h"

namespace vsr_kernels {
namespace deform_kernel_conv2d {

// Defined in deform_kernel_conv2d_backward.cpp, registered in deform_kernel_conv2d.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& kernel_offset,
    const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation);

namespace {

// Tasks per thread chunk: at least about kMinWork (channel, tap, position) terms, so that a
// small call runs on the calling thread (waking a busy thread pool costs milliseconds).
constexpr int64_t kMinWork = int64_t(1) << 16;

int64_t grain(int64_t work_per_task) { return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_task)); }

// A plane in a zero border, channels-last: (rows + 2) lines of cols + 2 positions, then a zero
// tail of cols + 4 positions; element (y, x) at position (y + 1) row + x + 1. The neighbours of
// a point with floor (y0, x0), y0 in [-1, rows - 1], x0 in [-1, cols - 1], lie at positions
// base + {0, 1, row, row + 1}, base = (y0 + 1) row + x0 + 1, all inside; a neighbour outside
// the plane reads a zero of the border. `zero` is a base whose four neighbours are all zeros
// of the tail (a point that samples nothing). Used for every channel's kernel scope (the
// weight table), the channels-last input and the input gradient. With C channels a position,
// the launchers' channel loops (unit stride; __restrict lets the compiler vectorise them) read
// the neighbours of a base pointer b at b, b + C, b + row C and b + (row + 1) C.
struct Padded {
  int64_t row, size, zero;
  Padded(int64_t rows, int64_t cols) : row(cols + 2), size((rows + 2) * (cols + 2) + cols + 4), zero((rows + 2) * (cols + 2)) {}
  // The base of a sample built by sample_lane: (y0 + 1, x0 + 1), or y < 0 for none.
  int64_t base(int32_t y, int32_t x) const { return y < 0 ? zero : y * row + x; }
};

// The padded scopes of every channel, transposed: table[position * C + c], in acc_t.
template <typename acc_t, typename T>
std::vector<acc_t> scope_table(const Geometry& g, const Padded& L, const T* weight) {
  std::vector<acc_t> table(L.size * g.C, acc_t(0));
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t y = 0; y < g.Sh; ++y)
      for (int64_t x = 0; x < g.Sw; ++x)
        table[((y + 1) * L.row + x + 1) * g.C + c] = vsr_kernels::convert<acc_t>(weight[(c * g.Sh + y) * g.Sw + x]);
  return table;
}

// dst[b] = src[b] (B, C, H, W) channels-last in a zero border (layout L of an H x W plane), in
// acc_t; one task per (b, image row), which also zeroes its border (and the first and last
// rows' tasks the top and bottom borders and the tail).
template <typename acc_t, typename T>
void to_padded(const T* src, acc_t* dst, int64_t B, int64_t C, int64_t H, int64_t W, const Padded& L) {
  at::parallel_for(0, B * H, grain(W * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, y = task % H;
      acc_t* d_b = dst + b * L.size * C;
      acc_t* d = d_b + ((y + 1) * L.row + 1) * C;
      if (y == 0) std::fill(d_b, d_b + L.row * C, acc_t(0));
      if (y == H - 1) std::fill(d_b + (H + 1) * L.row * C, d_b + L.size * C, acc_t(0));
      std::fill(d - C, d, acc_t(0));
      std::fill(d + W * C, d + (W + 1) * C, acc_t(0));
      // Whole source rows (sequential reads the prefetcher follows; reading 16 pixels of every
      // channel at a time missed the cache on most loads), strided writes into the row's
      // W C elements (in L2).
      for (int64_t c = 0; c < C; ++c) {
        const T* s = src + ((b * C + c) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) d[x * C + c] = vsr_kernels::convert<acc_t>(s[x]);
      }
    }
  });
}

// dst[b, p, c] = src[b, c, p] in acc_t: (B, C, P) -> (B, P, C), in blocks of pixels.
template <typename acc_t, typename T>
void to_channels_last(const T* src, acc_t* dst, int64_t B, int64_t C, int64_t P) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks, grain(kBlock * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = task % blocks * kBlock, p1 = std::min(P, p0 + kBlock);
      for (int64_t c = 0; c < C; ++c) {
        const T* s = src + (b * C + c) * P;
        acc_t* d = dst + b * P * C + c;
        for (int64_t p = p0; p < p1; ++p) d[p * C] = vsr_kernels::convert<acc_t>(s[p]);
      }
    }
  });
}

// dst[b, c, y, x] = the interior of src[b] (layout L of an H x W plane, channels-last).
template <typename acc_t>
void from_padded(const acc_t* src, acc_t* dst, int64_t B, int64_t C, int64_t H, int64_t W, const Padded& L) {
  at::parallel_for(0, B * H, grain(W * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, y = task % H;
      const acc_t* s = src + (b * L.size + (y + 1) * L.row + 1) * C;
      for (int64_t c = 0; c < C; ++c) {
        acc_t* d = dst + ((b * C + c) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) d[x] = s[x * C + c];
      }
    }
  });
}

#if defined(__GNUC__)
#define VSR_ALWAYS_INLINE inline __attribute__((always_inline))
#define VSR_INLINE_LAMBDA __attribute__((always_inline))
#else
#define VSR_ALWAYS_INLINE inline
#define VSR_INLINE_LAMBDA
#endif

// The row loops run in a copy per instruction set, chosen once at load time by the dynamic
// linker (GCC's target_clones, an ifunc): AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) or the
// baseline. The loop bodies are always_inline lambdas, so each copy compiles them (and the
// helpers they inline) for its instruction set. Elsewhere: one copy.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VSR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VSR_CPU_CLONES
#endif

template <typename Body>
VSR_CPU_CLONES void run_tasks(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

// ---------------------------------------------------------------------------------------
// Sampling taps, built kSeg output positions at a time.
//
// The samples of one tap (kernel or input) at kSeg consecutive output positions of a row, as
// a structure of arrays, so that building them vectorises across the positions (one lane per
// position); the channel loops then read a position's bases and weights as scalars. The rule
// is common/bilinear.h's bilinear() (torchvision's), written without branches:
// - vy, vx: the value base (y0 + 1, x0 + 1) in a Padded plane where the point samples the
//   plane (strictly inside (-1, rows) x (-1, cols)), else vy = -1 (the zero base: a point on
//   the -1 edge has weights 0 but neighbours inside, which its value must not read, since
//   0 * NaN = NaN);
// - gy, gx: the same for the coordinate gradient: also on the -1 edge (one-sided derivative);
// - w: the bilinear weights (0 for a neighbour outside the plane or a point that samples
//   nothing), dy, dx: their coordinate derivatives (0 outside [-1, rows) x [-1, cols) or for
//   a neighbour outside the plane); poison: NaN for a NaN coordinate, else 0; mask: the
//   input's mask (1 without one; unused for the kernel).
constexpr int kSeg = 16;

template <typename acc_t>
struct Samples {
  alignas(64) int32_t vy[kSeg];
  alignas(64) int32_t vx[kSeg];
  alignas(64) int32_t gy[kSeg];
  alignas(64) int32_t gx[kSeg];
  alignas(64) acc_t w[4][kSeg];
  alignas(64) acc_t dy[4][kSeg];
  alignas(64) acc_t dx[4][kSeg];
  alignas(64) acc_t poison[kSeg];
  alignas(64) acc_t mask[kSeg];
};

#if defined(__GNUC__)
// GCC/Clang vector extensions: one vector of kSeg lanes (positions), lowered to the widest
// registers of each target_clones copy (one zmm of floats with AVX-512, two ymm with AVX2).
template <typename acc_t>
struct LaneVectors;
template <>
struct LaneVectors<float> {
  typedef float V __attribute__((vector_size(kSeg * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(kSeg * sizeof(int32_t))));
};
template <>
struct LaneVectors<double> {
  typedef double V __attribute__((vector_size(kSeg * sizeof(double))));
  typedef int64_t I __attribute__((vector_size(kSeg * sizeof(int64_t))));
};
typedef int32_t LaneInt32 __attribute__((vector_size(kSeg * sizeof(int32_t))));

template <typename Vec, typename Elem>
VSR_ALWAYS_INLINE Vec load_vec(const Elem* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename Vec, typename Elem>
VSR_ALWAYS_INLINE void store_vec(Elem* p, const Vec& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// sample_lane for all kSeg lanes at once, on vectors (the same rule and arithmetic; floor as
// the truncation minus one where it exceeds the coordinate, exact for the clamped coordinates).
template <bool kGrad, typename acc_t>
VSR_ALWAYS_INLINE void sample_lanes(Samples<acc_t>& s, const acc_t* ys, const acc_t* xs, acc_t rows, acc_t cols,
                                    int32_t rows1, int32_t cols1) {
  using V = typename LaneVectors<acc_t>::V;
  using I = typename LaneVectors<acc_t>::I;
  const V y = load_vec<V>(ys), x = load_vec<V>(xs);
  const V z = V{} , one = z + acc_t(1), minus_one = z - acc_t(1);
  const I inside = (y >= minus_one) & (y < rows) & (x >= minus_one) & (x < cols);
  const I sampled = inside & (y > minus_one) & (x > minus_one);
  const V poison_x = x != x ? x : z;
  store_vec(s.poison, y != y ? y : poison_x);
  const V yc = inside ? y : z, xc = inside ? x : z;
  const I ty = __builtin_convertvector(yc, I), tx = __builtin_convertvector(xc, I);
  const V ty_f = __builtin_convertvector(ty, V), tx_f = __builtin_convertvector(tx, V);
  const V fy = ty_f > yc ? ty_f - one : ty_f, fx = tx_f > xc ? tx_f - one : tx_f;
  const I y0 = __builtin_convertvector(fy, I), x0 = __builtin_convertvector(fx, I);
  const V ly = yc - fy, lx = xc - fx, hy = one - ly, hx = one - lx;
  const I oy0 = inside & (y0 >= 0), oy1 = inside & (y0 < I{} + rows1), ox0 = x0 >= 0, ox1 = x0 < I{} + cols1;
  const V w00 = hy * hx, w01 = hy * lx, w10 = ly * hx, w11 = ly * lx;
  store_vec(s.w[0], (sampled & oy0 & ox0) ? w00 : z);
  store_vec(s.w[1], (sampled & oy0 & ox1) ? w01 : z);
  store_vec(s.w[2], (sampled & oy1 & ox0) ? w10 : z);
  store_vec(s.w[3], (sampled & oy1 & ox1) ? w11 : z);
  const I none = I{} - 1;
  store_vec(s.vy, __builtin_convertvector(sampled ? y0 + 1 : none, LaneInt32));
  store_vec(s.vx, __builtin_convertvector(x0 + 1, LaneInt32));
  if (kGrad) {
    const I g00 = oy0 & ox0, g01 = oy0 & ox1, g10 = oy1 & ox0, g11 = oy1 & ox1;
    store_vec(s.dy[0], g00 ? -hx : z);
    store_vec(s.dy[1], g01 ? -lx : z);
    store_vec(s.dy[2], g10 ? hx : z);
    store_vec(s.dy[3], g11 ? lx : z);
    store_vec(s.dx[0], g00 ? -hy : z);
    store_vec(s.dx[1], g01 ? hy : z);
    store_vec(s.dx[2], g10 ? -ly : z);
    store_vec(s.dx[3], g11 ? ly : z);
    store_vec(s.gy, __builtin_convertvector(inside ? y0 + 1 : none, LaneInt32));
    store_vec(s.gx, __builtin_convertvector(x0 + 1, LaneInt32));
  }
}
#endif

// bilinear(y, x) of a rows x cols plane into lane l (rows1 = rows - 1, cols1 = cols - 1).
template <bool kGrad, typename acc_t>
VSR_ALWAYS_INLINE void sample_lane(Samples<acc_t>& s, int l, acc_t y, acc_t x, acc_t rows, acc_t cols, int32_t rows1,
                                   int32_t cols1) {
  const acc_t z = acc_t(0);
  // Branch-free (& rather than &&, selects of values computed anyway), so that the loops over
  // the lanes vectorise. NaN compares false everywhere: a NaN coordinate is outside (and poisons).
  const bool inside = (y >= acc_t(-1)) & (y < rows) & (x >= acc_t(-1)) & (x < cols);
  const bool sampled = inside & (y > acc_t(-1)) & (x > acc_t(-1));
  const acc_t poison_x = x != x ? x : z;
  s.poison[l] = y != y ? y : poison_x;
  const acc_t yc = inside ? y : z, xc = inside ? x : z;  // no conversion of a far or NaN point
  const acc_t fy = std::floor(yc), fx = std::floor(xc);
  const int32_t y0 = static_cast<int32_t>(fy), x0 = static_cast<int32_t>(fx);
  const acc_t ly = yc - fy, lx = xc - fx, hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  const bool oy0 = inside & (y0 >= 0), oy1 = inside & (y0 < rows1), ox0 = x0 >= 0, ox1 = x0 < cols1;
  const bool s00 = sampled & oy0 & ox0, s01 = sampled & oy0 & ox1, s10 = sampled & oy1 & ox0, s11 = sampled & oy1 & ox1;
  const acc_t w00 = hy * hx, w01 = hy * lx, w10 = ly * hx, w11 = ly * lx;
  s.w[0][l] = s00 ? w00 : z;
  s.w[1][l] = s01 ? w01 : z;
  s.w[2][l] = s10 ? w10 : z;
  s.w[3][l] = s11 ? w11 : z;
  s.vy[l] = sampled ? y0 + 1 : -1;
  s.vx[l] = x0 + 1;
  if (kGrad) {
    const bool g00 = oy0 & ox0, g01 = oy0 & ox1, g10 = oy1 & ox0, g11 = oy1 & ox1;
    s.dy[0][l] = g00 ? -hx : z;
    s.dy[1][l] = g01 ? -lx : z;
    s.dy[2][l] = g10 ? hx : z;
    s.dy[3][l] = g11 ? lx : z;
    s.dx[0][l] = g00 ? -hy : z;
    s.dx[1][l] = g01 ? hy : z;
    s.dx[2][l] = g10 ? -ly : z;
    s.dx[3][l] = g11 ? ly : z;
    s.gy[l] = inside ? y0 + 1 : -1;
    s.gx[l] = x0 + 1;
  }
}

// Every lane of s from the coordinates ys, xs (kSeg lanes each).
template <bool kGrad, typename acc_t>
VSR_ALWAYS_INLINE void sample_all(Samples<acc_t>& s, const acc_t* ys, const acc_t* xs, acc_t rows, acc_t cols,
                                  int32_t rows1, int32_t cols1) {
#if defined(__GNUC__)
  sample_lanes<kGrad>(s, ys, xs, rows, cols, rows1, cols1);
#else
  for (int l = 0; l < kSeg; ++l) sample_lane<kGrad>(s, l, ys[l], xs[l], rows, cols, rows1, cols1);
#endif
}

// The kernel-scope samples of tap (i, j) of kernel group gk at positions p0 .. p0 + len - 1.
template <bool kGrad, typename acc_t, typename T>
VSR_ALWAYS_INLINE void kernel_samples(Samples<acc_t>& s, const Geometry& g, const T* kernel_offset_b, int64_t gk,
                                      int64_t i, int64_t j, int64_t p0, int len) {
  const T* __restrict oy = kernel_offset_b + pair_channel(g, gk, i * g.kw + j) * g.positions() + p0;
  const T* __restrict ox = oy + g.positions();
  // kernel_point()'s centre (+ 0: the same bits), then + dky, + dkx.
  acc_t cy, cx;
  kernel_point(g, i, j, acc_t(0), acc_t(0), &cy, &cx);
  const acc_t rows = acc_t(g.Sh), cols = acc_t(g.Sw);
  const int32_t rows1 = static_cast<int32_t>(g.Sh - 1), cols1 = static_cast<int32_t>(g.Sw - 1);
  alignas(64) acc_t ys[kSeg], xs[kSeg];
  for (int l = 0; l < kSeg; ++l) {
    ys[l] = l < len ? cy + vsr_kernels::convert<acc_t>(oy[l]) : acc_t(0);
    xs[l] = l < len ? cx + vsr_kernels::convert<acc_t>(ox[l]) : acc_t(0);
  }
  sample_all<kGrad>(s, ys, xs, rows, cols, rows1, cols1);
}

// The input samples of tap (i, j) of offset group og at output row ho, columns wo0 ..
// wo0 + len - 1; grid_x_f[wo] = acc_t(grid_x(g, j, wo)). Without an offset: the grid pixel
// itself (weights 1, 0, 0, 0; the channel loops read only neighbour 0), or nothing.
template <bool kGrad, typename acc_t, typename T>
VSR_ALWAYS_INLINE void input_samples(Samples<acc_t>& s, const Geometry& g, const T* offset_b, const T* mask_b,
                                     int64_t og, int64_t i, int64_t j, int64_t ho, int64_t wo0, int len,
                                     const acc_t* grid_x_f) {
  const int64_t HoWo = g.positions(), p0 = ho * g.Wo + wo0, k = i * g.kw + j;
  if (mask_b == nullptr) {
    for (int l = 0; l < len; ++l) s.mask[l] = acc_t(1);
  } else {
    const T* __restrict m = mask_b + mask_channel(g, og, k) * HoWo + p0;
    for (int l = 0; l < len; ++l) s.mask[l] = vsr_kernels::convert<acc_t>(m[l]);
  }
  const int64_t gy = grid_y(g, i, ho);
  if (offset_b == nullptr) {
    const bool row_in = gy >= 0 && gy < g.H;
    for (int l = 0; l < len; ++l) {
      const int64_t gx = grid_x(g, j, wo0 + l);
      s.vy[l] = row_in && gx >= 0 && gx < g.W ? static_cast<int32_t>(gy + 1) : -1;
      s.vx[l] = static_cast<int32_t>(gx + 1);
      s.w[0][l] = acc_t(1);
      s.w[1][l] = s.w[2][l] = s.w[3][l] = s.poison[l] = acc_t(0);
    }
    return;
  }
  const T* __restrict oy = offset_b + pair_channel(g, og, k) * HoWo + p0;
  const T* __restrict ox = oy + HoWo;
  const acc_t gy_f = acc_t(gy), rows = acc_t(g.H), cols = acc_t(g.W);
  const int32_t rows1 = static_cast<int32_t>(g.H - 1), cols1 = static_cast<int32_t>(g.W - 1);
  const acc_t* __restrict gx_f = grid_x_f + j * g.Wo + wo0;
  alignas(64) acc_t ys[kSeg], xs[kSeg];
  for (int l = 0; l < kSeg; ++l) {
    ys[l] = l < len ? gy_f + vsr_kernels::convert<acc_t>(oy[l]) : acc_t(0);
    xs[l] = l < len ? gx_f[l] + vsr_kernels::convert<acc_t>(ox[l]) : acc_t(0);
  }
  sample_all<kGrad>(s, ys, xs, rows, cols, rows1, cols1);
}

// The per-tap inputs of batch element b: kernel offsets, input offsets and mask (null where absent).
template <typename T>
struct BatchTaps {
  const T* kernel_offset;
  const T* offset;
  const T* mask;
};

template <typename T>
BatchTaps<T> batch_taps(const Geometry& g, int64_t b, const T* kernel_offset, const T* offset, const T* mask) {
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), G = g.offset_groups;
  return {kernel_offset + b * 2 * g.kernel_groups * kk * HoWo,
          offset == nullptr ? nullptr : offset + b * 2 * G * kk * HoWo,
          mask == nullptr ? nullptr : mask + b * G * kk * HoWo};
}

// Every tap's kernel samples (ks[gk * kk + k]) and input samples (xs[og * kk + k]) of output
// row ho, columns wo0 .. wo0 + len - 1: what the forward and the backward's pass A build
// before their channel loops.
template <bool kGrad, typename acc_t, typename T>
VSR_ALWAYS_INLINE void segment_samples(std::vector<Samples<acc_t>>& ks, std::vector<Samples<acc_t>>& xs,
                                       const Geometry& g, const BatchTaps<T>& taps, int64_t ho, int64_t wo0, int len,
                                       const acc_t* grid_x_f) {
  const int64_t kk = g.kernel_points();
  for (int64_t i = 0, k = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j, ++k) {
      for (int64_t gk = 0; gk < g.kernel_groups; ++gk)
        kernel_samples<kGrad, acc_t>(ks[gk * kk + k], g, taps.kernel_offset, gk, i, j, ho * g.Wo + wo0, len);
      for (int64_t og = 0; og < g.offset_groups; ++og)
        input_samples<kGrad, acc_t>(xs[og * kk + k], g, taps.offset, taps.mask, og, i, j, ho, wo0, len, grid_x_f);
    }
}

// For output row ho, in runs of kSeg positions: every tap's samples into ks and xs
// (segment_samples), then body(wo0, len). The body must be an always-inline lambda
// (VSR_INLINE_LAMBDA), so that each instruction-set copy compiles it.
template <bool kGrad, typename acc_t, typename T, typename Body>
VSR_ALWAYS_INLINE void for_row_segments(std::vector<Samples<acc_t>>& ks, std::vector<Samples<acc_t>>& xs,
                                        const Geometry& g, const BatchTaps<T>& taps, int64_t ho,
                                        const acc_t* grid_x_f, const Body& body) {
  for (int64_t wo0 = 0; wo0 < g.Wo; wo0 += kSeg) {
    const int len = static_cast<int>(std::min<int64_t>(kSeg, g.Wo - wo0));
    segment_samples<kGrad, acc_t>(ks, xs, g, taps, ho, wo0, len, grid_x_f);
    body(wo0, len);
  }
}

// acc_t(grid_x(g, j, wo)) for every tap column j and output column wo: [j * Wo + wo].
template <typename acc_t>
std::vector<acc_t> grid_x_table(const Geometry& g) {
  std::vector<acc_t> t(g.kw * g.Wo);
  for (int64_t j = 0; j < g.kw; ++j)
    for (int64_t wo = 0; wo < g.Wo; ++wo) t[j * g.Wo + wo] = acc_t(grid_x(g, j, wo));
  return t;
}

// The channels that share one kernel group and one offset group: blocks of `block` channels.
int64_t common_block(const Geometry& g) {
  const int64_t cgk = g.kernel_group_channels(), cog = g.offset_group_channels();
  int64_t block = std::min(cgk, cog);
  while (cgk % block != 0 || cog % block != 0) --block;
  return block;
}

// The blocks of common_block channels: first channel, kernel group, offset group.
struct Block {
  int64_t c0, gk, og;
};

std::vector<Block> blocks_of(const Geometry& g) {
  const int64_t block = common_block(g);
  std::vector<Block> blocks;
  for (int64_t c0 = 0; c0 < g.C; c0 += block) blocks.push_back({c0, g.kernel_group_of(c0), g.offset_group_of(c0)});
  return blocks;
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace
}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
