// The CPU backward of deform_kernel_conv2d (the layouts and sampling it shares with the
// forward: deform_kernel_conv2d_cpu.h).
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
#include "deform_kernel_conv2d_cpu.h"

namespace vsr_kernels {
namespace deform_kernel_conv2d {
namespace {

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
      const BatchTaps<scalar_t> taps = batch_taps(g, b, ko, off, msk);
      const acc_t* x_b = x_pad + b * XL.size * C;
      for_row_segments<true, acc_t>(ks, xs, g, taps, ho, grid_x_f.data(), [&](int64_t wo0, int len) VSR_INLINE_LAMBDA {
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
      });
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
      const BatchTaps<scalar_t> taps = batch_taps(g, b, ko, off, msk);
      const acc_t* x_b = x_pad + b * XL.size * C + c0;
      acc_t* gin_b = gin_pad + b * XL.size * C + c0;
      acc_t* gscope = weight_partial.data() + b * SL.size * C + c0;
      acc_t* bias_sum = bias_partial.data() + b * C + c0;
      for (int64_t ho = 0; ho < g.Ho; ++ho)
        for (int64_t wo0 = 0; wo0 < Wo; wo0 += kSeg) {
          const int len = static_cast<int>(std::min<int64_t>(kSeg, Wo - wo0));
          for (int64_t i = 0, k = 0; i < g.kh; ++i)
            for (int64_t j = 0; j < g.kw; ++j, ++k) {
              kernel_samples<false, acc_t>(ks[k], g, taps.kernel_offset, gk, i, j, ho * Wo + wo0, len);
              input_samples<false, acc_t>(xs[k], g, taps.offset, taps.mask, og, i, j, ho, wo0, len, grid_x_f.data());
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

}  // namespace

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

}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
