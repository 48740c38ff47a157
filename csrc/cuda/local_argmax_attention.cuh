// CUDA launchers of local argmax attention. Torch-free (see DESIGN.md, "Why torch-free .cu
// files"): the caller passes raw device pointers, their strides and the current stream.
// Host-includable: the glue (cuda_glue/local_argmax_attention.cpp) is compiled by the host
// C++ compiler.
//
// Every launch runs one thread per pixel with the shared per-pixel functions of
// kernels/local_argmax_attention.h. Consecutive threads take consecutive x, so frames with
// pixel stride 1 (channels-first) give coalesced loads.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"
#include "../common/frames.h"
#include "../kernels/local_argmax_attention.h"

namespace vsr_kernels {
namespace local_argmax_attention {

// score and index are contiguous (B, T, H, W), in the element type and int64.
cudaError_t launch_local_argmax_attention_forward(
    DType dtype, InputFrames query, InputFrames key, InputFrames value, OutputFrames out,
    void* score, int64_t* index, int64_t batch, const Extent& extent, const Window& window,
    double scale, cudaStream_t stream);

// grad_score, score and index are contiguous (B, T, H, W). grad_query, grad_key and
// grad_value hold the accumulation type (float, or double for kFloat64): for float16 and
// bfloat16 the caller allocates float32 buffers and converts them afterwards.
cudaError_t launch_local_argmax_attention_backward(
    DType dtype, InputFrames grad_out, const void* grad_score, InputFrames query,
    InputFrames key, InputFrames value, const void* score, const int64_t* index,
    OutputFrames grad_query, OutputFrames grad_key, OutputFrames grad_value, int64_t batch,
    const Extent& extent, const Window& window, double scale, cudaStream_t stream);

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
