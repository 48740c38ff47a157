// Torch-free CUDA launchers of deform_kernel_conv2d (cuda/deform_kernel_conv2d.cu); the torch
// glue is cuda_glue/deform_kernel_conv2d.cpp. Every tensor is contiguous: input (B, C, H, W),
// weight (C, 1, Sh, Sw), kernel_offset (B, 2 Gk kh kw, Ho, Wo), offset (B, 2 G kh kw, Ho, Wo)
// or null, mask (B, G kh kw, Ho, Wo) or null, bias (C) or null, out / grad_out (B, C, Ho, Wo);
// gradients and workspaces in the accumulation dtype (float32 for float16 / bfloat16).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"
#include "../kernels/deform_kernel_conv2d.h"

namespace vsr_kernels {
namespace deform_kernel_conv2d {

cudaError_t launch_deform_kernel_conv2d_forward(DType dtype, const void* input, const void* weight,
                                                const void* kernel_offset, const void* offset, const void* mask,
                                                const void* bias, void* out, const Geometry& g, cudaStream_t stream);

// grad_input (B, C, H, W), grad_weight (C, 1, Sh, Sw), grad_kernel_offset, grad_offset (null
// without an offset), grad_mask (null without a mask), grad_bias (C); workspaces
// weight_partial (B, C, Sh, Sw) and bias_partial (B, C). grad_input and weight_partial must be
// zero on entry.
cudaError_t launch_deform_kernel_conv2d_backward(DType dtype, const void* grad_out, const void* input,
                                                 const void* weight, const void* kernel_offset, const void* offset,
                                                 const void* mask, void* grad_input, void* grad_weight,
                                                 void* grad_kernel_offset, void* grad_offset, void* grad_mask,
                                                 void* grad_bias, void* weight_partial, void* bias_partial,
                                                 const Geometry& g, cudaStream_t stream);

}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
