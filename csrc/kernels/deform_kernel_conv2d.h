// Torch-free per-point math of deform_kernel_conv2d (depthwise deformable-kernel convolution,
// Gao et al., ICLR 2020; DKSAN's DKC), shared by the CPU launcher (cpu/deform_kernel_conv2d.cpp)
// and the CUDA kernels (cuda/deform_kernel_conv2d.cuh). Both samplings, of the kernel scope and
// of the input, are common/bilinear.h's (torchvision's deformable-conv rule), reused as is.
//
//   out[b, c, p] = bias[c] + sum_k  scope_c(ky, kx) * m(p, k) * X_c(y, x)
//   ky = i + (Sh - kh) / 2 + dky,  kx = j + (Sw - kw) / 2 + dkx     (kernel group of c)
//   y = ho sh - ph + i dh + dy,     x = wo sw - pw + j dw + dx      (offset group of c)
//
// Without an input offset the input is read at the grid point itself (zero outside, no
// neighbour read: what F.unfold does), so a NaN pixel reaches only the outputs whose taps
// cover it.
#pragma once

#include <cstdint>

#include "../common/bilinear.h"
#include "../common/host_device.h"

namespace vsr_kernels {
namespace deform_kernel_conv2d {

// Sizes and hyper-parameters. input (B, C, H, W); weight (C, 1, Sh, Sw), the kernel scope;
// kernel_offset (B, 2 Gk kh kw, Ho, Wo); offset (B, 2 G kh kw, Ho, Wo) or none; mask
// (B, G kh kw, Ho, Wo) or none; out (B, C, Ho, Wo). Set only by glue/deform_kernel_conv2d.h
// after checking every value fits.
struct Geometry {
  int64_t B, C, H, W, Ho, Wo, Sh, Sw;
  int64_t kernel_groups, offset_groups;
  int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;

