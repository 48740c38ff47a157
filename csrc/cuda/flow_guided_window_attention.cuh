// CUDA launchers of flow-guided window attention. Torch-free (see DESIGN.md, "Why torch-free
// .cu files"): the caller passes raw device pointers, their strides and the current stream.
// Host-includable: the glue (cuda_glue/flow_guided_window_attention.cpp) is compiled by the
// host C++ compiler.
//
// One thread per (pixel, head, channel chunk) in the forward and per (pixel, head) in the
// backward's first kernel, running the shared per-pixel functions of
// kernels/flow_guided_window_attention.h; consecutive threads take consecutive pixels, so
// channels-first queries, gradients and outputs are read and written coalesced. The key and
// value gradients are gathered per key position from a target list the glue sorts stably
// (deterministic, no atomics); the bias gradients are fixed-order partial sums over chunks of
// kBiasChunk pixels, then a sum of the partials in chunk order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"
#include "../common/frames.h"
#include "../kernels/flow_guided_window_attention.h"

namespace vsr_kernels {
namespace flow_guided_window_attention {

constexpr int kCudaChunk = 16;  // channels per forward thread (registers)
constexpr int64_t kCudaBiasChunk = 1024;  // pixels per partial sum of the bias gradients

// flow: contiguous (B, 2, H, W) float (double when coord_double). Biases: contiguous
// (cells, C) or null. lse: contiguous (B, heads, H, W) in the accumulation type.
cudaError_t launch_flow_guided_window_attention_forward(
    DType dtype, bool coord_double, InputFrames query, InputFrames key, InputFrames value, const void* flow,
    const void* key_bias, const void* value_bias, OutputFrames out, void* lse, int64_t batch, const Geometry& g,
    double scale, cudaStream_t stream);

// grad_query: accumulation type. prob, dscore: contiguous (B, HW, heads, cells), accumulation
// type. target: (B, HW, cells) int64, b * (HW + 1) + key position (HW for non-finite flow).
cudaError_t launch_flow_guided_window_attention_pixel_grad(
    DType dtype, bool coord_double, InputFrames grad_out, InputFrames query, InputFrames key, InputFrames value,
    const void* flow, const void* key_bias, const void* value_bias, const void* lse, OutputFrames grad_query,
    void* prob, void* dscore, int64_t* target, int64_t batch, const Geometry& g, double scale, cudaStream_t stream);

// entries: the (B * HW * cells) entry numbers sorted stably by target; offsets: the
// B * (HW + 1) + 1 segment bounds. grad_key, grad_value: accumulation type.
cudaError_t launch_flow_guided_window_attention_key_value_grad(
    DType dtype, InputFrames grad_out, InputFrames query, const void* prob, const void* dscore,
    const int64_t* entries, const int64_t* offsets, OutputFrames grad_key, OutputFrames grad_value, int64_t batch,
    const Geometry& g, cudaStream_t stream);

// partial: ceil(B * HW / kCudaBiasChunk) * 2 * cells * C scratch; grad_key_bias and
// grad_value_bias: contiguous (cells, C); all in the accumulation type.
cudaError_t launch_flow_guided_window_attention_bias_grad(
    DType dtype, InputFrames grad_out, InputFrames query, const void* prob, const void* dscore, void* partial,
    void* grad_key_bias, void* grad_value_bias, int64_t batch, const Geometry& g, cudaStream_t stream);

}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
