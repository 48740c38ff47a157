// The CPU forward of deform_kernel_conv2d and the op's CPU registration (the layouts and
// sampling it shares with the backward: deform_kernel_conv2d_cpu.h).
//
// Forward: one task per (batch element b, output row); a row's (Wo, C) accumulator stays in
// cache and is written out channels-first.
#include <torch/library.h>

#include "deform_kernel_conv2d_cpu.h"

namespace vsr_kernels {
namespace deform_kernel_conv2d {
namespace {

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

template <bool kDeformed, typename scalar_t>
at::Tensor forward_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                        const at::Tensor& kernel_offset, const at::Tensor& offset, const at::Tensor& mask,
                        const at::Tensor& bias) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, input.options());
  if (out.numel() == 0) return out;
  cpu::advise_huge_pages(out);
  const Padded SL(g.Sh, g.Sw), XL(g.H, g.W);
  const int64_t kk = g.kernel_points(), Wo = g.Wo, C = g.C;
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
      const BatchTaps<scalar_t> taps = batch_taps(g, b, ko, off, msk);
      const acc_t* x_b = x_pad + b * XL.size * C;
      for_row_segments<false, acc_t>(ks, xs, g, taps, ho, grid_x_f.data(), [&](int64_t wo0, int len) VSR_INLINE_LAMBDA {
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
      });
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

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CPU, m) {
  m.impl("deform_kernel_conv2d", &forward_cpu);
  m.impl("deform_kernel_conv2d_backward", &backward_cpu);
}

}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
