// The torch side of deform_conv2d shared by its CPU entry points (cpu/deform_conv2d.cpp) and
// its CUDA entry points (cuda_glue/deform_conv2d.cpp): argument checks and the Geometry the
// kernels take. A direct torch.ops.vsr_kernels call bypasses the Python checks, so every size
// the kernels index by is refused here when it disagrees, in both directions.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "../kernels/deform_conv2d.h"
#include "../torch_glue.h"
#include "convolution.h"

namespace vsr_kernels {
namespace deform_conv2d {

constexpr const char* kForwardOp = "vsr_kernels.deform_conv2d";
constexpr const char* kBackwardOp = "vsr_kernels.deform_conv2d_backward";

// Checks every argument the forward and backward share and returns the geometry. input
// (B, C, H, W), offset (B, 2 G kh kw, Ho, Wo), weight (Cout, C / groups, kh, kw), mask
// (B, G kh kw, Ho, Wo) or undefined, bias (Cout) or undefined.
inline Geometry check_geometry(const char* op, at::DeviceType device_type, const at::Tensor& input,
                               const at::Tensor& offset, const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation) {
  const NamedTensor in{"input", input}, off{"offset", offset}, wt{"weight", weight};
  check_dim(op, in, 4);
  check_dim(op, off, 4);
  check_dim(op, wt, 4);
  check_int_range(op, "kernel height (weight.size(2))", weight.size(2), 1, kMaxInt);
  check_int_range(op, "kernel width (weight.size(3))", weight.size(3), 1, kMaxInt);
  Geometry g;
  g.B = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.Cout = weight.size(0);
  g.kh = static_cast<int>(weight.size(2));
  g.kw = static_cast<int>(weight.size(3));
  convolution::set_window(op, g, stride, padding, dilation);
  const int64_t cin_g = weight.size(1);
  TORCH_CHECK(cin_g >= 1 && g.C % cin_g == 0, op, ": input channels (", g.C,
              ") must be a multiple of weight.size(1) (", cin_g, ", the channels per group)");
  g.groups = g.C / cin_g;
  TORCH_CHECK(g.groups >= 1 && g.Cout % g.groups == 0, op, ": weight.size(0) (", g.Cout,
              ") must be divisible by groups = input channels / weight.size(1) = ", g.groups);
  const int64_t kk = g.kernel_points();
  TORCH_CHECK(offset.size(1) % (2 * kk) == 0 && offset.size(1) > 0, op, ": offset channels (", offset.size(1),
              ") must be a positive multiple of 2 * kh * kw = ", 2 * kk);
  g.offset_groups = offset.size(1) / (2 * kk);
  TORCH_CHECK(g.C % g.offset_groups == 0, op, ": input channels (", g.C,
              ") must be divisible by the offset groups (offset channels / (2 kh kw) = ", g.offset_groups, ")");
  convolution::set_output_size(op, g);
  check_shape(op, off, {g.B, 2 * g.offset_groups * kk, g.Ho, g.Wo}, "(B, 2 G kh kw, Ho, Wo)");
  check_tensors(op, device_type, {in, off, wt});
  convolution::check_mask_and_bias(op, device_type, g, input, mask, g.offset_groups, bias, g.Cout,
                                   "(Cout,) of weight");
  return g;
}

inline Geometry check_forward(at::DeviceType device_type, const at::Tensor& input, const at::Tensor& offset,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  return check_geometry(kForwardOp, device_type, input, offset, weight, mask, bias, stride, padding, dilation);
}

inline Geometry check_backward(at::DeviceType device_type, const at::Tensor& grad_out, const at::Tensor& input,
                               const at::Tensor& offset, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = kBackwardOp;
  const Geometry g = check_geometry(op, device_type, input, offset, weight, mask, bias, stride, padding, dilation);
  convolution::check_grad_out(op, device_type, g, grad_out, input, g.Cout, "(B, Cout, Ho, Wo) of the output");
  return g;
}

inline at::Tensor empty_output(const Geometry& g, const at::Tensor& input) {
  return at::empty({g.B, g.Cout, g.Ho, g.Wo}, input.options());
}

}  // namespace deform_conv2d
}  // namespace vsr_kernels
