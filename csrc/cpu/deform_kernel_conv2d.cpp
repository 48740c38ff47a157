// CPU launchers of deform_kernel_conv2d (depthwise deformable-kernel convolution). Nothing of
// the size of the output times the taps is ever built: every pass walks output rows, builds
// the sampling taps of a row once per (kernel group, offset group) and reuses them across the
// group's channels; every channel's kernel scope is read from a zero-padded copy (a few dozen
// values, in L1) so that a kernel sample is four unconditional loads.
//
// Forward: one task per (batch element b, output row). Per channel, the row is accumulated
// tap by tap over the output pixels of the row (unit stride along W: vectorisable).
//
// Backward, deterministic without atomics, recomputing both samplings (nothing is stored per
// output position between forward and backward):
// - pass A, one task per (b, output row): the per-position reductions over channels, i.e. the
//   kernel-offset gradient (over the kernel group's channels), the input-offset and mask
//   gradients (over the offset group's channels). Each element is written by its row's task
//   only, after a sum over channels in increasing order.
// - pass B, one task per (b, block of channels sharing a kernel group and an offset group): the
//   input gradient (a bilinear scatter within the channel's plane, in fixed order (row, tap,
//   column)) and the per-(b, c) partials of the weight (a scatter into the channel's padded
//   scope) and bias gradients; both are summed over b = 0, 1, ... at the end.
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

// A channel's kernel scope copied into a zero border: (Sh + 2) rows of Sw + 2, then a zero tail.
// The neighbours of a scope point with floor (y0, x0), y0 in [-1, Sh - 1], x0 in [-1, Sw - 1],
// lie at base + {0, 1, row, row + 1}, base = (y0 + 1) row + x0 + 1, all inside the copy; a
// neighbour outside the scope reads a zero of the border. `zero` is a base whose four
// neighbours are all zeros of the tail (a point that samples nothing).
struct ScopeLayout {
  int64_t row, size, zero;
  explicit ScopeLayout(const Geometry& g) : row(g.Sw + 2), size((g.Sh + 2) * (g.Sw + 2) + g.Sw + 4),
                                            zero((g.Sh + 2) * (g.Sw + 2)) {}
  int64_t neighbour(int n) const { return (n >> 1) * row + (n & 1); }
};

// The padded scopes of every channel, in acc_t: scopes[c * size + ...].
template <typename acc_t, typename T>
std::vector<acc_t> padded_scopes(const Geometry& g, const ScopeLayout& L, const T* weight) {
  std::vector<acc_t> scopes(g.C * L.size, acc_t(0));
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t y = 0; y < g.Sh; ++y)
      for (int64_t x = 0; x < g.Sw; ++x)
        scopes[c * L.size + (y + 1) * L.row + x + 1] =
            vsr_kernels::convert<acc_t>(weight[(c * g.Sh + y) * g.Sw + x]);
  return scopes;
}

// A kernel-scope sample in the padded scope: base, the bilinear weights (0 when the point
// samples nothing) and, for the backward, their coordinate derivatives; poison is NaN for a
// NaN coordinate. The shared sampler (common/bilinear.h) computes everything but the base.
// value_base is base where the point samples the scope, else `zero`: a point on the -1 edge
// has weights 0 but in-scope neighbours, which its value must not read (0 * NaN).
template <typename acc_t>
struct KernelTap {
  int32_t base, value_base;
  bool sampled;
  acc_t weight[4], grad_y[4], grad_x[4], poison;
};

template <typename acc_t>
KernelTap<acc_t> kernel_tap(const Geometry& g, const ScopeLayout& L, int64_t k, acc_t dky, acc_t dkx) {
  acc_t ky, kx;
  kernel_point(g, k, dky, dkx, &ky, &kx);
  const Bilinear<acc_t> b = scope_sampler(g, ky, kx);
  KernelTap<acc_t> t;
  t.sampled = b.sampled;
  t.poison = b.poison;
  // valid != 0 exactly when the point lies in [-1, Sh) x [-1, Sw) (the sampled region and its -1 edge).
  t.base = static_cast<int32_t>(
      b.valid != 0u ? (static_cast<int64_t>(floor_of(ky)) + 1) * L.row + static_cast<int64_t>(floor_of(kx)) + 1
                    : L.zero);
  t.value_base = b.sampled ? t.base : static_cast<int32_t>(L.zero);
  for (int n = 0; n < 4; ++n) {
    t.weight[n] = b.weight[n];
    t.grad_y[n] = b.grad_y[n];
    t.grad_x[n] = b.grad_x[n];
  }
  return t;
}

