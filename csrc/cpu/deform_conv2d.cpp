// CPU launchers of deform_conv2d. No im2col buffer of the whole image: the output positions
// are cut into tiles of P consecutive positions (P chosen so a tile's column buffer stays in
// cache), each tile's bilinear samples are gathered into a (C kh kw, P) column buffer and
// multiplied by the weight with at::mm, one GEMM per group. float32 on AVX-512 CPUs (and
// planes whose offsets fit int32) takes the vectorised tile kernels and GEMMs of
// deform_conv2d_isa.h instead, in the same tiles and tasks; VSR_KERNELS_CPU_ISA=base forces
// the scalar path (cpu/isa.h).
//
// Backward, deterministic without atomics: one task per (batch element b, offset group og).
// A task owns input channels [og C/G, (og + 1) C/G) of batch element b, so no two tasks write
// the same element of grad_input (the bilinear scatter), grad_offset or grad_mask (channels of
// og), or of its batch element's slice of the weight-gradient partials (columns of those
// channels). Per tile it recomputes the samples (nothing is stored per output between forward
// and backward), takes the column gradient of its channels, weightᵀ · grad_out tile (a GEMM
// split along K, so no work is repeated), scatters it into grad_input in a fixed sequential
// order, reduces it into the offset and mask gradients, and adds grad_out tile · columnsᵀ to
// the weight gradient of batch element b. The per-batch-element weight gradients are summed in
// order b = 0, 1, ... at the end. The results are therefore bitwise identical run to run
// (for a fixed number of threads in the BLAS, which the tile GEMMs run single-threaded).
// float16 and bfloat16 are computed in float32 and rounded once to the input dtype.
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../glue/deform_conv2d.h"
#include "deform_conv2d_isa.h"
#include "isa.h"

