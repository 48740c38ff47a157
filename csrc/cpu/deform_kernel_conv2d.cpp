// CPU launchers of deform_kernel_conv2d (depthwise deformable-kernel convolution).
//
// Layout: the work runs channels-last. The input (and, in the backward, grad_out) is copied
// once into a (B, pixels, C) buffer in the accumulation dtype, and every channel's kernel
// scope into a zero-padded, transposed (scope position, C) table. A sampling tap (its two
// bilinear samplers, common/bilinear.h) is then built once per (position, tap, group) and
// applied to all channels of its group by unit-stride loops over the channels (vectorised by
// the compiler: no gathers), reading four neighbour rows of the scope table and four of the
// input buffer; a neighbour outside the input or the scope reads a row of zeros. Nothing of
// the size of the output times the taps is ever built.
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

namespace vsr_kernels {
namespace deform_kernel_conv2d {
namespace {

// Tasks per thread chunk: at least about kMinWork (channel, tap, position) terms, so that a
// small call runs on the calling thread (waking a busy thread pool costs milliseconds).
constexpr int64_t kMinWork = int64_t(1) << 16;

int64_t grain(int64_t work_per_task) { return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_task)); }

// A channel's kernel scope in a zero border: (Sh + 2) rows of Sw + 2 positions, then a zero
// tail. The neighbours of a scope point with floor (y0, x0), y0 in [-1, Sh - 1], x0 in
// [-1, Sw - 1], lie at positions base + {0, 1, row, row + 1}, base = (y0 + 1) row + x0 + 1,
// all inside; a neighbour outside the scope reads a zero of the border. `zero` is a base whose
// four neighbours are all zeros of the tail (a point that samples nothing).
struct ScopeLayout {
  int64_t row, size, zero;
  explicit ScopeLayout(const Geometry& g)
      : row(g.Sw + 2), size((g.Sh + 2) * (g.Sw + 2) + g.Sw + 4), zero((g.Sh + 2) * (g.Sw + 2)) {}
};

// The padded scopes of every channel, transposed: table[position * C + c], in acc_t.
template <typename acc_t, typename T>
std::vector<acc_t> scope_table(const Geometry& g, const ScopeLayout& L, const T* weight) {
  std::vector<acc_t> table(L.size * g.C, acc_t(0));
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t y = 0; y < g.Sh; ++y)
      for (int64_t x = 0; x < g.Sw; ++x)
        table[((y + 1) * L.row + x + 1) * g.C + c] = vsr_kernels::convert<acc_t>(weight[(c * g.Sh + y) * g.Sw + x]);
  return table;
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

// dst[b, c, p] = src[b, p, c]: (B, P, C) -> (B, C, P).
template <typename acc_t>
void from_channels_last(const acc_t* src, acc_t* dst, int64_t B, int64_t C, int64_t P) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks, grain(kBlock * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, p0 = task % blocks * kBlock, p1 = std::min(P, p0 + kBlock);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* s = src + b * P * C + c;
        acc_t* d = dst + (b * C + c) * P;
        for (int64_t p = p0; p < p1; ++p) d[p] = s[p * C];
      }
    }
  });
}

// A kernel-scope sample in the padded scope: base (for the coordinate gradients),
// value_base (base where the point samples the scope, else `zero`: a point on the -1 edge has
// weights 0 but in-scope neighbours, which its value must not read, since 0 * NaN = NaN), the
// bilinear weights (0 where the point samples nothing) and their coordinate derivatives;
// poison is NaN for a NaN coordinate. The shared sampler computes everything but the bases.
template <typename acc_t>
struct KernelTap {
  int64_t base, value_base;
  bool sampled;
  acc_t weight[4], grad_y[4], grad_x[4], poison;
};

// Tap k = i kw + j: its row and column, computed once per call (no division per point).
struct Tap {
  int64_t k, i, j;
};

