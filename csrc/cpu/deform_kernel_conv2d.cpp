// CPU launchers of deform_kernel_conv2d (depthwise deformable-kernel convolution).
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
//
// Forward: one task per (batch element b, output row); a row's (Wo, C) accumulator stays in
// cache and is written out channels-first.
//
// Backward, deterministic without atomics, recomputing both samplings (nothing is stored per
// output position between forward and backward):
// - pass A, one task per (b, output row): the per-position reductions over channels: the
//   kernel-offset gradient (over the kernel group's channels), the input-offset and mask
//   gradients (over the offset group's channels). Each element is written by its row's task
//   only, after a sum over the channels in a fixed order (per-lane partial sums over blocks
//   of kLanes channels, then the lanes in order).
// - pass B, one task per (b, block of channels sharing a kernel group and an offset group):
//   the input gradient (a bilinear scatter into the block's channels of a channels-last
//   buffer, in fixed order (row, column, tap, neighbour)) and the per-(b, c) partials of the
//   weight (a scatter into the block's columns of the padded scope table) and bias
//   gradients; both are summed over b = 0, 1, ... at the end.
// So every gradient is bitwise identical run to run, whatever the number of threads.
// float16 and bfloat16 are computed in float32 and rounded once to the input dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../glue/deform_kernel_conv2d.h"
#include "huge_pages.h"