namespace vsr_kernels {
namespace deform_conv2d {
namespace {

constexpr char kForwardOp[] = "deform_conv2d";
constexpr char kBackwardOp[] = "deform_conv2d_backward";

// The AVX-512 tile kernels (deform_conv2d_isa.h) take float32 and int32 index arithmetic:
// every plane offset (at most H W + W) and every sample coordinate's integer part
// (|ho s_h - p_h + i d_h| <= Ho s_h + p_h + kh d_h) must fit, with room to spare.
bool fits_int32(const Geometry& g) {
  constexpr int64_t kLimit = int64_t(1) << 30;
  return g.H < kLimit && g.W < kLimit && g.H * g.W + g.W < kLimit &&
         g.Ho * g.stride_h + g.pad_h + int64_t(g.kh) * g.dil_h < kLimit &&
         g.Wo * g.stride_w + g.pad_w + int64_t(g.kw) * g.dil_w < kLimit;
}

template <typename scalar_t>
bool use_avx512(const Geometry& g, const char* op) {
  return std::is_same_v<scalar_t, float> && cpu::select_isa(op) == cpu::Isa::kAvx512 && fits_int32(g);
}

// The tile kernels' arguments for positions [p0, p0 + n) of offset group og; ybase/xbase
// (n long) are filled with ho s_h - p_h and wo s_w - p_w of each position.
avx512::TileArgs tile_args(const Geometry& g, const float* offset_b, const float* mask_b, const float* planes,
                           int64_t og, int64_t p0, int64_t n, std::vector<int32_t>& ybase,
                           std::vector<int32_t>& xbase) {
  ybase.resize(n);
  xbase.resize(n);
  int64_t ho = p0 / g.Wo, wo = p0 % g.Wo;
  for (int64_t q = 0; q < n; ++q) {
    ybase[q] = static_cast<int32_t>(ho * g.stride_h - g.pad_h);
    xbase[q] = static_cast<int32_t>(wo * g.stride_w - g.pad_w);
    if (++wo == g.Wo) {
      wo = 0;
      ++ho;
    }
  }
  avx512::TileArgs a;
  a.offset = offset_b;
  a.mask = mask_b;
  a.input = planes;
  a.ybase = ybase.data();
  a.xbase = xbase.data();
  a.HoWo = g.positions();
  a.HW = g.H * g.W;
  a.p0 = p0;
  a.n = n;
  a.channels = g.offset_group_in();
  a.og = og;
  a.H = static_cast<int32_t>(g.H);
  a.W = static_cast<int32_t>(g.W);
  a.kh = g.kh;
  a.kw = g.kw;
  a.dil_h = g.dil_h;
  a.dil_w = g.dil_w;
  return a;
}

// Positions per tile: the column buffer (C kh kw rows of P values) holds about this many bytes.
constexpr int64_t kColumnBytes = 256 * 1024;

int64_t tile_positions(int64_t rows, int64_t element_bytes, int64_t positions) {
  int64_t p = kColumnBytes / std::max<int64_t>(1, rows * element_bytes);
  p = std::max<int64_t>(16, std::min<int64_t>(512, p / 16 * 16));
  return std::max<int64_t>(1, std::min(p, positions));
}

// The samples of kernel points k of offset group og at the positions [p0, p0 + n) of batch
// element b: samples[k * n + q] for position p0 + q.
template <typename acc_t, typename T>
void sample_tile(const Geometry& g, const T* offset_b, const T* mask_b, int64_t og, int64_t p0, int64_t n,
                 std::vector<Sample<acc_t>>& samples) {
  const int64_t kk = g.kernel_points(), HoWo = g.positions();
  samples.resize(kk * n);
  for (int64_t k = 0; k < kk; ++k)
    for (int64_t q = 0; q < n; ++q) {
      const int64_t p = p0 + q;
      samples[k * n + q] =
          sample_at<acc_t>(g, offset_b, HoWo, 1, mask_b, HoWo, 1, og, k, p / g.Wo, p % g.Wo, g.W, 1);
    }
}

// A sample as the column gather reads it: the four neighbours' offsets and weights with the
// mask folded in (an absent neighbour: offset 0 and its bit of `valid` clear, never read).
template <typename acc_t>
struct Tap {
  int64_t offset[4];
  acc_t weight[4];
  unsigned valid;
};

// The taps of kernel points k of offset group og at the positions [p0, p0 + n) of batch
// element b, with the mask folded into the weights: sample_at's arithmetic without building a
// Sample per point (positions walked incrementally, no division per point).
template <typename acc_t, typename T>
void forward_taps(const Geometry& g, const T* offset_b, const T* mask_b, int64_t og, int64_t p0, int64_t n,
                  std::vector<Tap<acc_t>>& taps) {
  const int64_t kk = g.kernel_points(), HoWo = g.positions();
  taps.resize(kk * n);
  for (int64_t k = 0; k < kk; ++k) {
    const int64_t cy = offset_channel_y(g, og, k);
    const T* oy = offset_b + cy * HoWo;
    const T* ox = oy + HoWo;
    const T* om = mask_b == nullptr ? nullptr : mask_b + mask_channel(g, og, k) * HoWo;
    int64_t ho = p0 / g.Wo, wo = p0 % g.Wo;
    for (int64_t q = 0; q < n; ++q) {
      const int64_t p = p0 + q;
      acc_t y, x;
      sample_point(g, k, ho, wo, vsr_kernels::convert<acc_t>(oy[p]), vsr_kernels::convert<acc_t>(ox[p]), &y, &x);
      const acc_t m = om == nullptr ? acc_t(1) : vsr_kernels::convert<acc_t>(om[p]);
      Tap<acc_t>& t = taps[k * n + q];
      if (++wo == g.Wo) {
        wo = 0;
        ++ho;
      }
      // The shared sampler (inlined: its coordinate gradients are never read here).
      const Bilinear<acc_t> at = bilinear(y, x, g.H, g.W, g.W, 1);
      // Not sampled (outside, or on the -1 edge): weights 0 (NaN for a NaN coordinate), nothing read.
      t.valid = at.sampled ? at.valid : 0u;
      for (int nb = 0; nb < 4; ++nb) {
        t.offset[nb] = at.offset[nb];
        t.weight[nb] = at.sampled ? m * at.weight[nb] : at.poison * m;
      }
    }
  }
}

// col[(c kk + k) n + q] = the modulated sample of tap (k, q) in channel c's plane, for the
// channels c in [0, channels) of one offset group (planes HW apart): each tap is read once
// and reused across the group's channels. Branch-free: an absent neighbour reads plane[0]
// (in bounds) and is replaced by 0 before its weight multiplies it.
template <typename acc_t, typename T>
void gather_group(const Tap<acc_t>* taps, const T* planes, int64_t HW, int64_t channels, int64_t kk,
                  acc_t* col, int64_t n) {
  for (int64_t k = 0; k < kk; ++k)
    for (int64_t q = 0; q < n; ++q) {
      const Tap<acc_t>& t = taps[k * n + q];
      const int64_t o0 = t.offset[0], o1 = t.offset[1], o2 = t.offset[2], o3 = t.offset[3];
      const acc_t w0 = t.weight[0], w1 = t.weight[1], w2 = t.weight[2], w3 = t.weight[3];
      const bool v0 = t.valid & 1u, v1 = t.valid >> 1 & 1u, v2 = t.valid >> 2 & 1u, v3 = t.valid >> 3 & 1u;
      const T* plane = planes;
      acc_t* dst = col + k * n + q;
      for (int64_t c = 0; c < channels; ++c, plane += HW, dst += kk * n) {
        const acc_t x0 = static_cast<acc_t>(plane[o0]), x1 = static_cast<acc_t>(plane[o1]);
        const acc_t x2 = static_cast<acc_t>(plane[o2]), x3 = static_cast<acc_t>(plane[o3]);
        acc_t v = acc_t(0);
        v += w0 * (v0 ? x0 : acc_t(0));
        v += w1 * (v1 ? x1 : acc_t(0));
        v += w2 * (v2 ? x2 : acc_t(0));
        v += w3 * (v3 ? x3 : acc_t(0));
        *dst = v;
      }
    }
}

template <typename scalar_t>
at::Tensor forward_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& offset,
                        const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), HW = g.H * g.W;
  const int64_t cin_g = g.group_in(), cout_g = g.group_out(), cpg = g.offset_group_in();
  const int64_t rows = g.C * kk;
  at::Tensor out_acc_all = at::empty({g.B, g.Cout, HoWo}, acc);
  if (g.B == 0 || HoWo == 0) return out_acc_all.view({g.B, g.Cout, g.Ho, g.Wo});
  const at::Tensor w = weight.detach().to(acc).contiguous().view({g.Cout, cin_g * kk});
  const at::Tensor bias_acc = bias.defined() ? bias.to(acc).contiguous() : at::Tensor();
  const int64_t P = tile_positions(rows, sizeof(acc_t), HoWo);
  const int64_t tiles = (HoWo + P - 1) / P;
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* off = offset.const_data_ptr<scalar_t>();
  const scalar_t* msk = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
  const bool vectorised = use_avx512<scalar_t>(g, kForwardOp);
  at::parallel_for(0, g.B * tiles, 1, [&](int64_t begin, int64_t end) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet{c10::DispatchKey::AutocastCPU});
    at::Tensor col_buffer = at::empty({rows * P}, acc);
    at::Tensor out_buffer = vectorised ? at::Tensor() : at::empty({g.Cout * P}, acc);
    std::vector<Tap<acc_t>> taps;
    std::vector<int32_t> ybase, xbase;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, p0 = task % tiles * P, n = std::min(P, HoWo - p0);
      acc_t* col = col_buffer.data_ptr<acc_t>();
      const scalar_t* in_b = in + b * g.C * HW;
      const scalar_t* off_b = off + b * 2 * g.offset_groups * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * g.offset_groups * kk * HoWo;
      for (int64_t og = 0; og < g.offset_groups; ++og) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (vectorised) {
            avx512::forward_columns(tile_args(g, off_b, msk_b, in_b + og * cpg * HW, og, p0, n, ybase, xbase),
                                    col + og * cpg * kk * n);
            continue;
          }
        }
        forward_taps<acc_t>(g, off_b, msk_b, og, p0, n, taps);
        gather_group(taps.data(), in_b + og * cpg * HW, HW, cpg, kk, col + og * cpg * kk * n, n);
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (vectorised) {  // out = w · columns + bias, straight into the output, per group
          for (int64_t gr = 0; gr < g.groups; ++gr)
            avx512::gemm(cout_g, n, cin_g * kk, w.const_data_ptr<float>() + gr * cout_g * cin_g * kk, cin_g * kk, 1,
                         col + gr * cin_g * kk * n, n,
                         out_acc_all.data_ptr<float>() + (b * g.Cout + gr * cout_g) * HoWo + p0, HoWo,
                         bias_acc.defined() ? bias_acc.const_data_ptr<float>() + gr * cout_g : nullptr, false);
          continue;
        }
      }
      const at::Tensor cols = col_buffer.narrow(0, 0, rows * n).view({g.C * kk, n});
      at::Tensor tile = out_buffer.narrow(0, 0, g.Cout * n).view({g.Cout, n});
      for (int64_t gr = 0; gr < g.groups; ++gr) {
        tile.narrow(0, gr * cout_g, cout_g).copy_(at::mm(w.narrow(0, gr * cout_g, cout_g),
                                                         cols.narrow(0, gr * cin_g * kk, cin_g * kk)));
      }
      acc_t* dst = out_acc_all.data_ptr<acc_t>() + b * g.Cout * HoWo + p0;
      const acc_t* src = tile.const_data_ptr<acc_t>();
      const acc_t* bi = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
      for (int64_t co = 0; co < g.Cout; ++co) {
        const acc_t add = bi == nullptr ? acc_t(0) : bi[co];
        for (int64_t q = 0; q < n; ++q) dst[co * HoWo + q] = src[co * n + q] + add;
      }
    }
  });
  return out_acc_all.view({g.B, g.Cout, g.Ho, g.Wo});
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  // The tile GEMMs are internal: no autograd graph through them (the op's autograd is registered in Python).
  const at::NoGradGuard no_grad;
  // Inside torch.autocast the tile GEMMs must stay in the accumulation dtype.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet{c10::DispatchKey::AutocastCPU});
  const Geometry g = check_forward(at::kCPU, input, offset, weight, mask, bias, stride, padding, dilation);
  at::Tensor out;
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor bi = bias.has_value() ? *bias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_cpu", [&] {
    out = forward_impl<scalar_t>(g, input.contiguous(), offset.contiguous(), weight, m, bi);
  });
  return to_contiguous(out, input.scalar_type());
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Geometry& g, const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const at::Tensor& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), HW = g.H * g.W;
  const int64_t cin_g = g.group_in(), cout_g = g.group_out(), cpg = g.offset_group_in();
  const int64_t G = g.offset_groups;
  at::Tensor grad_input = at::zeros({g.B, g.C, g.H, g.W}, acc);
  at::Tensor grad_offset = at::empty({g.B, 2 * G * kk, g.Ho, g.Wo}, acc);
  at::Tensor grad_mask = mask.defined() ? at::empty({g.B, G * kk, g.Ho, g.Wo}, acc) : at::empty({0}, acc);
  at::Tensor grad_weight_b = at::zeros({std::max<int64_t>(g.B, 1), g.Cout, cin_g * kk}, acc);
  const at::Tensor go = grad_out.detach().to(acc).contiguous().view({g.B, g.Cout, HoWo});
  at::Tensor grad_bias = g.B * HoWo == 0 ? at::zeros({g.Cout}, acc) : go.sum(at::IntArrayRef{0, 2});
  if (g.B == 0 || HoWo == 0 || g.C == 0) {
    grad_offset.zero_();
    grad_mask.zero_();
    return {grad_input, grad_offset, grad_weight_b.sum(0), grad_mask, grad_bias};
  }
  const at::Tensor w = weight.detach().to(acc).contiguous().view({g.Cout, cin_g * kk});
  const int64_t P = tile_positions(cpg * kk, sizeof(acc_t), HoWo);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* off = offset.const_data_ptr<scalar_t>();
  const scalar_t* msk = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
  const bool vectorised = use_avx512<scalar_t>(g, kBackwardOp);
  // The channels [c_begin, c_begin + cpg) of an offset group, cut where a weight group ends:
  // per segment, its column gradient wᵀ · grad_out (a GEMM split along K) ...
  const auto column_gradient = [&](at::Tensor& grad_col, const at::Tensor& go_b, int64_t c_begin, int64_t p0,
                                   int64_t n) {
    for (int64_t c0 = c_begin; c0 < c_begin + cpg;) {
      const int64_t gr = c0 / cin_g, c1 = std::min(c_begin + cpg, (gr + 1) * cin_g);
      const int64_t cols0 = (c0 - gr * cin_g) * kk, ncols = (c1 - c0) * kk;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (vectorised) {
          avx512::gemm(ncols, n, cout_g, w.const_data_ptr<float>() + gr * cout_g * cin_g * kk + cols0, 1, cin_g * kk,
                       go_b.const_data_ptr<float>() + gr * cout_g * HoWo + p0, HoWo,
                       grad_col.data_ptr<float>() + (c0 - c_begin) * kk * n, n, nullptr, false);
          c0 = c1;
          continue;
        }
      }
      at::Tensor gc = grad_col.narrow(0, (c0 - c_begin) * kk, ncols);
      at::mm_out(gc, w.narrow(0, gr * cout_g, cout_g).narrow(1, cols0, ncols).t(),
                 go_b.narrow(0, gr * cout_g, cout_g).narrow(1, p0, n));
      c0 = c1;
    }
  };
  // ... and its weight gradient grad_out · (mask val)ᵀ, added to gw_b.
  const auto weight_gradient = [&](at::Tensor& gw_b, const at::Tensor& go_b, const at::Tensor& val, int64_t c_begin,
                                   int64_t p0, int64_t n) {
    for (int64_t c0 = c_begin; c0 < c_begin + cpg;) {
      const int64_t gr = c0 / cin_g, c1 = std::min(c_begin + cpg, (gr + 1) * cin_g);
      const int64_t cols0 = (c0 - gr * cin_g) * kk, ncols = (c1 - c0) * kk;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (vectorised) {
          avx512::gemm_dot_accumulate(cout_g, ncols, n, go_b.const_data_ptr<float>() + gr * cout_g * HoWo + p0, HoWo,
                                      val.const_data_ptr<float>() + (c0 - c_begin) * kk * n, n,
                                      gw_b.data_ptr<float>() + gr * cout_g * cin_g * kk + cols0, cin_g * kk);
          c0 = c1;
          continue;
        }
      }
      at::Tensor gw = gw_b.narrow(0, gr * cout_g, cout_g).narrow(1, cols0, ncols);
      gw.addmm_(go_b.narrow(0, gr * cout_g, cout_g).narrow(1, p0, n), val.narrow(0, (c0 - c_begin) * kk, ncols).t());
      c0 = c1;
    }
  };
  at::parallel_for(0, g.B * G, 1, [&](int64_t begin, int64_t end) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet{c10::DispatchKey::AutocastCPU});
    std::vector<int32_t> ybase, xbase;
    std::vector<float> scratch(vectorised ? cpg * 64 : 0);  // the AVX-512 scatter's values
    at::Tensor val_buffer = at::empty({cpg * kk * P}, acc);
    at::Tensor grad_col_buffer = at::empty({cpg * kk * P}, acc);
    std::vector<Sample<acc_t>> samples;
    std::vector<acc_t> gy(kk * P), gx(kk * P), gm(kk * P);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, og = task % G, c_begin = og * cpg;
      const scalar_t* in_b = in + b * g.C * HW;
      const scalar_t* off_b = off + b * 2 * G * kk * HoWo;
      const scalar_t* msk_b = msk == nullptr ? nullptr : msk + b * G * kk * HoWo;
      acc_t* gin_b = grad_input.data_ptr<acc_t>() + b * g.C * HW;
      acc_t* goff_b = grad_offset.data_ptr<acc_t>() + b * 2 * G * kk * HoWo;
      acc_t* gmsk_b = msk == nullptr ? nullptr : grad_mask.data_ptr<acc_t>() + b * G * kk * HoWo;
      at::Tensor gw_b = grad_weight_b[b];
      const at::Tensor go_b = go[b];
      for (int64_t p0 = 0; p0 < HoWo; p0 += P) {
        const int64_t n = std::min(P, HoWo - p0);
        at::Tensor val = val_buffer.narrow(0, 0, cpg * kk * n).view({cpg * kk, n});
        at::Tensor grad_col = grad_col_buffer.narrow(0, 0, cpg * kk * n).view({cpg * kk, n});
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (vectorised) {
            column_gradient(grad_col, go_b, c_begin, p0, n);
            avx512::backward_tile(tile_args(g, off_b, msk_b, in_b + c_begin * HW, og, p0, n, ybase, xbase),
                                  grad_col.const_data_ptr<float>(), val.data_ptr<float>(), goff_b, gmsk_b,
                                  gin_b + c_begin * HW, scratch.data());
            weight_gradient(gw_b, go_b, val, c_begin, p0, n);
            continue;
          }
        }
        sample_tile<acc_t>(g, off_b, msk_b, og, p0, n, samples);
        acc_t* v = val.data_ptr<acc_t>();
        for (int64_t c = 0; c < cpg; ++c) {
          const scalar_t* plane = in_b + (c_begin + c) * HW;
          for (int64_t k = 0; k < kk; ++k) {
            acc_t* row = v + (c * kk + k) * n;
            const Sample<acc_t>* s = samples.data() + k * n;
            for (int64_t q = 0; q < n; ++q) row[q] = bilinear_sample<acc_t>(s[q].at, plane);
          }
        }
        // The column gradient of og's channels (its weight gradient after the scatter).
        column_gradient(grad_col, go_b, c_begin, p0, n);
        // Offset and mask gradients of the tile, and the scatter into grad_input, in order.
        std::fill(gy.begin(), gy.begin() + kk * n, acc_t(0));
        std::fill(gx.begin(), gx.begin() + kk * n, acc_t(0));
        std::fill(gm.begin(), gm.begin() + kk * n, acc_t(0));
        const acc_t* gcol = grad_col.const_data_ptr<acc_t>();
        for (int64_t c = 0; c < cpg; ++c) {
          const scalar_t* plane = in_b + (c_begin + c) * HW;
          acc_t* gplane = gin_b + (c_begin + c) * HW;
          for (int64_t k = 0; k < kk; ++k) {
            const acc_t* grow = gcol + (c * kk + k) * n;
            acc_t* vrow = v + (c * kk + k) * n;
            const Sample<acc_t>* s = samples.data() + k * n;
            for (int64_t q = 0; q < n; ++q) {
              const Sample<acc_t>& sq = s[q];
              const acc_t gcv = grow[q];
              gm[k * n + q] += gcv * vrow[q];
              vrow[q] *= sq.mask;  // the forward's column, for the weight gradient below
              if (sq.at.valid == 0 && sq.at.poison == acc_t(0)) continue;
              const acc_t gs = gcv * sq.mask;
              acc_t dy, dx;
              bilinear_coordinate_grad<acc_t>(sq.at, plane, &dy, &dx);
              gy[k * n + q] += gs * dy;
              gx[k * n + q] += gs * dx;
              if (!sq.at.sampled) continue;  // on the -1 edge: a coordinate gradient only
              for (int nb = 0; nb < 4; ++nb)
                if (sq.at.valid >> nb & 1u) gplane[sq.at.offset[nb]] += gs * sq.at.weight[nb];
            }
          }
        }
        for (int64_t k = 0; k < kk; ++k) {
          acc_t* oy = goff_b + offset_channel_y(g, og, k) * HoWo + p0;
          acc_t* ox = oy + HoWo;
          for (int64_t q = 0; q < n; ++q) {
            oy[q] = gy[k * n + q];
            ox[q] = gx[k * n + q];
          }
          if (gmsk_b != nullptr) {
            acc_t* om = gmsk_b + mask_channel(g, og, k) * HoWo + p0;
            for (int64_t q = 0; q < n; ++q) om[q] = gm[k * n + q];
          }
        }
        weight_gradient(gw_b, go_b, val, c_begin, p0, n);
      }
    }
  });
  // Weight gradient: the per-batch-element partials summed in order.
  at::Tensor grad_weight = grad_weight_b[0].clone();
  for (int64_t b = 1; b < g.B; ++b) grad_weight.add_(grad_weight_b[b]);
  return {grad_input, grad_offset, grad_weight, grad_mask, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::NoGradGuard no_grad;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet{c10::DispatchKey::AutocastCPU});
  const Geometry g =
      check_backward(at::kCPU, grad_out, input, offset, weight, mask, bias, stride, padding, dilation);
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    r = backward_impl<scalar_t>(g, grad_out, input.contiguous(), offset.contiguous(), weight, m);
  });
  const auto dtype = input.scalar_type();
  auto& [gi, goff, gw, gm, gb] = r;
  return {to_contiguous(gi, dtype), to_contiguous(goff, dtype), to_contiguous(gw.view(weight.sizes()), dtype),
          to_contiguous(gm, dtype), to_contiguous(gb, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CPU, m) {
  m.impl("deform_conv2d", &forward_cpu);
  m.impl("deform_conv2d_backward", &backward_cpu);
}

}  // namespace deform_conv2d
}  // namespace vsr_kernels