  VSR_HOST_DEVICE int64_t kernel_points() const { return int64_t(kh) * kw; }
  VSR_HOST_DEVICE int64_t positions() const { return Ho * Wo; }
  VSR_HOST_DEVICE int64_t kernel_group_channels() const { return C / kernel_groups; }
  VSR_HOST_DEVICE int64_t offset_group_channels() const { return C / offset_groups; }
  VSR_HOST_DEVICE int64_t kernel_group_of(int64_t c) const { return c / kernel_group_channels(); }
  VSR_HOST_DEVICE int64_t offset_group_of(int64_t c) const { return c / offset_group_channels(); }
};

// The largest kernel side, stride, padding and dilation the kernels take: they are int.
constexpr int64_t kMaxInt = 2147483647;

// Channels of the per-tap tensors: (dy, dx) of tap k of group g are channels 2 (g kh kw + k)
// and 2 (g kh kw + k) + 1 (kernel_offset and offset alike); its mask is channel g kh kw + k.
VSR_HOST_DEVICE int64_t pair_channel(const Geometry& g, int64_t group, int64_t k) {
  return 2 * (group * g.kernel_points() + k);
}
VSR_HOST_DEVICE int64_t mask_channel(const Geometry& g, int64_t group, int64_t k) {
  return group * g.kernel_points() + k;
}

// Where tap (i, j) reads the kernel scope, displaced by (dky, dkx):
// (i + (Sh - kh) / 2 + dky, j + (Sw - kw) / 2 + dkx); a half-integer centre when Sh - kh is odd.
template <typename acc_t>
VSR_HOST_DEVICE void kernel_point(const Geometry& g, int64_t i, int64_t j, acc_t dky, acc_t dkx, acc_t* ky,
                                  acc_t* kx) {
  *ky = (acc_t(i) + acc_t(g.Sh - g.kh) * acc_t(0.5)) + dky;
  *kx = (acc_t(j) + acc_t(g.Sw - g.kw) * acc_t(0.5)) + dkx;
}

// The same for tap k = i kw + j.
template <typename acc_t>
VSR_HOST_DEVICE void kernel_point(const Geometry& g, int64_t k, acc_t dky, acc_t dkx, acc_t* ky, acc_t* kx) {
  kernel_point(g, k / g.kw, k % g.kw, dky, dkx, ky, kx);
}

// The grid point of tap row i at output row ho (grid_y) and of tap column j at output column
// wo (grid_x), before any input offset.
VSR_HOST_DEVICE int64_t grid_y(const Geometry& g, int64_t i, int64_t ho) {
  return ho * g.stride_h - g.pad_h + i * g.dil_h;
}
VSR_HOST_DEVICE int64_t grid_x(const Geometry& g, int64_t j, int64_t wo) {
  return wo * g.stride_w - g.pad_w + j * g.dil_w;
}

// The input point of tap (i, j) at output (ho, wo), displaced by (dy, dx).
template <typename acc_t>
VSR_HOST_DEVICE void input_point(const Geometry& g, int64_t i, int64_t j, int64_t ho, int64_t wo, acc_t dy, acc_t dx,
                                 acc_t* y, acc_t* x) {
  *y = acc_t(grid_y(g, i, ho)) + dy;
  *x = acc_t(grid_x(g, j, wo)) + dx;
}

// The kernel-scope sample of one tap at one output position: the bilinear neighbours in an
// (Sh, Sw) scope stored row-major (the weight of one channel).
template <typename acc_t>
VSR_HOST_DEVICE Bilinear<acc_t> scope_sampler(const Geometry& g, acc_t ky, acc_t kx) {
  return bilinear(ky, kx, g.Sh, g.Sw, g.Sw, 1);
}

// The input sample of one tap: bilinear at a deformed point, or the grid point itself.
template <typename acc_t>
struct InputTap {
  Bilinear<acc_t> at;  // with an offset
  int64_t grid;        // without an offset: the pixel y W + x, or -1 outside the input
  bool deformed;
};

// The input tap of tap (i, j) at output (ho, wo), displaced by (dy, dx) when deformed.
template <typename acc_t>
VSR_HOST_DEVICE InputTap<acc_t> input_tap(const Geometry& g, bool deformed, int64_t i, int64_t j, int64_t ho,
                                          int64_t wo, acc_t dy, acc_t dx) {
  InputTap<acc_t> t;
  t.deformed = deformed;
  t.grid = -1;
  t.at = Bilinear<acc_t>{};
  if (deformed) {
    acc_t y, x;
    input_point(g, i, j, ho, wo, dy, dx, &y, &x);
    t.at = bilinear(y, x, g.H, g.W, g.W, 1);
  } else {
    const int64_t y = grid_y(g, i, ho), x = grid_x(g, j, wo);
    if (y >= 0 && y < g.H && x >= 0 && x < g.W) t.grid = y * g.W + x;
  }
  return t;
}

// The same for tap k = i kw + j.
template <typename acc_t>
VSR_HOST_DEVICE InputTap<acc_t> input_tap(const Geometry& g, bool deformed, int64_t k, int64_t ho, int64_t wo,
                                          acc_t dy, acc_t dx) {
  return input_tap(g, deformed, k / g.kw, k % g.kw, ho, wo, dy, dx);
}

// The input sample of tap t in the plane `plane` (an (H, W) channel, row-major).
template <typename acc_t, typename T>
VSR_HOST_DEVICE acc_t input_sample(const InputTap<acc_t>& t, const T* plane) {
  if (t.deformed) return bilinear_sample<acc_t>(t.at, plane);
  return t.grid < 0 ? acc_t(0) : vsr_kernels::convert<acc_t>(plane[t.grid]);
}

// The gradient terms of one (channel, tap, position): with go = d loss / d out, kv the kernel
// sample, m the mask, xv the input sample,
//   d / d xv = go kv m   (scattered to the input by the input sample's bilinear weights),
//   d / d kv = go m xv   (scattered to the scope by the kernel sample's weights, and times the
//                         kernel sample's coordinate gradient: the kernel-offset gradient),
//   d / d m  = go kv xv  (summed over the offset group's channels: the mask gradient),
// and the input-offset gradient go kv m d xv / d (y, x), summed over the offset group.
template <typename acc_t>
struct TapGrad {
  acc_t input;   // d / d xv
  acc_t kernel;  // d / d kv
  acc_t mask;    // d / d m
};

template <typename acc_t>
VSR_HOST_DEVICE TapGrad<acc_t> tap_grad(acc_t go, acc_t kv, acc_t m, acc_t xv) {
  return {go * kv * m, go * m * xv, go * kv * xv};
}

}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