namespace vsr_kernels {
namespace deform_kernel_conv2d {
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
// weight table), the channels-last input and the input gradient.
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

// Every tap's kernel samples (ks[gk * kk + k]) and input samples (xs[og * kk + k]) of output
// row ho, columns wo0 .. wo0 + len - 1: what the forward and the backward's pass A build
// before their channel loops.
template <bool kGrad, typename acc_t, typename T>
VSR_ALWAYS_INLINE void segment_samples(std::vector<Samples<acc_t>>& ks, std::vector<Samples<acc_t>>& xs,
                                       const Geometry& g, const T* kernel_offset_b, const T* offset_b,
                                       const T* mask_b, int64_t ho, int64_t wo0, int len, const acc_t* grid_x_f) {
  const int64_t kk = g.kernel_points();
  for (int64_t i = 0, k = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j, ++k) {
      for (int64_t gk = 0; gk < g.kernel_groups; ++gk)
        kernel_samples<kGrad, acc_t>(ks[gk * kk + k], g, kernel_offset_b, gk, i, j, ho * g.Wo + wo0, len);
      for (int64_t og = 0; og < g.offset_groups; ++og)
        input_samples<kGrad, acc_t>(xs[og * kk + k], g, offset_b, mask_b, og, i, j, ho, wo0, len, grid_x_f);
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

// ---------------------------------------------------------------------------------------
// The channel loops (unit stride; __restrict lets the compiler vectorise them). The four
// neighbours of a base pointer b in a Padded plane of row stride `row` positions are
// b, b + C, b + row C, b + (row + 1) C (C: the channels of a position).

// acc[c] += (sum_n kw[n] s_n[c]) * (sum_n xw[n] x_n[c]) for c < n; without an input offset
// only x_0 is read (its weight xw[0], the others 0).
template <bool kDeformed, typename acc_t>
VSR_ALWAYS_INLINE void forward_channels(int64_t n, acc_t* __restrict acc, const acc_t* __restrict s0,
                                        const acc_t* __restrict s1, const acc_t* __restrict s2,
                                        const acc_t* __restrict s3, const acc_t* kw, const acc_t* __restrict x0,
                                        const acc_t* __restrict x1, const acc_t* __restrict x2,
                                        const acc_t* __restrict x3, const acc_t* xw) {
  const acc_t k0 = kw[0], k1 = kw[1], k2 = kw[2], k3 = kw[3];
  const acc_t w0 = xw[0], w1 = xw[1], w2 = xw[2], w3 = xw[3];
  if (kDeformed) {
    for (int64_t c = 0; c < n; ++c)
      acc[c] += (k0 * s0[c] + k1 * s1[c] + k2 * s2[c] + k3 * s3[c]) * (w0 * x0[c] + w1 * x1[c] + w2 * x2[c] + w3 * x3[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) acc[c] += (k0 * s0[c] + k1 * s1[c] + k2 * s2[c] + k3 * s3[c]) * (w0 * x0[c]);
  }
}

// out[c] = sum over the kk taps, in order, of (sum_n kw[4 k + n] s_n[c]) (sum_n xw[4 k + n] x_n[c])
// for c < n, where s_n, x_n are the neighbours of kernel base ks[k] + c0 (row stride sr
// positions) and input base xs[k] + c0 (row stride xr); without an input offset only x_0.
// The sums stay in registers across the taps (vectors of kVec channels, kGroup at a time).
template <bool kDeformed, typename acc_t>
VSR_ALWAYS_INLINE void forward_pixel(int64_t n, int64_t C, int64_t kk, int64_t c0, acc_t* __restrict out,
                                     const acc_t* const* ks, const acc_t* kw, int64_t sr, const acc_t* const* xs,
                                     const acc_t* xw, int64_t xr) {
  const int64_t s1 = C, s2 = sr * C, s3 = (sr + 1) * C, x1 = C, x2 = xr * C, x3 = (xr + 1) * C;
  int64_t c = 0;
#if defined(__GNUC__)
  constexpr int kVec = 64 / sizeof(acc_t), kGroup = 4;
  typedef acc_t V __attribute__((vector_size(64)));
  for (; c + kGroup * kVec <= n; c += kGroup * kVec) {
    V a[kGroup];
    for (int v = 0; v < kGroup; ++v) a[v] = V{};
    for (int64_t k = 0; k < kk; ++k) {
      const acc_t k0 = kw[4 * k], k1 = kw[4 * k + 1], k2 = kw[4 * k + 2], k3 = kw[4 * k + 3];
      const acc_t w0 = xw[4 * k], w1 = xw[4 * k + 1], w2 = xw[4 * k + 2], w3 = xw[4 * k + 3];
      const acc_t* s = ks[k] + c0 + c;
      const acc_t* x = xs[k] + c0 + c;
#pragma GCC unroll 4
      for (int v = 0; v < kGroup; ++v) {
        const int64_t o = v * kVec;
        const V sv = k0 * load_vec<V>(s + o) + k1 * load_vec<V>(s + o + s1) + k2 * load_vec<V>(s + o + s2) +
                     k3 * load_vec<V>(s + o + s3);
        const V xv = kDeformed ? w0 * load_vec<V>(x + o) + w1 * load_vec<V>(x + o + x1) + w2 * load_vec<V>(x + o + x2) +
                                     w3 * load_vec<V>(x + o + x3)
                               : w0 * load_vec<V>(x + o);
        a[v] += sv * xv;
      }
    }
    for (int v = 0; v < kGroup; ++v) store_vec(out + c + v * kVec, a[v]);
  }
#endif
  for (; c < n; ++c) {
    acc_t a = acc_t(0);
    for (int64_t k = 0; k < kk; ++k) {
      const acc_t* s = ks[k] + c0 + c;
      const acc_t* x = xs[k] + c0 + c;
      const acc_t* q = kw + 4 * k;
      const acc_t* w = xw + 4 * k;
      a += (q[0] * s[0] + q[1] * s[s1] + q[2] * s[s2] + q[3] * s[s3]) *
           (kDeformed ? w[0] * x[0] + w[1] * x[x1] + w[2] * x[x2] + w[3] * x[x3] : w[0] * x[0]);
    }
    out[c] = a;
  }
}

constexpr int kLanes = 16;

// The scalars of one (position, tap) sample: bases (already pointers) and weights.
template <typename acc_t>
struct Point {
  acc_t w[4], dy[4], dx[4], poison;
};

template <bool kGrad, typename acc_t>
VSR_ALWAYS_INLINE Point<acc_t> point_of(const Samples<acc_t>& s, int l) {
  Point<acc_t> q;
  for (int n = 0; n < 4; ++n) {
    q.w[n] = s.w[n][l];
    if (kGrad) {
      q.dy[n] = s.dy[n][l];
      q.dx[n] = s.dx[n][l];
    }
  }
  q.poison = s.poison[l];
  return q;
}

// Lanes summed pairwise in a fixed order (l and l + half, halving): deterministic.
template <typename acc_t>
VSR_ALWAYS_INLINE acc_t lane_sum(acc_t* a) {
  for (int half = kLanes / 2; half >= 1; half /= 2)
    for (int l = 0; l < half; ++l) a[l] += a[l + half];
  return a[0];
}

// Pass A's per-channel terms of one (position, tap), summed over c < n in per-lane partials
// (lane c % kLanes), then the lanes by lane_sum: sums[0..4] = (kernel-offset y, x; input-offset
// y, x; mask) gradients. v, s: the kernel scope's value and gradient bases (row stride sr
// positions); a, xg: the input's (row stride xr); C: channels per position.
template <bool kDeformed, typename acc_t>
VSR_ALWAYS_INLINE void point_grad_channels(int64_t n, int64_t C, const acc_t* __restrict go, const acc_t* __restrict v,
                                           const acc_t* __restrict s, int64_t sr, const Point<acc_t>& kt,
                                           const acc_t* __restrict a, const acc_t* __restrict xg, int64_t xr,
                                           const Point<acc_t>& xt, acc_t m, acc_t* sums) {
  acc_t L0[kLanes], L1[kLanes], L2[kLanes], L3[kLanes], L4[kLanes];
  for (int l = 0; l < kLanes; ++l) L0[l] = L1[l] = L2[l] = L3[l] = L4[l] = acc_t(0);
  const int64_t s1 = C, s2 = sr * C, s3 = (sr + 1) * C, x1 = C, x2 = xr * C, x3 = (xr + 1) * C;
  const acc_t kw0 = kt.w[0], kw1 = kt.w[1], kw2 = kt.w[2], kw3 = kt.w[3], kp = kt.poison;
  const acc_t ky0 = kt.dy[0], ky1 = kt.dy[1], ky2 = kt.dy[2], ky3 = kt.dy[3];
  const acc_t kx0 = kt.dx[0], kx1 = kt.dx[1], kx2 = kt.dx[2], kx3 = kt.dx[3];
  const acc_t xw0 = xt.w[0], xw1 = xt.w[1], xw2 = xt.w[2], xw3 = xt.w[3], xp = xt.poison;
  const acc_t xy0 = xt.dy[0], xy1 = xt.dy[1], xy2 = xt.dy[2], xy3 = xt.dy[3];
  const acc_t xx0 = xt.dx[0], xx1 = xt.dx[1], xx2 = xt.dx[2], xx3 = xt.dx[3];
  const auto term = [&](int64_t c, int l) VSR_INLINE_LAMBDA {
    const acc_t kv = kw0 * v[c] + kw1 * v[c + s1] + kw2 * v[c + s2] + kw3 * v[c + s3] + kp;
    const acc_t dky = ky0 * s[c] + ky1 * s[c + s1] + ky2 * s[c + s2] + ky3 * s[c + s3] + kp;
    const acc_t dkx = kx0 * s[c] + kx1 * s[c + s1] + kx2 * s[c + s2] + kx3 * s[c + s3] + kp;
    const acc_t xv = kDeformed ? xw0 * a[c] + xw1 * a[c + x1] + xw2 * a[c + x2] + xw3 * a[c + x3] + xp : xw0 * a[c] + xp;
    const TapGrad<acc_t> d = tap_grad(go[c], kv, m, xv);
    L0[l] += d.kernel * dky;
    L1[l] += d.kernel * dkx;
    L4[l] += d.mask;
    if (kDeformed) {
      const acc_t dy = xy0 * xg[c] + xy1 * xg[c + x1] + xy2 * xg[c + x2] + xy3 * xg[c + x3] + xp;
      const acc_t dx = xx0 * xg[c] + xx1 * xg[c + x1] + xx2 * xg[c + x2] + xx3 * xg[c + x3] + xp;
      L2[l] += d.input * dy;
      L3[l] += d.input * dx;
    }
  };
  int64_t c0 = 0;
  for (; c0 + kLanes <= n; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) term(c0 + l, l);
  for (int l = 0; c0 + l < n; ++l) term(c0 + l, l);
  sums[0] += lane_sum(L0);
  sums[1] += lane_sum(L1);
  if (kDeformed) {
    sums[2] += lane_sum(L2);
    sums[3] += lane_sum(L3);
  }
  sums[4] += lane_sum(L4);
}

// Pass B's scatter of one (position, tap) over the block's n channels: the scope gradient at
// the kernel sample's four neighbours (gs, row stride sr), the input gradient at the input
// sample's (gx, row stride xr; neighbour 0 only without an input offset). A point that samples
// nothing has the zero base: its scatter lands in the tail, which is never read back; a
// neighbour outside the plane lands in the border, likewise.
template <bool kDeformed, typename acc_t>
VSR_ALWAYS_INLINE void plane_grad_channels(int64_t n, int64_t C, const acc_t* __restrict go, const acc_t* v, acc_t* gs,
                                           int64_t sr, const Point<acc_t>& kt, const acc_t* a, acc_t* gx, int64_t xr,
                                           const Point<acc_t>& xt, acc_t m, acc_t* __restrict d_input,
                                           acc_t* __restrict d_kernel) {
  const int64_t s1 = C, s2 = sr * C, s3 = (sr + 1) * C, x1 = C, x2 = xr * C, x3 = (xr + 1) * C;
  {
    const acc_t* __restrict v_ = v;
    const acc_t* __restrict a_ = a;
    const acc_t kw0 = kt.w[0], kw1 = kt.w[1], kw2 = kt.w[2], kw3 = kt.w[3], kp = kt.poison;
    const acc_t xw0 = xt.w[0], xw1 = xt.w[1], xw2 = xt.w[2], xw3 = xt.w[3], xp = xt.poison;
    for (int64_t c = 0; c < n; ++c) {
      const acc_t kv = kw0 * v_[c] + kw1 * v_[c + s1] + kw2 * v_[c + s2] + kw3 * v_[c + s3] + kp;
      const acc_t xv =
          kDeformed ? xw0 * a_[c] + xw1 * a_[c + x1] + xw2 * a_[c + x2] + xw3 * a_[c + x3] + xp : xw0 * a_[c] + xp;
      const TapGrad<acc_t> d = tap_grad(go[c], kv, m, xv);
      d_input[c] = d.input;
      d_kernel[c] = d.kernel;
    }
  }
  const int64_t srel[4] = {0, s1, s2, s3}, xrel[4] = {0, x1, x2, x3};
  for (int nb = 0; nb < 4; ++nb) {
    acc_t* __restrict dst = gs + srel[nb];
    const acc_t w = kt.w[nb];
    for (int64_t c = 0; c < n; ++c) dst[c] += d_kernel[c] * w;
  }
  for (int nb = 0; nb < (kDeformed ? 4 : 1); ++nb) {
    acc_t* __restrict dst = gx + xrel[nb];
    const acc_t w = xt.w[nb];
    for (int64_t c = 0; c < n; ++c) dst[c] += d_input[c] * w;
  }
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

// ---------------------------------------------------------------------------------------
// Forward.

template <bool kDeformed, typename scalar_t>
at::Tensor forward_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                        const at::Tensor& kernel_offset, const at::Tensor& offset, const at::Tensor& mask,
                        const at::Tensor& bias) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, input.options());
  if (out.numel() == 0) return out;
  cpu::advise_huge_pages(out);
  const Padded SL(g.Sh, g.Sw), XL(g.H, g.W);
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), Wo = g.Wo, C = g.C;
  const int64_t G = g.offset_groups, Gk = g.kernel_groups, block = common_block(g);
  const std::vector<acc_t> table = scope_table<acc_t>(g, SL, weight.const_data_ptr<scalar_t>());
  const std::vector<acc_t> grid_x_f = grid_x_table<acc_t>(g);
  const std::vector<Block> blocks = blocks_of(g);
  // Uninitialised (a std::vector would zero it first: one more pass over memory).
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor x_buffer = at::empty({g.B * XL.size * C}, acc_options);
  cpu::advise_huge_pages(x_buffer);
  acc_t* x_pad = x_buffer.mutable_data_ptr<acc_t>();
  to_padded(input.const_data_ptr<scalar_t>(), x_pad, g.B, C, g.H, g.W, XL);
  const scalar_t* ko = kernel_offset.const_data_ptr<scalar_t>();
  const scalar_t* off = offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* msk = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bi = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t sr = SL.row, xr = XL.row;
  const auto rows = [&](int64_t begin, int64_t end) VSR_INLINE_LAMBDA {
    std::vector<acc_t> acc(Wo * C);
    std::vector<Samples<acc_t>> ks(Gk * kk), xs(G * kk);
    std::vector<acc_t> kweights(Gk * kk * 4), xweights(G * kk * 4);
    std::vector<const acc_t*> kbase(Gk * kk), xbase(G * kk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.Ho, ho = task % g.Ho;
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      const acc_t* x_b = x_pad + b * XL.size * C;
      for (int64_t wo0 = 0; wo0 < Wo; wo0 += kSeg) {
        const int len = static_cast<int>(std::min<int64_t>(kSeg, Wo - wo0));
        segment_samples<false, acc_t>(ks, xs, g, ko_b, off_b, msk_b, ho, wo0, len, grid_x_f.data());
        for (int l = 0; l < len; ++l) {
          for (int64_t q = 0; q < Gk * kk; ++q) {
            const Samples<acc_t>& t = ks[q];
            kbase[q] = table.data() + SL.base(t.vy[l], t.vx[l]) * C;
            for (int n = 0; n < 4; ++n) kweights[q * 4 + n] = t.w[n][l] + t.poison[l];
          }
          for (int64_t q = 0; q < G * kk; ++q) {
            const Samples<acc_t>& t = xs[q];
            xbase[q] = x_b + XL.base(t.vy[l], t.vx[l]) * C;
            // The mask and the poison (NaN for a NaN coordinate) folded into the weights.
            for (int n = 0; n < 4; ++n)
              xweights[q * 4 + n] = t.mask[l] * (kDeformed || n == 0 ? t.w[n][l] : acc_t(0)) + t.poison[l];
          }
          acc_t* acc_q = acc.data() + (wo0 + l) * C;
          for (const Block& bk : blocks)
            forward_pixel<kDeformed>(block, C, kk, bk.c0, acc_q + bk.c0, kbase.data() + bk.gk * kk,
                                     kweights.data() + bk.gk * kk * 4, sr, xbase.data() + bk.og * kk,
                                     xweights.data() + bk.og * kk * 4, xr);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t add = bi == nullptr ? acc_t(0) : vsr_kernels::convert<acc_t>(bi[c]);
        scalar_t* dst = o + ((b * C + c) * g.Ho + ho) * Wo;
        for (int64_t wo = 0; wo < Wo; ++wo) dst[wo] = static_cast<scalar_t>(acc[wo * C + c] + add);
      }
    }
  };
  at::parallel_for(0, g.B * g.Ho, grain(C * kk * Wo),
                   [&](int64_t begin, int64_t end) { run_tasks(rows, begin, end); });
  return out;
}

// ---------------------------------------------------------------------------------------
// Backward.

template <bool kDeformed, typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Geometry& g, const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& kernel_offset, const at::Tensor& offset, const at::Tensor& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), Wo = g.Wo, C = g.C;
  const int64_t G = g.offset_groups, Gk = g.kernel_groups, block = common_block(g);
  const bool masked = mask.defined();
  // Every element of these is written below (no zeroing pass).
  at::Tensor grad_input = at::empty({g.B, C, g.H, g.W}, acc_options);
  at::Tensor grad_kernel_offset = at::empty({g.B, 2 * Gk * kk, g.Ho, g.Wo}, acc_options);
  at::Tensor grad_offset = kDeformed ? at::empty({g.B, 2 * G * kk, g.Ho, g.Wo}, acc_options) : at::zeros({0}, acc_options);
  at::Tensor grad_mask = masked ? at::empty({g.B, G * kk, g.Ho, g.Wo}, acc_options) : at::zeros({0}, acc_options);
  at::Tensor grad_weight = at::empty({C, 1, g.Sh, g.Sw}, acc_options);
  at::Tensor grad_bias = at::empty({C}, acc_options);
  for (const at::Tensor& t : {grad_input, grad_kernel_offset, grad_offset, grad_mask}) cpu::advise_huge_pages(t);
  if (g.B == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_kernel_offset, grad_offset, grad_mask, grad_bias};
  }