// The forward's kernel tap: base and weights with the poison folded in (a NaN coordinate
// makes every weight NaN, and the sample NaN).
template <typename acc_t>
struct ForwardKernelTap {
  int32_t base;
  acc_t weight[4];
};

// The forward's input tap: the four neighbours' plane offsets (0, in bounds, for one that is
// absent) and weights with the mask and the poison folded in; bit n of `valid`: neighbour n
// is read (an absent neighbour reads 0, whatever its weight).
template <typename acc_t>
struct ForwardInputTap {
  int64_t offset[4];
  acc_t weight[4];
  unsigned valid;
};

// Tasks per thread chunk: at least about kMinWork (channel, tap, position) terms, so that a
// small call runs on the calling thread (waking a busy thread pool costs milliseconds).
constexpr int64_t kMinWork = int64_t(1) << 16;

int64_t grain(int64_t work_per_task) { return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_task)); }

// Per (tap k, column q) of a row: the mask value at (k, q) of offset group og (1 without mask).
template <typename acc_t, typename T>
acc_t mask_value(const Geometry& g, const T* mask_b, int64_t og, int64_t k, int64_t p) {
  return mask_b == nullptr ? acc_t(1)
                           : vsr_kernels::convert<acc_t>(mask_b[mask_channel(g, og, k) * g.positions() + p]);
}

// The input taps of offset group og at output row ho, with the mask: sampler (shared) and mask.
template <typename acc_t, typename T>
void input_row(const Geometry& g, const T* offset_b, const T* mask_b, int64_t og, int64_t ho,
               std::vector<InputTap<acc_t>>& taps, std::vector<acc_t>& masks) {
  const int64_t kk = g.kernel_points(), Wo = g.Wo, HoWo = g.positions();
  taps.resize(kk * Wo);
  masks.resize(kk * Wo);
  for (int64_t k = 0; k < kk; ++k) {
    const T* oy = offset_b == nullptr ? nullptr : offset_b + pair_channel(g, og, k) * HoWo + ho * Wo;
    for (int64_t q = 0; q < Wo; ++q) {
      const acc_t dy = oy == nullptr ? acc_t(0) : vsr_kernels::convert<acc_t>(oy[q]);
      const acc_t dx = oy == nullptr ? acc_t(0) : vsr_kernels::convert<acc_t>(oy[HoWo + q]);
      taps[k * Wo + q] = input_tap(g, oy != nullptr, k, ho, q, dy, dx);
      masks[k * Wo + q] = mask_value<acc_t>(g, mask_b, og, k, ho * Wo + q);
    }
  }
}

template <typename acc_t, typename T>
void kernel_row(const Geometry& g, const ScopeLayout& L, const T* kernel_offset_b, int64_t gk, int64_t ho,
                std::vector<KernelTap<acc_t>>& taps) {
  const int64_t kk = g.kernel_points(), Wo = g.Wo, HoWo = g.positions();
  taps.resize(kk * Wo);
  for (int64_t k = 0; k < kk; ++k) {
    const T* ky = kernel_offset_b + pair_channel(g, gk, k) * HoWo + ho * Wo;
    for (int64_t q = 0; q < Wo; ++q)
      taps[k * Wo + q] = kernel_tap<acc_t>(g, L, k, vsr_kernels::convert<acc_t>(ky[q]),
                                           vsr_kernels::convert<acc_t>(ky[HoWo + q]));
  }
}

// ---------------------------------------------------------------------------------------
// Forward.

