// The torch glue of deform_conv2d's CUDA launchers (cuda/deform_conv2d.cu): checks (shared
// with the CPU entry points, glue/deform_conv2d.h), contiguous inputs, outputs, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../cuda/deform_conv2d.cuh"
#include "../glue/deform_conv2d.h"

namespace vsr_kernels {
namespace deform_conv2d {
namespace {

const void* data_or_null(const c10::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->contiguous();
  return keep.const_data_ptr();
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_forward(at::kCUDA, input, offset, weight, mask, bias, stride, padding, dilation);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  at::Tensor out = empty_output(g, input);
  if (out.numel() == 0) return out;
  const auto x = input.contiguous(), off = offset.contiguous(), w = weight.contiguous();
  at::Tensor m, bi;
  const void* mask_ptr = data_or_null(mask, m);
  const void* bias_ptr = data_or_null(bias, bi);
  check_launch(kForwardOp, launch_deform_conv2d_forward(kernel_dtype(input), x.const_data_ptr(),
                                                        off.const_data_ptr(), w.const_data_ptr(), mask_ptr, bias_ptr,
                                                        out.mutable_data_ptr(), g,
                                                        c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g =
      check_backward(at::kCUDA, grad_out, input, offset, weight, mask, bias, stride, padding, dilation);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const auto dtype = input.scalar_type();
  const auto acc = input.options().dtype(accumulation_dtype(dtype));
  at::Tensor grad_input = at::zeros(input.sizes(), acc);
  at::Tensor grad_offset = at::zeros(offset.sizes(), acc);
  at::Tensor grad_mask = at::zeros(optional_grad_shape(mask), acc);
  at::Tensor grad_weight = at::zeros(weight.sizes(), acc);
  at::Tensor grad_bias = at::zeros({g.Cout}, acc);
  if (g.B * g.positions() > 0 && g.C > 0) {
    const auto go = grad_out.contiguous(), x = input.contiguous(), off = offset.contiguous(), w = weight.contiguous();
    at::Tensor m;
    const void* mask_ptr = data_or_null(mask, m);
    check_launch(kBackwardOp, launch_deform_conv2d_backward(
        kernel_dtype(input), go.const_data_ptr(), x.const_data_ptr(), off.const_data_ptr(), w.const_data_ptr(),
        mask_ptr, grad_input.mutable_data_ptr(), grad_offset.mutable_data_ptr(),
        mask.has_value() ? grad_mask.mutable_data_ptr() : nullptr, grad_weight.mutable_data_ptr(),
        grad_bias.mutable_data_ptr(), g, c10::cuda::getCurrentCUDAStream()));
  }
  return {to_contiguous(grad_input, dtype), to_contiguous(grad_offset, dtype), to_contiguous(grad_weight, dtype),
          to_contiguous(grad_mask, dtype), to_contiguous(grad_bias, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CUDA, m) {
  m.impl("deform_conv2d", &forward_cuda);
  m.impl("deform_conv2d_backward", &backward_cuda);
}

}  // namespace deform_conv2d
}  // namespace vsr_kernels
