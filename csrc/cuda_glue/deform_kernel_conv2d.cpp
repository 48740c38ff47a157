// The torch glue of deform_kernel_conv2d's CUDA launchers (cuda/deform_kernel_conv2d.cu):
// checks (shared with the CPU entry points, glue/deform_kernel_conv2d.h), contiguous inputs,
// outputs and workspaces, launch. The backward is always the deterministic one (no atomics),
// whatever torch.are_deterministic_algorithms_enabled() says, as deform_conv2d's.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../cuda/deform_kernel_conv2d.cuh"
#include "../glue/deform_kernel_conv2d.h"

namespace vsr_kernels {
namespace deform_kernel_conv2d {
namespace {

const void* data_or_null(const c10::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->contiguous();
  return keep.const_data_ptr();
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& kernel_offset,
                        const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
                        const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_forward(at::kCUDA, input, weight, kernel_offset, offset, mask, bias, kernel_size, stride,
                                   padding, dilation);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  at::Tensor out = empty_output(g, input);
  if (out.numel() == 0) return out;
  const auto x = input.contiguous(), w = weight.contiguous(), ko = kernel_offset.contiguous();
  at::Tensor off, m, bi;
  const void* offset_ptr = data_or_null(offset, off);
  const void* mask_ptr = data_or_null(mask, m);
  const void* bias_ptr = data_or_null(bias, bi);
  check_launch(kForwardOp, launch_deform_kernel_conv2d_forward(
                               kernel_dtype(input), x.const_data_ptr(), w.const_data_ptr(), ko.const_data_ptr(),
                               offset_ptr, mask_ptr, bias_ptr, out.mutable_data_ptr(), g,
                               c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& kernel_offset,
    const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_backward(at::kCUDA, grad_out, input, weight, kernel_offset, offset, mask, bias, kernel_size,
                                    stride, padding, dilation);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const auto dtype = input.scalar_type();
  const auto acc = input.options().dtype(accumulation_dtype(dtype));
  at::Tensor grad_input = at::zeros(input.sizes(), acc);
  at::Tensor grad_weight = at::zeros(weight.sizes(), acc);
  at::Tensor grad_kernel_offset = at::zeros(kernel_offset.sizes(), acc);
  at::Tensor grad_offset = at::zeros(optional_grad_shape(offset), acc);
  at::Tensor grad_mask = at::zeros(optional_grad_shape(mask), acc);
  at::Tensor grad_bias = at::zeros({g.C}, acc);
  if (g.B > 0) {
    at::Tensor weight_partial = at::zeros({g.B, g.C, g.Sh, g.Sw}, acc);
    at::Tensor bias_partial = at::empty({g.B, g.C}, acc);
    const auto go = grad_out.contiguous(), x = input.contiguous(), w = weight.contiguous(),
               ko = kernel_offset.contiguous();
    at::Tensor off, m;
    const void* offset_ptr = data_or_null(offset, off);
    const void* mask_ptr = data_or_null(mask, m);
    check_launch(kBackwardOp,
                 launch_deform_kernel_conv2d_backward(
                     kernel_dtype(input), go.const_data_ptr(), x.const_data_ptr(), w.const_data_ptr(),
                     ko.const_data_ptr(), offset_ptr, mask_ptr, grad_input.mutable_data_ptr(),
                     grad_weight.mutable_data_ptr(), grad_kernel_offset.mutable_data_ptr(),
                     offset.has_value() ? grad_offset.mutable_data_ptr() : nullptr,
                     mask.has_value() ? grad_mask.mutable_data_ptr() : nullptr, grad_bias.mutable_data_ptr(),
                     weight_partial.mutable_data_ptr(), bias_partial.mutable_data_ptr(), g,
                     c10::cuda::getCurrentCUDAStream()));
  }
  return {to_contiguous(grad_input, dtype),  to_contiguous(grad_weight, dtype), to_contiguous(grad_kernel_offset, dtype),
          to_contiguous(grad_offset, dtype), to_contiguous(grad_mask, dtype),   to_contiguous(grad_bias, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CUDA, m) {
  m.impl("deform_kernel_conv2d", &forward_cuda);
  m.impl("deform_kernel_conv2d_backward", &backward_cuda);
}

}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
