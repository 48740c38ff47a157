// Argument checks the two deformable convolutions' glue shares (glue/deform_conv2d.h,
// glue/deform_kernel_conv2d.h): the (h, w) pairs of stride, padding and dilation, the output
// size they give, the optional mask and bias, and the backward's grad_out. Each op's Geometry
// (kernels/<op>.h) has the fields B, H, W, kh, kw, stride_h/_w, pad_h/_w, dil_h/_w, Ho, Wo.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>

#include "../torch_glue.h"

namespace vsr_kernels {
namespace convolution {

// An (h, w) pair of integers in [lo, INT_MAX] (the Geometry holds them as int).
inline void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t lo) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must be a pair of integers, got ", v.size(), " values");
  for (const int64_t x : v) check_int_range(op, name, x, lo, std::numeric_limits<int>::max());
}

// Checks stride, padding and dilation and sets them in g (the kernel size kh, kw already set).
template <typename Geometry>
void set_window(const char* op, Geometry& g, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation) {
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  g.stride_h = static_cast<int>(stride[0]);
  g.stride_w = static_cast<int>(stride[1]);
  g.pad_h = static_cast<int>(padding[0]);
  g.pad_w = static_cast<int>(padding[1]);
  g.dil_h = static_cast<int>(dilation[0]);
  g.dil_w = static_cast<int>(dilation[1]);
}

// Sets g.Ho, g.Wo, refusing a dilated kernel larger than the padded input.
template <typename Geometry>
void set_output_size(const char* op, Geometry& g) {
  const int64_t eff_h = int64_t(g.dil_h) * (g.kh - 1) + 1, eff_w = int64_t(g.dil_w) * (g.kw - 1) + 1;
  const int64_t padded_h = g.H + 2 * int64_t(g.pad_h), padded_w = g.W + 2 * int64_t(g.pad_w);
  TORCH_CHECK(padded_h >= eff_h && padded_w >= eff_w, op, ": the dilated kernel (", eff_h, ", ", eff_w,
              ") does not fit the padded input (", padded_h, ", ", padded_w, ")");
  g.Ho = (padded_h - eff_h) / g.stride_h + 1;
  g.Wo = (padded_w - eff_w) / g.stride_w + 1;
}

// mask (B, groups kh kw, Ho, Wo) and bias (channels) when given, on input's device and dtype.
template <typename Geometry>
void check_mask_and_bias(const char* op, at::DeviceType device_type, const Geometry& g, const at::Tensor& input,
                         const c10::optional<at::Tensor>& mask, int64_t groups,
                         const c10::optional<at::Tensor>& bias, int64_t channels, const char* channels_name) {
  const NamedTensor in{"input", input};
  if (mask.has_value()) {
    const NamedTensor m{"mask", *mask};
    check_dim(op, m, 4);
    check_shape(op, m, {g.B, groups * g.kh * g.kw, g.Ho, g.Wo}, "(B, G kh kw, Ho, Wo) with G from offset");
    check_tensors(op, device_type, {in, m});
  }
  if (bias.has_value()) {
    const NamedTensor bi{"bias", *bias};
    check_dim(op, bi, 1);
    check_shape(op, bi, {channels}, channels_name);
    check_tensors(op, device_type, {in, bi});
  }
}

// grad_out (B, channels, Ho, Wo) on input's device and dtype.
template <typename Geometry>
void check_grad_out(const char* op, at::DeviceType device_type, const Geometry& g, const at::Tensor& grad_out,
                    const at::Tensor& input, int64_t channels, const char* what) {
  const NamedTensor go{"grad_out", grad_out};
  check_dim(op, go, 4);
  check_shape(op, go, {g.B, channels, g.Ho, g.Wo}, what);
  check_tensors(op, device_type, {{"input", input}, go});
}

}  // namespace convolution
}  // namespace vsr_kernels