  const Padded SL(g.Sh, g.Sw), XL(g.H, g.W);
  const int64_t sr = SL.row, xr = XL.row;
  const std::vector<acc_t> table = scope_table<acc_t>(g, SL, weight.const_data_ptr<scalar_t>());
  const std::vector<acc_t> grid_x_f = grid_x_table<acc_t>(g);
  const std::vector<Block> blocks = blocks_of(g);
  const at::Tensor x_buffer = at::empty({g.B * XL.size * C}, acc_options);
  const at::Tensor go_cl_buffer = at::empty({g.B * HoWo * C}, acc_options);
  cpu::advise_huge_pages(x_buffer);
  cpu::advise_huge_pages(go_cl_buffer);
  acc_t* x_pad = x_buffer.mutable_data_ptr<acc_t>();
  acc_t* go_cl = go_cl_buffer.mutable_data_ptr<acc_t>();
  to_padded(input.const_data_ptr<scalar_t>(), x_pad, g.B, C, g.H, g.W, XL);
  to_channels_last(grad_out.const_data_ptr<scalar_t>(), go_cl, g.B, C, HoWo);
  const scalar_t* ko = kernel_offset.const_data_ptr<scalar_t>();
  const scalar_t* off = kDeformed ? offset.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* msk = masked ? mask.const_data_ptr<scalar_t>() : nullptr;