template <typename acc_t, typename T>
void forward_kernel_row(const Geometry& g, const ScopeLayout& L, const T* kernel_offset_b, int64_t gk, int64_t ho,
                        std::vector<ForwardKernelTap<acc_t>>& taps) {
  const int64_t kk = g.kernel_points(), Wo = g.Wo, HoWo = g.positions();
  taps.resize(kk * Wo);
  for (int64_t k = 0; k < kk; ++k) {
    const T* ky = kernel_offset_b + pair_channel(g, gk, k) * HoWo + ho * Wo;
    for (int64_t q = 0; q < Wo; ++q) {
      const KernelTap<acc_t> t = kernel_tap<acc_t>(g, L, k, vsr_kernels::convert<acc_t>(ky[q]),
                                                   vsr_kernels::convert<acc_t>(ky[HoWo + q]));
      ForwardKernelTap<acc_t>& f = taps[k * Wo + q];
      f.base = t.value_base;
      for (int n = 0; n < 4; ++n) f.weight[n] = t.weight[n] + t.poison;
    }
  }
}

template <typename acc_t, typename T>
void forward_input_row(const Geometry& g, const T* offset_b, const T* mask_b, int64_t og, int64_t ho,
                       std::vector<ForwardInputTap<acc_t>>& taps) {
  const int64_t kk = g.kernel_points(), Wo = g.Wo, HoWo = g.positions();
  taps.resize(kk * Wo);
  for (int64_t k = 0; k < kk; ++k) {
    const T* oy = offset_b == nullptr ? nullptr : offset_b + pair_channel(g, og, k) * HoWo + ho * Wo;
    for (int64_t q = 0; q < Wo; ++q) {
      const acc_t m = mask_value<acc_t>(g, mask_b, og, k, ho * Wo + q);
      ForwardInputTap<acc_t>& f = taps[k * Wo + q];
      if (oy == nullptr) {  // the grid point itself
        const InputTap<acc_t> t = input_tap<acc_t>(g, false, k, ho, q, acc_t(0), acc_t(0));
        f.valid = t.grid >= 0 ? 1u : 0u;
        f.offset[0] = t.grid >= 0 ? t.grid : 0;
        f.weight[0] = m;
        for (int n = 1; n < 4; ++n) {
          f.offset[n] = 0;
          f.weight[n] = acc_t(0);
        }
        continue;
      }
      const InputTap<acc_t> t =
          input_tap<acc_t>(g, true, k, ho, q, vsr_kernels::convert<acc_t>(oy[q]), vsr_kernels::convert<acc_t>(oy[HoWo + q]));
      // Not sampled (outside, or on the -1 edge): nothing read, the sample is the poison (0 or NaN).
      f.valid = t.at.sampled ? t.at.valid : 0u;
      for (int n = 0; n < 4; ++n) {
        f.offset[n] = t.at.offset[n];
        f.weight[n] = m * t.at.weight[n] + t.at.poison;
      }
    }
  }
}

