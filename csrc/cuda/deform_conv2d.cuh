// Torch-free CUDA launchers of deform_conv2d (cuda/deform_conv2d.cu); the torch glue is
// cuda_glue/deform_conv2d.cpp. Every tensor is contiguous: input (B, C, H, W), offset
// (B, 2 G kh kw, Ho, Wo), weight (Cout, C / groups, kh, kw), mask (B, G kh kw, Ho, Wo) or
// null, bias (Cout) or null, out / grad_out (B, Cout, Ho, Wo); gradients in the accumulation
// dtype (float32 for float16 / bfloat16).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"
#include "../kernels/deform_conv2d.h"

namespace vsr_kernels {
namespace deform_conv2d {

cudaError_t launch_deform_conv2d_forward(DType dtype, const void* input, const void* offset, const void* weight,
                                         const void* mask, const void* bias, void* out, const Geometry& g,
                                         cudaStream_t stream);

// grad_input (B, C, H, W), grad_offset, grad_mask (null without a mask), grad_weight and
// grad_bias, all in the accumulation dtype; grad_input must be zero on entry.
cudaError_t launch_deform_conv2d_backward(DType dtype, const void* grad_out, const void* input, const void* offset,
                                          const void* weight, const void* mask, void* grad_input, void* grad_offset,
                                          void* grad_mask, void* grad_weight, void* grad_bias, const Geometry& g,
                                          cudaStream_t stream);

}  // namespace deform_conv2d
}  // namespace vsr_kernels