std::vector<Tap> taps_of(const Geometry& g) {
  std::vector<Tap> taps;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) taps.push_back({i * g.kw + j, i, j});
  return taps;
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
// samplers they inline) for its instruction set. Elsewhere: one copy.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VSR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VSR_CPU_CLONES
#endif

template <typename Body>
VSR_CPU_CLONES void run_tasks(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

template <typename acc_t, typename T>
VSR_ALWAYS_INLINE KernelTap<acc_t> kernel_tap(const Geometry& g, const ScopeLayout& L, const T* kernel_offset_b,
                                              int64_t gk, const Tap& tap, int64_t p) {
  const T* o = kernel_offset_b + pair_channel(g, gk, tap.k) * g.positions() + p;
  acc_t ky, kx;
  kernel_point(g, tap.i, tap.j, vsr_kernels::convert<acc_t>(o[0]), vsr_kernels::convert<acc_t>(o[g.positions()]), &ky,
               &kx);
  const Bilinear<acc_t> b = scope_sampler(g, ky, kx);
  KernelTap<acc_t> t;
  t.sampled = b.sampled;
  t.poison = b.poison;
  // valid != 0 exactly when the point lies in [-1, Sh) x [-1, Sw) (the sampled region and its -1 edge).
  t.base = b.valid != 0u
               ? (static_cast<int64_t>(floor_of(ky)) + 1) * L.row + static_cast<int64_t>(floor_of(kx)) + 1
               : L.zero;
  t.value_base = b.sampled ? t.base : L.zero;
  for (int n = 0; n < 4; ++n) {
    t.weight[n] = b.weight[n];
    t.grad_y[n] = b.grad_y[n];
    t.grad_x[n] = b.grad_x[n];
  }
  return t;
}

// An input sample in a channels-last batch element: the pixel of each neighbour (-1 where it
// is absent: it reads a row of zeros) for the value and for the coordinate gradient (a point
// on the -1 edge reads no value, but its neighbours inside give the one-sided gradient), the
// weights and their coordinate derivatives, the poison and the mask value.
template <typename acc_t>
struct InputSample {
  int64_t pixel[4];        // for the value
  int64_t grad_pixel[4];   // for the coordinate gradient
  acc_t weight[4], grad_y[4], grad_x[4], poison, mask;
  bool scatter;  // the point samples the input: its value's gradient reaches the input
};

template <typename acc_t, typename T>
VSR_ALWAYS_INLINE InputSample<acc_t> input_sample_at(const Geometry& g, const T* offset_b, const T* mask_b, int64_t og,
                                                     const Tap& tap, int64_t ho, int64_t wo) {
  const int64_t HoWo = g.positions(), p = ho * g.Wo + wo, k = tap.k;
  InputSample<acc_t> s;
  s.mask = mask_b == nullptr ? acc_t(1) : vsr_kernels::convert<acc_t>(mask_b[mask_channel(g, og, k) * HoWo + p]);
  acc_t dy = acc_t(0), dx = acc_t(0);
  if (offset_b != nullptr) {
    const T* o = offset_b + pair_channel(g, og, k) * HoWo + p;
    dy = vsr_kernels::convert<acc_t>(o[0]);
    dx = vsr_kernels::convert<acc_t>(o[HoWo]);
  }
  const InputTap<acc_t> t = input_tap(g, offset_b != nullptr, tap.i, tap.j, ho, wo, dy, dx);
  if (!t.deformed) {  // the grid pixel itself, or nothing
    s.pixel[0] = s.grad_pixel[0] = t.grid;
    s.weight[0] = acc_t(1);
    for (int n = 1; n < 4; ++n) {
      s.pixel[n] = s.grad_pixel[n] = -1;
      s.weight[n] = acc_t(0);
    }
    for (int n = 0; n < 4; ++n) s.grad_y[n] = s.grad_x[n] = acc_t(0);
    s.poison = acc_t(0);
    s.scatter = t.grid >= 0;
    return s;
  }
  s.poison = t.at.poison;
  s.scatter = t.at.sampled;
  for (int n = 0; n < 4; ++n) {
    const bool valid = t.at.valid >> n & 1u;
    // bilinear() gives offset y * W + x, i.e. the pixel, for a row stride W and a column stride 1.
    s.grad_pixel[n] = valid ? t.at.offset[n] : -1;
    s.pixel[n] = valid && t.at.sampled ? t.at.offset[n] : -1;
    s.weight[n] = t.at.weight[n];
    s.grad_y[n] = t.at.grad_y[n];
    s.grad_x[n] = t.at.grad_x[n];
  }
  return s;
}

// The row of channels-last data of `pixel` (from the group's first channel), or zeros.
template <typename acc_t>
const acc_t* pixel_row(const acc_t* x_b, const acc_t* zeros, int64_t C, int64_t pixel) {
  return pixel < 0 ? zeros : x_b + pixel * C;
}

// ---------------------------------------------------------------------------------------
// The channel loops (unit stride; __restrict lets the compiler vectorise them).

// acc[c] += (sum_n kw[n] s_n[c]) * (sum_n xw[n] x_n[c]) for c < n.
template <typename acc_t>
VSR_ALWAYS_INLINE void forward_channels(int64_t n, acc_t* __restrict acc, const acc_t* __restrict s0, const acc_t* __restrict s1,
                      const acc_t* __restrict s2, const acc_t* __restrict s3, const acc_t* kw,
                      const acc_t* __restrict x0, const acc_t* __restrict x1, const acc_t* __restrict x2,
                      const acc_t* __restrict x3, const acc_t* xw) {
  const acc_t k0 = kw[0], k1 = kw[1], k2 = kw[2], k3 = kw[3];
  const acc_t w0 = xw[0], w1 = xw[1], w2 = xw[2], w3 = xw[3];
  for (int64_t c = 0; c < n; ++c)
    acc[c] += (k0 * s0[c] + k1 * s1[c] + k2 * s2[c] + k3 * s3[c]) * (w0 * x0[c] + w1 * x1[c] + w2 * x2[c] + w3 * x3[c]);
}

constexpr int kLanes = 16;

// Pass A's per-channel terms, summed over c < n in per-lane partials (lane c % kLanes), then
// the lanes in order: sums[0..4] += (kernel-offset y, x; input-offset y, x; mask) gradients.
template <typename acc_t>
VSR_ALWAYS_INLINE void point_grad_channels(int64_t n, const acc_t* __restrict go, const acc_t* const* v, const acc_t* const* s,
                         const KernelTap<acc_t>& kt, const acc_t* const* xv, const acc_t* const* xg,
                         const InputSample<acc_t>& xs, acc_t* sums) {
  acc_t lanes[5][kLanes];
  for (int q = 0; q < 5; ++q)
    for (int l = 0; l < kLanes; ++l) lanes[q][l] = acc_t(0);
  const acc_t* __restrict v0 = v[0], * __restrict v1 = v[1], * __restrict v2 = v[2], * __restrict v3 = v[3];
  const acc_t* __restrict s0 = s[0], * __restrict s1 = s[1], * __restrict s2 = s[2], * __restrict s3 = s[3];
  const acc_t* __restrict a0 = xv[0], * __restrict a1 = xv[1], * __restrict a2 = xv[2], * __restrict a3 = xv[3];
  const acc_t* __restrict g0 = xg[0], * __restrict g1 = xg[1], * __restrict g2 = xg[2], * __restrict g3 = xg[3];
  const acc_t m = xs.mask;
  auto term = [&](int64_t c, int l) {
    const acc_t kv = kt.weight[0] * v0[c] + kt.weight[1] * v1[c] + kt.weight[2] * v2[c] + kt.weight[3] * v3[c] + kt.poison;
    const acc_t dky = kt.grad_y[0] * s0[c] + kt.grad_y[1] * s1[c] + kt.grad_y[2] * s2[c] + kt.grad_y[3] * s3[c] + kt.poison;
    const acc_t dkx = kt.grad_x[0] * s0[c] + kt.grad_x[1] * s1[c] + kt.grad_x[2] * s2[c] + kt.grad_x[3] * s3[c] + kt.poison;
    const acc_t xv_ = xs.weight[0] * a0[c] + xs.weight[1] * a1[c] + xs.weight[2] * a2[c] + xs.weight[3] * a3[c] + xs.poison;
    const acc_t dy = xs.grad_y[0] * g0[c] + xs.grad_y[1] * g1[c] + xs.grad_y[2] * g2[c] + xs.grad_y[3] * g3[c] + xs.poison;
    const acc_t dx = xs.grad_x[0] * g0[c] + xs.grad_x[1] * g1[c] + xs.grad_x[2] * g2[c] + xs.grad_x[3] * g3[c] + xs.poison;
    const TapGrad<acc_t> d = tap_grad(go[c], kv, m, xv_);
    lanes[0][l] += d.kernel * dky;
    lanes[1][l] += d.kernel * dkx;
    lanes[2][l] += d.input * dy;
    lanes[3][l] += d.input * dx;
    lanes[4][l] += d.mask;
  };
  int64_t c0 = 0;
  for (; c0 + kLanes <= n; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) term(c0 + l, l);
  for (int l = 0; c0 + l < n; ++l) term(c0 + l, l);
  for (int q = 0; q < 5; ++q) {
    acc_t total = acc_t(0);
    for (int l = 0; l < kLanes; ++l) total += lanes[q][l];
    sums[q] += total;
  }
}

// Pass B's scatter of one (position, tap) over the block's n channels.
template <typename acc_t>
VSR_ALWAYS_INLINE void plane_grad_channels(int64_t n, const acc_t* __restrict go, const KernelTap<acc_t>& kt, const acc_t* const* v,
                         acc_t* const* gs, const InputSample<acc_t>& xs, const acc_t* const* xv, acc_t* const* gx,
                         acc_t* __restrict d_input, acc_t* __restrict d_kernel) {
  const acc_t* __restrict v0 = v[0], * __restrict v1 = v[1], * __restrict v2 = v[2], * __restrict v3 = v[3];
  const acc_t* __restrict a0 = xv[0], * __restrict a1 = xv[1], * __restrict a2 = xv[2], * __restrict a3 = xv[3];
  const acc_t m = xs.mask;
  for (int64_t c = 0; c < n; ++c) {
    const acc_t kv = kt.weight[0] * v0[c] + kt.weight[1] * v1[c] + kt.weight[2] * v2[c] + kt.weight[3] * v3[c] + kt.poison;
    const acc_t xv_ = xs.weight[0] * a0[c] + xs.weight[1] * a1[c] + xs.weight[2] * a2[c] + xs.weight[3] * a3[c] + xs.poison;
    const TapGrad<acc_t> d = tap_grad(go[c], kv, m, xv_);
    d_input[c] = d.input;
    d_kernel[c] = d.kernel;
  }
  if (kt.sampled)
    for (int nb = 0; nb < 4; ++nb) {
      acc_t* __restrict dst = gs[nb];
      const acc_t w = kt.weight[nb];
      for (int64_t c = 0; c < n; ++c) dst[c] += d_kernel[c] * w;
    }
  if (xs.scatter)  // outside, or on the -1 edge: a coordinate gradient only
    for (int nb = 0; nb < 4; ++nb) {
      if (gx[nb] == nullptr) continue;
      acc_t* __restrict dst = gx[nb];
      const acc_t w = xs.weight[nb];
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

// ---------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t>
at::Tensor forward_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                        const at::Tensor& kernel_offset, const at::Tensor& offset, const at::Tensor& mask,
                        const at::Tensor& bias) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, input.options());
  if (out.numel() == 0) return out;
  const ScopeLayout L(g);
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), HW = g.H * g.W, Wo = g.Wo, C = g.C;
  const int64_t G = g.offset_groups, Gk = g.kernel_groups, block = common_block(g);
  const std::vector<acc_t> table = scope_table<acc_t>(g, L, weight.const_data_ptr<scalar_t>());
  const std::vector<acc_t> zeros(C, acc_t(0));
  const std::vector<Tap> taps = taps_of(g);
  // Uninitialised (a std::vector would zero it first: one more pass over memory).
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor x_cl_buffer = at::empty({g.B * HW * C}, acc_options);
  acc_t* x_cl = x_cl_buffer.mutable_data_ptr<acc_t>();
  to_channels_last(input.const_data_ptr<scalar_t>(), x_cl, g.B, C, HW);
  const scalar_t* ko = kernel_offset.const_data_ptr<scalar_t>();
  const scalar_t* off = offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* msk = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bi = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t row = L.row;
  const auto rows = [&](int64_t begin, int64_t end) VSR_INLINE_LAMBDA {
    std::vector<acc_t> acc(Wo * C);
    std::vector<acc_t> kweights(Gk * 4), xweights(G * 4);
    std::vector<const acc_t*> kbase(Gk), xrows(G * 4);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.Ho, ho = task % g.Ho;
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      const acc_t* x_b = x_cl + b * HW * C;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t wo = 0; wo < Wo; ++wo) {
        acc_t* acc_q = acc.data() + wo * C;
        for (const Tap& tap : taps) {
          for (int64_t gk = 0; gk < Gk; ++gk) {
            const KernelTap<acc_t> t = kernel_tap<acc_t>(g, L, ko_b, gk, tap, ho * Wo + wo);
            kbase[gk] = table.data() + t.value_base * C;
            for (int n = 0; n < 4; ++n) kweights[gk * 4 + n] = t.weight[n] + t.poison;
          }
          for (int64_t og = 0; og < G; ++og) {
            const InputSample<acc_t> s = input_sample_at<acc_t>(g, off_b, msk_b, og, tap, ho, wo);
            for (int n = 0; n < 4; ++n) {
              xrows[og * 4 + n] = pixel_row(x_b, zeros.data(), C, s.pixel[n]);
              // The mask and the poison (NaN for a NaN coordinate) folded into the weights.
              xweights[og * 4 + n] = s.mask * s.weight[n] + s.poison;
            }
          }
          for (int64_t c0 = 0; c0 < C; c0 += block) {
            const int64_t gk = g.kernel_group_of(c0), og = g.offset_group_of(c0);
            const acc_t* s0 = kbase[gk] + c0;
            const acc_t* const* x = xrows.data() + og * 4;
            forward_channels(block, acc_q + c0, s0, s0 + C, s0 + row * C, s0 + (row + 1) * C, kweights.data() + gk * 4,
                             x[0] + c0, x[1] + c0, x[2] + c0, x[3] + c0, xweights.data() + og * 4);
          }
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

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Geometry& g, const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& kernel_offset, const at::Tensor& offset, const at::Tensor& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), HW = g.H * g.W, Wo = g.Wo, C = g.C;
  const int64_t G = g.offset_groups, Gk = g.kernel_groups, block = common_block(g);
  const bool deformed = offset.defined(), masked = mask.defined();
  at::Tensor grad_input = at::zeros({g.B, C, g.H, g.W}, acc_options);
  at::Tensor grad_kernel_offset = at::zeros({g.B, 2 * Gk * kk, g.Ho, g.Wo}, acc_options);
  at::Tensor grad_offset = deformed ? at::zeros({g.B, 2 * G * kk, g.Ho, g.Wo}, acc_options) : at::zeros({0}, acc_options);
  at::Tensor grad_mask = masked ? at::zeros({g.B, G * kk, g.Ho, g.Wo}, acc_options) : at::zeros({0}, acc_options);
  at::Tensor grad_weight = at::zeros({C, 1, g.Sh, g.Sw}, acc_options);
  at::Tensor grad_bias = at::zeros({C}, acc_options);
  if (g.B == 0) return {grad_input, grad_weight, grad_kernel_offset, grad_offset, grad_mask, grad_bias};

  const ScopeLayout L(g);
  const int64_t row = L.row;
  const std::vector<acc_t> table = scope_table<acc_t>(g, L, weight.const_data_ptr<scalar_t>());
  const std::vector<acc_t> zeros(C, acc_t(0));
  const std::vector<Tap> taps = taps_of(g);
  const at::Tensor x_cl_buffer = at::empty({g.B * HW * C}, acc_options);
  const at::Tensor go_cl_buffer = at::empty({g.B * HoWo * C}, acc_options);
  acc_t* x_cl = x_cl_buffer.mutable_data_ptr<acc_t>();
  acc_t* go_cl = go_cl_buffer.mutable_data_ptr<acc_t>();
  to_channels_last(input.const_data_ptr<scalar_t>(), x_cl, g.B, C, HW);
  to_channels_last(grad_out.const_data_ptr<scalar_t>(), go_cl, g.B, C, HoWo);
  const scalar_t* ko = kernel_offset.const_data_ptr<scalar_t>();
  const scalar_t* off = deformed ? offset.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* msk = masked ? mask.const_data_ptr<scalar_t>() : nullptr;

  // Pass A: kernel-offset, offset and mask gradients, one task per (b, output row).
  acc_t* gko = grad_kernel_offset.mutable_data_ptr<acc_t>();
  acc_t* goff = deformed ? grad_offset.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* gmsk = masked ? grad_mask.mutable_data_ptr<acc_t>() : nullptr;
  const auto point_rows = [&](int64_t begin, int64_t end) VSR_INLINE_LAMBDA {
    std::vector<KernelTap<acc_t>> ktaps(Gk);
    std::vector<InputSample<acc_t>> xtaps(G);
    std::vector<acc_t> ksums(Gk * 2), xsums(G * 3);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.Ho, ho = task % g.Ho;
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      const acc_t* x_b = x_cl + b * HW * C;
      for (int64_t wo = 0; wo < Wo; ++wo) {
        const int64_t p = ho * Wo + wo;
        const acc_t* go = go_cl + (b * HoWo + p) * C;
        for (const Tap& tap : taps) {
          const int64_t k = tap.k;
          for (int64_t gk = 0; gk < Gk; ++gk) ktaps[gk] = kernel_tap<acc_t>(g, L, ko_b, gk, tap, p);
          for (int64_t og = 0; og < G; ++og) xtaps[og] = input_sample_at<acc_t>(g, off_b, msk_b, og, tap, ho, wo);
          std::fill(ksums.begin(), ksums.end(), acc_t(0));
          std::fill(xsums.begin(), xsums.end(), acc_t(0));
          for (int64_t c0 = 0; c0 < C; c0 += block) {
            const int64_t gk = g.kernel_group_of(c0), og = g.offset_group_of(c0);
            const KernelTap<acc_t>& kt = ktaps[gk];
            const InputSample<acc_t>& xs = xtaps[og];
            const acc_t* v[4];
            const acc_t* s[4];
            const acc_t* xv[4];
            const acc_t* xg[4];
            for (int n = 0; n < 4; ++n) {
              const int64_t rel = (n >> 1) * row + (n & 1);
              v[n] = table.data() + (kt.value_base + rel) * C + c0;
              s[n] = table.data() + (kt.base + rel) * C + c0;
              xv[n] = pixel_row(x_b, zeros.data(), C, xs.pixel[n]) + c0;
              xg[n] = pixel_row(x_b, zeros.data(), C, xs.grad_pixel[n]) + c0;
            }
            acc_t sums[5] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
            point_grad_channels(block, go + c0, v, s, kt, xv, xg, xs, sums);
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
            if (goff != nullptr) {
              acc_t* o = goff + (b * 2 * G * kk + pair_channel(g, og, k)) * HoWo + p;
              o[0] = xsums[og * 3];
              o[HoWo] = xsums[og * 3 + 1];
            }
            if (gmsk != nullptr) gmsk[(b * G * kk + mask_channel(g, og, k)) * HoWo + p] = xsums[og * 3 + 2];
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
  const int64_t chunks = C / block * ((block + chunk - 1) / chunk);
  std::vector<acc_t> gin_cl(g.B * HW * C, acc_t(0));
  std::vector<acc_t> weight_partial(g.B * L.size * C, acc_t(0));
  std::vector<acc_t> bias_partial(g.B * C, acc_t(0));
  const auto plane_chunks = [&](int64_t begin, int64_t end) VSR_INLINE_LAMBDA {
    std::vector<acc_t> d_input(chunk), d_kernel(chunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, rest = task % chunks, per_block = (block + chunk - 1) / chunk;
      const int64_t c0 = rest / per_block * block + rest % per_block * chunk;
      const int64_t n = std::min(chunk, (rest / per_block + 1) * block - c0);
      const int64_t gk = g.kernel_group_of(c0), og = g.offset_group_of(c0);
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      const acc_t* x_b = x_cl + b * HW * C;
      acc_t* gin_b = gin_cl.data() + b * HW * C;
      acc_t* gscope = weight_partial.data() + b * L.size * C;
      acc_t* bias_sum = bias_partial.data() + b * C + c0;
      for (int64_t p = 0, ho = 0, wo = 0; p < HoWo; ++p, wo = wo + 1 == Wo ? 0 : wo + 1, ho += wo == 0) {
        const acc_t* go = go_cl + (b * HoWo + p) * C + c0;
        for (int64_t c = 0; c < n; ++c) bias_sum[c] += go[c];
        for (const Tap& tap : taps) {
          const KernelTap<acc_t> kt = kernel_tap<acc_t>(g, L, ko_b, gk, tap, p);
          const InputSample<acc_t> xs = input_sample_at<acc_t>(g, off_b, msk_b, og, tap, ho, wo);
          const acc_t* v[4];
          acc_t* gs[4];
          const acc_t* xv[4];
          acc_t* gx[4];
          for (int nb = 0; nb < 4; ++nb) {
            const int64_t rel = (nb >> 1) * row + (nb & 1);
            v[nb] = table.data() + (kt.value_base + rel) * C + c0;
            gs[nb] = gscope + (kt.value_base + rel) * C + c0;
            xv[nb] = pixel_row(x_b, zeros.data(), C, xs.pixel[nb]) + c0;
            gx[nb] = xs.pixel[nb] < 0 ? nullptr : gin_b + xs.pixel[nb] * C + c0;
          }
          plane_grad_channels(n, go, kt, v, gs, xs, xv, gx, d_input.data(), d_kernel.data());
        }
      }
    }
  };
  at::parallel_for(0, g.B * chunks, grain(chunk * kk * HoWo),
                   [&](int64_t begin, int64_t end) { run_tasks(plane_chunks, begin, end); });
  // Back to channels-first; the weight and bias gradients: the per-batch-element partials
  // summed in order b = 0, 1, ...
  from_channels_last(gin_cl.data(), grad_input.mutable_data_ptr<acc_t>(), g.B, C, HW);
  acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gb = grad_bias.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t y = 0; y < g.Sh; ++y)
      for (int64_t x = 0; x < g.Sw; ++x) {
        acc_t sum = acc_t(0);
        for (int64_t b = 0; b < g.B; ++b) sum += weight_partial[(b * L.size + (y + 1) * row + x + 1) * C + c];
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
    out = forward_impl<scalar_t>(g, input.contiguous(), weight.contiguous(), kernel_offset.contiguous(),
                                 contiguous_or_undefined(offset), contiguous_or_undefined(mask),
                                 contiguous_or_undefined(bias));
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
                                    r = backward_impl<scalar_t>(g, grad_out.contiguous(), input.contiguous(),
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