template <typename scalar_t>
at::Tensor forward_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                        const at::Tensor& kernel_offset, const at::Tensor& offset, const at::Tensor& mask,
                        const at::Tensor& bias) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, input.options());
  if (out.numel() == 0) return out;
  const ScopeLayout L(g);
  const std::vector<acc_t> scopes = padded_scopes<acc_t>(g, L, weight.const_data_ptr<scalar_t>());
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), HW = g.H * g.W, Wo = g.Wo;
  const int64_t cgk = g.kernel_group_channels(), cog = g.offset_group_channels();
  const scalar_t zero_pixel = scalar_t(0);  // the plane of an empty (H W = 0) input: never read at weight != 0
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* ko = kernel_offset.const_data_ptr<scalar_t>();
  const scalar_t* off = offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* msk = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bi = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t G = g.offset_groups, Gk = g.kernel_groups;
  const int64_t row = L.row;
  at::parallel_for(0, g.B * g.Ho, grain(g.C * kk * Wo), [&](int64_t begin, int64_t end) {
    std::vector<ForwardKernelTap<acc_t>> ktaps;
    std::vector<ForwardInputTap<acc_t>> xtaps;
    std::vector<acc_t> acc(Wo);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.Ho, ho = task % g.Ho;
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      int64_t built_gk = -1, built_og = -1;
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t gk = c / cgk, og = c / cog;
        if (gk != built_gk) {
          forward_kernel_row<acc_t>(g, L, ko_b, gk, ho, ktaps);
          built_gk = gk;
        }
        if (og != built_og) {
          forward_input_row<acc_t>(g, off_b, msk_b, og, ho, xtaps);
          built_og = og;
        }
        const acc_t* scope = scopes.data() + c * L.size;
        const scalar_t* plane = HW == 0 ? &zero_pixel : in + (b * g.C + c) * HW;
        for (int64_t q = 0; q < Wo; ++q) acc[q] = acc_t(0);
        for (int64_t k = 0; k < kk; ++k) {
          const ForwardKernelTap<acc_t>* kt = ktaps.data() + k * Wo;
          const ForwardInputTap<acc_t>* xt = xtaps.data() + k * Wo;
          for (int64_t q = 0; q < Wo; ++q) {
            const ForwardKernelTap<acc_t>& a = kt[q];
            const ForwardInputTap<acc_t>& t = xt[q];
            const acc_t* s = scope + a.base;
            const acc_t kv = a.weight[0] * s[0] + a.weight[1] * s[1] + a.weight[2] * s[row] +
                             a.weight[3] * s[row + 1];
            const acc_t x0 = vsr_kernels::convert<acc_t>(plane[t.offset[0]]);
            const acc_t x1 = vsr_kernels::convert<acc_t>(plane[t.offset[1]]);
            const acc_t x2 = vsr_kernels::convert<acc_t>(plane[t.offset[2]]);
            const acc_t x3 = vsr_kernels::convert<acc_t>(plane[t.offset[3]]);
            const acc_t xv = t.weight[0] * (t.valid & 1u ? x0 : acc_t(0)) +
                             t.weight[1] * (t.valid & 2u ? x1 : acc_t(0)) +
                             t.weight[2] * (t.valid & 4u ? x2 : acc_t(0)) +
                             t.weight[3] * (t.valid & 8u ? x3 : acc_t(0));
            acc[q] += kv * xv;
          }
        }
        const acc_t add = bi == nullptr ? acc_t(0) : vsr_kernels::convert<acc_t>(bi[c]);
        scalar_t* dst = o + ((b * g.C + c) * g.Ho + ho) * Wo;
        for (int64_t q = 0; q < Wo; ++q) dst[q] = static_cast<scalar_t>(acc[q] + add);
      }
    }
  });
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
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), HW = g.H * g.W, Wo = g.Wo;
  const int64_t G = g.offset_groups, Gk = g.kernel_groups;
  const int64_t cgk = g.kernel_group_channels(), cog = g.offset_group_channels();
  const bool deformed = offset.defined(), masked = mask.defined();
  at::Tensor grad_input = at::zeros({g.B, g.C, g.H, g.W}, acc_options);
  at::Tensor grad_kernel_offset = at::zeros({g.B, 2 * Gk * kk, g.Ho, g.Wo}, acc_options);
  at::Tensor grad_offset = deformed ? at::zeros({g.B, 2 * G * kk, g.Ho, g.Wo}, acc_options) : at::zeros({0}, acc_options);
  at::Tensor grad_mask = masked ? at::zeros({g.B, G * kk, g.Ho, g.Wo}, acc_options) : at::zeros({0}, acc_options);
  at::Tensor grad_weight = at::zeros({g.C, 1, g.Sh, g.Sw}, acc_options);
  at::Tensor grad_bias = at::zeros({g.C}, acc_options);
  if (g.B == 0) return {grad_input, grad_weight, grad_kernel_offset, grad_offset, grad_mask, grad_bias};

  const ScopeLayout L(g);
  const std::vector<acc_t> scopes = padded_scopes<acc_t>(g, L, weight.const_data_ptr<scalar_t>());
  const scalar_t zero_pixel = scalar_t(0);
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* ko = kernel_offset.const_data_ptr<scalar_t>();
  const scalar_t* off = deformed ? offset.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* msk = masked ? mask.const_data_ptr<scalar_t>() : nullptr;
  const int64_t row = L.row;

  // Pass A: kernel-offset, offset and mask gradients, one task per (b, output row).
  acc_t* gko = grad_kernel_offset.mutable_data_ptr<acc_t>();
  acc_t* goff = deformed ? grad_offset.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* gmsk = masked ? grad_mask.mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, g.B * g.Ho, grain(g.C * kk * Wo), [&](int64_t begin, int64_t end) {
    std::vector<KernelTap<acc_t>> ktaps;
    std::vector<InputTap<acc_t>> xtaps;
    std::vector<acc_t> masks;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.Ho, ho = task % g.Ho;
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      acc_t* gko_b = gko + b * 2 * Gk * kk * HoWo + ho * Wo;
      acc_t* goff_b = goff == nullptr ? nullptr : goff + b * 2 * G * kk * HoWo + ho * Wo;
      acc_t* gmsk_b = gmsk == nullptr ? nullptr : gmsk + b * G * kk * HoWo + ho * Wo;
      int64_t built_gk = -1, built_og = -1;
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t gk = c / cgk, og = c / cog;
        if (gk != built_gk) {
          kernel_row<acc_t>(g, L, ko_b, gk, ho, ktaps);
          built_gk = gk;
        }
        if (og != built_og) {
          input_row<acc_t>(g, off_b, msk_b, og, ho, xtaps, masks);
          built_og = og;
        }
        const acc_t* scope = scopes.data() + c * L.size;
        const scalar_t* plane = HW == 0 ? &zero_pixel : in + (b * g.C + c) * HW;
        const scalar_t* go_row = go + ((b * g.C + c) * g.Ho + ho) * Wo;
        for (int64_t k = 0; k < kk; ++k) {
          acc_t* gky = gko_b + pair_channel(g, gk, k) * HoWo;
          acc_t* gkx = gky + HoWo;
          acc_t* gy = goff_b == nullptr ? nullptr : goff_b + pair_channel(g, og, k) * HoWo;
          acc_t* gm = gmsk_b == nullptr ? nullptr : gmsk_b + mask_channel(g, og, k) * HoWo;
          for (int64_t q = 0; q < Wo; ++q) {
            const KernelTap<acc_t>& a = ktaps[k * Wo + q];
            const InputTap<acc_t>& t = xtaps[k * Wo + q];
            const acc_t m = masks[k * Wo + q];
            const acc_t* s = scope + a.base;
            const acc_t* v = scope + a.value_base;
            const acc_t s0 = s[0], s1 = s[1], s2 = s[row], s3 = s[row + 1];
            const acc_t kv =
                a.weight[0] * v[0] + a.weight[1] * v[1] + a.weight[2] * v[row] + a.weight[3] * v[row + 1] + a.poison;
            const acc_t dky = a.grad_y[0] * s0 + a.grad_y[1] * s1 + a.grad_y[2] * s2 + a.grad_y[3] * s3 + a.poison;
            const acc_t dkx = a.grad_x[0] * s0 + a.grad_x[1] * s1 + a.grad_x[2] * s2 + a.grad_x[3] * s3 + a.poison;
            const acc_t xv = input_sample<acc_t>(t, plane);
            const TapGrad<acc_t> d = tap_grad(vsr_kernels::convert<acc_t>(go_row[q]), kv, m, xv);
            gky[q] += d.kernel * dky;
            gkx[q] += d.kernel * dkx;
            if (gm != nullptr) gm[q] += d.mask;
            if (gy != nullptr) {
              acc_t dy, dx;
              bilinear_coordinate_grad<acc_t>(t.at, plane, &dy, &dx);
              gy[q] += d.input * dy;
              gy[HoWo + q] += d.input * dx;
            }
          }
        }
      }
    }
  });

  // Pass B: input gradient and the per-(b, c) weight and bias partials, one task per (b, block
  // of channels in one kernel group and one offset group).
  int64_t block = std::min(cgk, cog);
  while (cgk % block != 0 || cog % block != 0) --block;  // the channels of one kernel and one offset group
  const int64_t chunk = std::min<int64_t>(block, 8);
  const int64_t chunks_per_block = (block + chunk - 1) / chunk;
  const int64_t blocks = g.C / block;
  std::vector<acc_t> weight_partial(g.B * g.C * L.size, acc_t(0));
  std::vector<acc_t> bias_partial(g.B * g.C, acc_t(0));
  acc_t* gin = grad_input.mutable_data_ptr<acc_t>();
  at::parallel_for(0, g.B * blocks * chunks_per_block, grain(chunk * kk * HoWo), [&](int64_t begin, int64_t end) {
    std::vector<KernelTap<acc_t>> ktaps;
    std::vector<InputTap<acc_t>> xtaps;
    std::vector<acc_t> masks;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (blocks * chunks_per_block), rest = task % (blocks * chunks_per_block);
      const int64_t c0 = rest / chunks_per_block * block + rest % chunks_per_block * chunk;
      const int64_t c1 = std::min(c0 + chunk, (rest / chunks_per_block + 1) * block);
      const int64_t gk = c0 / cgk, og = c0 / cog;
      const scalar_t* ko_b = ko + b * 2 * Gk * kk * HoWo;
      const scalar_t* off_b = off == nullptr ? nullptr : off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      for (int64_t ho = 0; ho < g.Ho; ++ho) {
        kernel_row<acc_t>(g, L, ko_b, gk, ho, ktaps);
        input_row<acc_t>(g, off_b, msk_b, og, ho, xtaps, masks);
        for (int64_t c = c0; c < c1; ++c) {
          const acc_t* scope = scopes.data() + c * L.size;
          acc_t* gscope = weight_partial.data() + (b * g.C + c) * L.size;
          const scalar_t* plane = HW == 0 ? &zero_pixel : in + (b * g.C + c) * HW;
          acc_t* gplane = gin + (b * g.C + c) * HW;
          const scalar_t* go_row = go + ((b * g.C + c) * g.Ho + ho) * Wo;
          acc_t bias_sum = acc_t(0);
          for (int64_t q = 0; q < Wo; ++q) bias_sum += vsr_kernels::convert<acc_t>(go_row[q]);
          bias_partial[b * g.C + c] += bias_sum;
          for (int64_t k = 0; k < kk; ++k) {
            for (int64_t q = 0; q < Wo; ++q) {
              const KernelTap<acc_t>& a = ktaps[k * Wo + q];
              const InputTap<acc_t>& t = xtaps[k * Wo + q];
              const acc_t m = masks[k * Wo + q];
              const acc_t* s = scope + a.value_base;
              const acc_t kv =
                  a.weight[0] * s[0] + a.weight[1] * s[1] + a.weight[2] * s[row] + a.weight[3] * s[row + 1] + a.poison;
              const acc_t xv = input_sample<acc_t>(t, plane);
              const TapGrad<acc_t> d = tap_grad(vsr_kernels::convert<acc_t>(go_row[q]), kv, m, xv);
              if (a.sampled) {
                acc_t* gs = gscope + a.value_base;
                gs[0] += d.kernel * a.weight[0];
                gs[1] += d.kernel * a.weight[1];
                gs[row] += d.kernel * a.weight[2];
                gs[row + 1] += d.kernel * a.weight[3];
              }
              if (t.deformed) {
                if (!t.at.sampled) continue;  // outside, or on the -1 edge: a coordinate gradient only
                for (int nb = 0; nb < 4; ++nb)
                  if (t.at.valid >> nb & 1u) gplane[t.at.offset[nb]] += d.input * t.at.weight[nb];
              } else if (t.grid >= 0) {
                gplane[t.grid] += d.input;
              }
            }
          }
        }
      }
    }
  });
  // Weight and bias gradients: the per-batch-element partials summed in order b = 0, 1, ...
  acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gb = grad_bias.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t y = 0; y < g.Sh; ++y)
      for (int64_t x = 0; x < g.Sw; ++x) {
        acc_t sum = acc_t(0);
        for (int64_t b = 0; b < g.B; ++b) sum += weight_partial[(b * g.C + c) * L.size + (y + 1) * row + x + 1];
        gw[(c * g.Sh + y) * g.Sw + x] = sum;
      }
    acc_t sum = acc_t(0);
    for (int64_t b = 0; b < g.B; ++b) sum += bias_partial[b * g.C + c];
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
