// Torch-free per-point math of deform_conv2d (modulated deformable convolution, DCNv2, with
// torchvision.ops.deform_conv2d's semantics), shared by the CPU launcher
// (cpu/deform_conv2d.cpp) and the CUDA kernels (cuda/deform_conv2d.cuh). The bilinear
// sampling itself is op-independent: common/bilinear.h.
#pragma once

#include <cstdint>

#include "../common/bilinear.h"
#include "../common/host_device.h"

namespace vsr_kernels {
namespace deform_conv2d {

// Sizes and hyper-parameters. input (B, C, H, W); weight (Cout, C / groups, kh, kw);
// offset (B, 2 * offset_groups * kh * kw, Ho, Wo); mask (B, offset_groups * kh * kw, Ho, Wo);
// out (B, Cout, Ho, Wo). Set only by glue/deform_conv2d.h after checking every value fits.
struct Geometry {
  int64_t B, C, H, W, Cout, Ho, Wo;
  int64_t groups, offset_groups;
  int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;

  VSR_HOST_DEVICE int64_t kernel_points() const { return int64_t(kh) * kw; }
  VSR_HOST_DEVICE int64_t group_in() const { return C / groups; }          // input channels per group
  VSR_HOST_DEVICE int64_t group_out() const { return Cout / groups; }      // output channels per group
  VSR_HOST_DEVICE int64_t offset_group_in() const { return C / offset_groups; }  // channels per offset group
  VSR_HOST_DEVICE int64_t positions() const { return Ho * Wo; }
};

// The largest kernel side, stride, padding and dilation the kernels take: they are int.
constexpr int64_t kMaxInt = 2147483647;

// Channel offsets (in elements) of an offset/mask tensor: (dy, dx) of kernel point k of
// offset group g are channels 2 (g kh kw + k) and 2 (g kh kw + k) + 1; its mask is channel g kh kw + k.
VSR_HOST_DEVICE int64_t offset_channel_y(const Geometry& g, int64_t og, int64_t k) {
  return 2 * (og * g.kernel_points() + k);
}
VSR_HOST_DEVICE int64_t mask_channel(const Geometry& g, int64_t og, int64_t k) {
  return og * g.kernel_points() + k;
}

// The sampling point of kernel point k = i * kw + j at output (ho, wo), displaced by (dy, dx):
// (ho s_h - p_h + i d_h + dy, wo s_w - p_w + j d_w + dx).
template <typename acc_t>
VSR_HOST_DEVICE void sample_point(const Geometry& g, int64_t k, int64_t ho, int64_t wo, acc_t dy, acc_t dx,
                                  acc_t* y, acc_t* x) {
  const int64_t i = k / g.kw, j = k % g.kw;
  *y = acc_t(ho * g.stride_h - g.pad_h + i * g.dil_h) + dy;
  *x = acc_t(wo * g.stride_w - g.pad_w + j * g.dil_w) + dx;
}

// One kernel point at one output position: its bilinear neighbours (in an (H, W) plane of
// strides row_stride, col_stride) and its mask value.
template <typename acc_t>
struct Sample {
  Bilinear<acc_t> at;
  acc_t mask;
};

// The sample of kernel point k of offset group og at output (ho, wo): offset and mask are the
// (batch element's) planes' starting pointers, with channel stride oc / mc and position stride
// op / mp (a position p = ho * Wo + wo); mask may be null (all ones).
template <typename acc_t, typename T>
VSR_HOST_DEVICE Sample<acc_t> sample_at(const Geometry& g, const T* offset, int64_t oc, int64_t op, const T* mask,
                                        int64_t mc, int64_t mp, int64_t og, int64_t k, int64_t ho, int64_t wo,
                                        int64_t row_stride, int64_t col_stride) {
  const int64_t p = ho * g.Wo + wo;
  const int64_t cy = offset_channel_y(g, og, k);
  const acc_t dy = vsr_kernels::convert<acc_t>(offset[cy * oc + p * op]);
  const acc_t dx = vsr_kernels::convert<acc_t>(offset[(cy + 1) * oc + p * op]);
  acc_t y, x;
  sample_point(g, k, ho, wo, dy, dx, &y, &x);
  Sample<acc_t> s;
  s.at = bilinear(y, x, g.H, g.W, row_stride, col_stride);
  s.mask = mask == nullptr ? acc_t(1) : vsr_kernels::convert<acc_t>(mask[mask_channel(g, og, k) * mc + p * mp]);
  return s;
}

}  // namespace deform_conv2d
}  // namespace vsr_kernels
