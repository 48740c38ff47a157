// CUDA launchers of trajectory-aware attention (TTVSR). Torch-free (see DESIGN.md): the
// caller passes raw device pointers, their strides and the current stream. Host-includable:
// the glue (cuda_glue/trajectory_attention.cpp) is compiled by the host C++ compiler.
//
// Layout of the arguments: query (B, D, h, w) and grad_outs as InputFrames with frame stride
// 0; key and values as (B, T, C, h, w) InputFrames; location as a contiguous float64 (B, T, 2,
// h, w) array (every float16/bfloat16/float32 location is exact in float64, so rounding there
// is rounding in the location's own dtype); score (B, h, w) in the element type, index and
// chosen (B, h, w) int64, all contiguous. Outputs and gradients are contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/frames.h"
#include "../kernels/trajectory_attention.h"

namespace vsr_kernels {
namespace trajectory_attention {

// Forward selection: score, index and the chosen token (-1: outside) of every token.
cudaError_t launch_trajectory_attention_select(
    DType dtype, InputFrames query, InputFrames key, const double* location, void* score, int64_t* index,
    int64_t* chosen, int64_t batch, const Extent& extent, cudaStream_t stream);

// out[b, c, p] = value[b, index, c, chosen] (0 where chosen < 0), out contiguous (B, Dv, h, w).
cudaError_t launch_trajectory_attention_gather(
    DType dtype, InputFrames value, const int64_t* index, const int64_t* chosen, void* out, int64_t batch,
    int64_t value_channels, const Extent& extent, cudaStream_t stream);

// Bytes of device workspace launch_trajectory_attention_backward needs for `batch` elements.
size_t trajectory_attention_workspace_bytes(int64_t batch, const Extent& extent);

// grad_query (B, D, h, w) written; grad_key (B, T, D, h, w) and grad_values[i] (B, T, Dv_i, h, w)
// must be zero on entry, all contiguous in the accumulation type (float, or double for
// kFloat64). Deterministic: no atomics; the tokens adding into one key token are sorted
// (stable radix sort) and summed by one thread per channel in token order.
cudaError_t launch_trajectory_attention_backward(
    DType dtype, const InputFrames* grad_outs, const void* grad_score, InputFrames query, InputFrames key,
    const double* location, const int64_t* index, void* grad_query, void* grad_key, void* const* grad_values,
    const int64_t* value_channels, int num_values, void* workspace, size_t workspace_bytes, int64_t batch,
    const Extent& extent, cudaStream_t stream);

}  // namespace trajectory_attention
}  // namespace vsr_kernels