  // Pass A: kernel-offset, offset and mask gradients, one task per (b, output row).
  acc_t* gko = grad_kernel_offset.mutable_data_ptr<acc_t>();
  acc_t* goff = kDeformed ? grad_offset.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* gmsk = masked ? grad_mask.mutable_data_ptr<acc_t>() : nullptr;
  const auto point_rows = [&](int64_t begin, int64_t end) VSR_INLINE_LAMBDA {
    std::vector<Samples<acc_t>> ks(Gk * kk), xs(G * kk);
    std::vector<acc_t> ksums(Gk * 2), xsums(G * 3);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.Ho, ho = task % g.Ho;
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      const acc_t* x_b = x_pad + b * XL.size * C;
      for (int64_t wo0 = 0; wo0 < Wo; wo0 += kSeg) {
        const int len = static_cast<int>(std::min<int64_t>(kSeg, Wo - wo0));
        segment_samples<true, acc_t>(ks, xs, g, ko_b, off_b, msk_b, ho, wo0, len, grid_x_f.data());
        for (int l = 0; l < len; ++l) {
          const int64_t p = ho * Wo + wo0 + l;
          const acc_t* go = go_cl + (b * HoWo + p) * C;
          for (int64_t k = 0; k < kk; ++k) {
            std::fill(ksums.begin(), ksums.end(), acc_t(0));
            std::fill(xsums.begin(), xsums.end(), acc_t(0));
            for (const Block& bk : blocks) {
              const int64_t c0 = bk.c0, gk = bk.gk, og = bk.og;
              const Samples<acc_t>& K = ks[gk * kk + k];
              const Samples<acc_t>& X = xs[og * kk + k];
              const acc_t* v = table.data() + SL.base(K.vy[l], K.vx[l]) * C + c0;
              const acc_t* s = table.data() + SL.base(K.gy[l], K.gx[l]) * C + c0;
              const acc_t* a = x_b + XL.base(X.vy[l], X.vx[l]) * C + c0;
              const acc_t* xg = kDeformed ? x_b + XL.base(X.gy[l], X.gx[l]) * C + c0 : a;
              acc_t sums[5] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
              point_grad_channels<kDeformed>(block, C, go + c0, v, s, sr, point_of<true>(K, l), a, xg, xr,
                                             point_of<kDeformed>(X, l), X.mask[l], sums);
              ksums[gk * 2] += sums[0];
              ksums[gk * 2 + 1] += sums[1];
              xsums[og * 3] += sums[2];
              xsums[og * 3 + 1] += sums[3];
              xsums[og * 3 + 2] += sums[4];
            }
            for (int64_t gk = 0; gk < Gk; ++gk) {
              acc_t* o = gko + (b * 2 * Gk * kk + pair_channel(g, gk, k)) * HoWo + p;
              o[0] = ksums[gk * 2];
              o[HoWo] = ksums[gk * 2 + 1];
            }
            for (int64_t og = 0; og < G; ++og) {
              if (kDeformed) {
                acc_t* o = goff + (b * 2 * G * kk + pair_channel(g, og, k)) * HoWo + p;
                o[0] = xsums[og * 3];
                o[HoWo] = xsums[og * 3 + 1];
              }
              if (gmsk != nullptr) gmsk[(b * G * kk + mask_channel(g, og, k)) * HoWo + p] = xsums[og * 3 + 2];
            }
          }
        }
      }
    }
  };
  at::parallel_for(0, g.B * g.Ho, grain(C * kk * Wo),
                   [&](int64_t begin, int64_t end) { run_tasks(point_rows, begin, end); });

  // Pass B: input gradient and the per-(b, c) weight and bias partials, one task per (b, chunk
  // of a block of channels in one kernel group and one offset group).
  // A chunk's taps are rebuilt for each chunk: chunks as large as the threads allow. The
  // chunking changes no result (every channel's arithmetic is its own).
  const int64_t per_thread = (C + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t chunk = std::min<int64_t>(block, std::max<int64_t>(kLanes, (per_thread + kLanes - 1) / kLanes * kLanes));
  const int64_t per_block = (block + chunk - 1) / chunk, chunks = C / block * per_block;
  // The input gradient, channels-last in a zero border (its border and tail collect the
  // scatters of neighbours outside the input and of points that sample nothing).
  at::Tensor gin_buffer = at::empty({g.B * XL.size * C}, acc_options);
  cpu::advise_huge_pages(gin_buffer);
  gin_buffer.zero_();
  acc_t* gin_pad = gin_buffer.mutable_data_ptr<acc_t>();
  std::vector<acc_t> weight_partial(g.B * SL.size * C, acc_t(0));
  std::vector<acc_t> bias_partial(g.B * C, acc_t(0));
  const auto plane_chunks = [&](int64_t begin, int64_t end) VSR_INLINE_LAMBDA {
    std::vector<acc_t> d_input(chunk), d_kernel(chunk);
    std::vector<Samples<acc_t>> ks(kk), xs(kk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, rest = task % chunks;
      const int64_t c0 = rest / per_block * block + rest % per_block * chunk;
      const int64_t n = std::min(chunk, (rest / per_block + 1) * block - c0);
      const int64_t gk = g.kernel_group_of(c0), og = g.offset_group_of(c0);
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      const acc_t* x_b = x_pad + b * XL.size * C + c0;
      acc_t* gin_b = gin_pad + b * XL.size * C + c0;
      acc_t* gscope = weight_partial.data() + b * SL.size * C + c0;
      acc_t* bias_sum = bias_partial.data() + b * C + c0;
      for (int64_t ho = 0; ho < g.Ho; ++ho)
        for (int64_t wo0 = 0; wo0 < Wo; wo0 += kSeg) {
          const int len = static_cast<int>(std::min<int64_t>(kSeg, Wo - wo0));
          for (int64_t i = 0, k = 0; i < g.kh; ++i)
            for (int64_t j = 0; j < g.kw; ++j, ++k) {
              kernel_samples<false, acc_t>(ks[k], g, ko_b, gk, i, j, ho * Wo + wo0, len);
              input_samples<false, acc_t>(xs[k], g, off_b, msk_b, og, i, j, ho, wo0, len, grid_x_f.data());
            }
          for (int l = 0; l < len; ++l) {
            const int64_t p = ho * Wo + wo0 + l;
            const acc_t* go = go_cl + (b * HoWo + p) * C + c0;
            for (int64_t c = 0; c < n; ++c) bias_sum[c] += go[c];
            for (int64_t k = 0; k < kk; ++k) {
              const Samples<acc_t>& K = ks[k];
              const Samples<acc_t>& X = xs[k];
              const int64_t kb = SL.base(K.vy[l], K.vx[l]) * C, xb = XL.base(X.vy[l], X.vx[l]) * C;
              plane_grad_channels<kDeformed>(n, C, go, table.data() + kb + c0, gscope + kb, sr, point_of<false>(K, l),
                                             x_b + xb, gin_b + xb, xr, point_of<false>(X, l), X.mask[l],
                                             d_input.data(), d_kernel.data());
            }
          }
        }
    }
  };
  at::parallel_for(0, g.B * chunks, grain(chunk * kk * HoWo),
                   [&](int64_t begin, int64_t end) { run_tasks(plane_chunks, begin, end); });
  // Back to channels-first; the weight and bias gradients: the per-batch-element partials
  // summed in order b = 0, 1, ...
  from_padded(gin_pad, grad_input.mutable_data_ptr<acc_t>(), g.B, C, g.H, g.W, XL);
  acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gb = grad_bias.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t y = 0; y < g.Sh; ++y)
      for (int64_t x = 0; x < g.Sw; ++x) {
        acc_t sum = acc_t(0);
        for (int64_t b = 0; b < g.B; ++b) sum += weight_partial[(b * SL.size + (y + 1) * sr + x + 1) * C + c];
        gw[(c * g.Sh + y) * g.Sw + x] = sum;
      }
    acc_t sum = acc_t(0);
    for (int64_t b = 0; b < g.B; ++b) sum += bias_partial[b * C + c];
    gb[c] = sum;
  }
  return {grad_input, grad_weight, grad_kernel_offset, grad_offset, grad_mask, grad_bias};
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& kernel_offset,
                       const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g =
      check_forward(at::kCPU, input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_kernel_conv2d_cpu", [&] {
    const auto impl = offset.has_value() ? forward_impl<true, scalar_t> : forward_impl<false, scalar_t>;
    out = impl(g, input.contiguous(), weight.contiguous(), kernel_offset.contiguous(), contiguous_or_undefined(offset),
               contiguous_or_undefined(mask), contiguous_or_undefined(bias));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& kernel_offset,
    const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_backward(at::kCPU, grad_out, input, weight, kernel_offset, offset, mask, bias, kernel_size,
                                    stride, padding, dilation);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_kernel_conv2d_backward_cpu",
                                  [&] {
                                    const auto impl = offset.has_value() ? backward_impl<true, scalar_t>
                                                                         : backward_impl<false, scalar_t>;
                                    r = impl(g, grad_out.contiguous(), input.contiguous(),
                                                                weight.contiguous(), kernel_offset.contiguous(),
                                                                contiguous_or_undefined(offset),
                                                                contiguous_or_undefined(mask));
                                  });
  const auto dtype = input.scalar_type();
  auto& [gi, gw, gko, goff, gm, gb] = r;
  return {to_contiguous(gi, dtype), to_contiguous(gw, dtype), to_contiguous(gko, dtype),
          to_contiguous(goff, dtype), to_contiguous(gm, dtype), to_contiguous(gb, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CPU, m) {
  m.impl("deform_kernel_conv2d", &forward_cpu);
  m.impl("deform_kernel_conv2d_backward", &backward_cpu);
}

}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
