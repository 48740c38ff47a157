// The torch side of deform_kernel_conv2d shared by its CPU entry points
// (cpu/deform_kernel_conv2d.cpp) and its CUDA entry points (cuda_glue/deform_kernel_conv2d.cpp):
// argument checks and the Geometry the kernels take. A direct torch.ops.vsr_kernels call
// bypasses the Python checks, so every size the kernels index by is refused here when it
// disagrees, in both directions.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

#include "../kernels/deform_kernel_conv2d.h"
#include "../torch_glue.h"
#include "convolution.h"

namespace vsr_kernels {
namespace deform_kernel_conv2d {

constexpr const char* kForwardOp = "vsr_kernels.deform_kernel_conv2d";
constexpr const char* kBackwardOp = "vsr_kernels.deform_kernel_conv2d_backward";

// The largest kernel scope (Sh + 3) (Sw + 2) the kernels index with 32-bit scope offsets.
constexpr int64_t kMaxScope = int64_t(1) << 30;

// The groups of a per-tap tensor: its dim 1 is a positive multiple of `per_group` and the
// group count divides the input channels.
inline int64_t groups_of(const char* op, const char* name, const at::Tensor& t, int64_t per_group, int64_t C) {
  const int64_t n = t.size(1);
  TORCH_CHECK(n > 0 && n % per_group == 0, op, ": ", name, " channels (", n, ", shape ", t.sizes(),
              ") must be a positive multiple of ", per_group, " (per group)");
  const int64_t groups = n / per_group;
  TORCH_CHECK(C % groups == 0, op, ": input channels (", C, ") must be divisible by the groups of ", name, " (",
              groups, " = ", n, " / ", per_group, ")");
  return groups;
}

// Checks every argument the forward and backward share and returns the geometry. input
// (B, C, H, W), weight (C, 1, Sh, Sw), kernel_offset (B, 2 Gk kh kw, Ho, Wo), offset
// (B, 2 G kh kw, Ho, Wo) or none, mask (B, G kh kw, Ho, Wo) or none (G from offset, else
// from mask), bias (C) or none.
inline Geometry check_geometry(const char* op, at::DeviceType device_type, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& kernel_offset,
                               const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const NamedTensor in{"input", input}, wt{"weight", weight}, ko{"kernel_offset", kernel_offset};
  check_dim(op, in, 4);
  check_dim(op, wt, 4);
  check_dim(op, ko, 4);
  convolution::check_pair(op, "kernel_size", kernel_size, 1);
  Geometry g;
  g.B = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.kh = static_cast<int>(kernel_size[0]);
  g.kw = static_cast<int>(kernel_size[1]);
  convolution::set_window(op, g, stride, padding, dilation);
  TORCH_CHECK(g.C >= 1, op, ": input needs at least one channel, got shape ", input.sizes());
  TORCH_CHECK(weight.size(0) == g.C && weight.size(1) == 1, op, ": weight must have shape (C, 1, Sh, Sw) = (", g.C,
              ", 1, Sh, Sw) (depthwise: one kernel scope per input channel), got ", weight.sizes());
  g.Sh = weight.size(2);
  g.Sw = weight.size(3);
  TORCH_CHECK(g.Sh >= g.kh && g.Sw >= g.kw, op, ": weight's kernel scope (Sh, Sw) = (", g.Sh, ", ", g.Sw,
              ") must be at least kernel_size (", g.kh, ", ", g.kw, "), got weight of shape ", weight.sizes());
  TORCH_CHECK(g.Sh <= kMaxScope && g.Sw <= kMaxScope && (g.Sh + 3) * (g.Sw + 2) <= kMaxScope, op,
              ": weight's kernel scope (", g.Sh, ", ", g.Sw, ") is too large");
  convolution::set_output_size(op, g);
  const int64_t kk = g.kernel_points();
  g.kernel_groups = groups_of(op, "kernel_offset", kernel_offset, 2 * kk, g.C);
  check_shape(op, ko, {g.B, 2 * g.kernel_groups * kk, g.Ho, g.Wo}, "(B, 2 Gk kh kw, Ho, Wo)");
  g.offset_groups = 1;
  if (offset.has_value()) {
    const NamedTensor off{"offset", *offset};
    check_dim(op, off, 4);
    g.offset_groups = groups_of(op, "offset", *offset, 2 * kk, g.C);
    check_shape(op, off, {g.B, 2 * g.offset_groups * kk, g.Ho, g.Wo}, "(B, 2 G kh kw, Ho, Wo)");
  }
  if (mask.has_value()) {
    check_dim(op, {"mask", *mask}, 4);
    if (!offset.has_value()) g.offset_groups = groups_of(op, "mask", *mask, kk, g.C);
  }
  // check_tensors takes an initializer list: the optional tensors in further calls.
  check_tensors(op, device_type, {in, wt, ko});
  if (offset.has_value()) check_tensors(op, device_type, {in, {"offset", *offset}});
  convolution::check_mask_and_bias(op, device_type, g, input, mask, g.offset_groups, bias, g.C, "(C,) of input");
  return g;
}

inline Geometry check_forward(at::DeviceType device_type, const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& kernel_offset, const c10::optional<at::Tensor>& offset,
                              const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  return check_geometry(kForwardOp, device_type, input, weight, kernel_offset, offset, mask, bias, kernel_size,
                        stride, padding, dilation);
}

inline Geometry check_backward(at::DeviceType device_type, const at::Tensor& grad_out, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& kernel_offset,
                               const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = kBackwardOp;
  const Geometry g = check_geometry(op, device_type, input, weight, kernel_offset, offset, mask, bias, kernel_size,
                                    stride, padding, dilation);
  convolution::check_grad_out(op, device_type, g, grad_out, input, g.C, "(B, C, Ho, Wo) of the output");
  return g;
}

inline at::Tensor empty_output(const Geometry& g, const at::Tensor& input) {
  return at::empty({g.B, g.C, g.Ho, g.Wo}, input.options());
}

}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
