// CUDA kernels of local argmax attention: grid-stride loops over pixels, each pixel
// computed by the per-pixel functions the CPU launcher also runs.
#include "local_argmax_attention.cuh"

#include "launch.cuh"

namespace vsr_kernels {
namespace local_argmax_attention {
namespace {

using gpu::first_element;
using gpu::grid_stride;
using gpu::kBlockThreads;
using gpu::TypedFrames;
using gpu::typed;

// Blocks of kBlockThreads that __launch_bounds__ keeps resident per SM, capping registers
// at 64: half an SM's threads hide the latency of the gathers. With no minimum, ptxas
// (CUDA 13) gives the key/value gradient 48 registers on sm_90 and spills; at 64 it still
// spills on sm_80, so that kernel keeps 3 blocks (80 registers).
constexpr int kMinBlocksPerSm = 4;
constexpr int kMinKeyValueGradBlocksPerSm = 3;

// Element i = (b * T + t) * H * W + p of the (B, T, H, W) maps is pixel p of frame t of
// batch element b.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) forward_kernel(
    TypedFrames<const scalar_t> query, TypedFrames<const scalar_t> key,
    TypedFrames<const scalar_t> value, TypedFrames<scalar_t> out, scalar_t* score,
    int64_t* index, int64_t batch, Extent e, Window w, acc_t scale) {
  const int64_t pixels = w.pixels();
  for (int64_t i = first_element(); i < batch * e.frames * pixels; i += grid_stride()) {
    const int64_t b = i / pixels / e.frames, t = i / pixels % e.frames, p = i % pixels;
    forward_pixel<scalar_t, acc_t>(query[b], key[b], value[b], out[b], e, w, scale, t, p / w.width,
                                   p % w.width, score + i, index + i);
  }
}

// One thread per query pixel (b, p), summing its T frames itself: no atomics.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) query_grad_kernel(
    TypedFrames<const scalar_t> grad_out, const scalar_t* grad_score,
    TypedFrames<const scalar_t> key, TypedFrames<const scalar_t> value, const int64_t* index,
    TypedFrames<acc_t> grad_query, int64_t batch, Extent e, Window w, acc_t scale) {
  const int64_t pixels = w.pixels();
  for (int64_t i = first_element(); i < batch * pixels; i += grid_stride()) {
    const int64_t b = i / pixels, p = i % pixels, maps = b * e.frames * pixels;
    query_grad_pixel<scalar_t, acc_t>(grad_out[b], grad_score + maps, key[b], value[b], index + maps,
                                      grad_query[b], e, w, scale, p / w.width, p % w.width);
  }
}

// One thread per key/value pixel (b, t, p), gathering from the queries that selected it.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads, kMinKeyValueGradBlocksPerSm) key_value_grad_kernel(
    TypedFrames<const scalar_t> grad_out, const scalar_t* grad_score,
    TypedFrames<const scalar_t> query, TypedFrames<const scalar_t> value,
    const scalar_t* score, const int64_t* index, TypedFrames<acc_t> grad_key,
    TypedFrames<acc_t> grad_value, int64_t batch, Extent e, Window w, acc_t scale) {
  const int64_t pixels = w.pixels();
  for (int64_t i = first_element(); i < batch * e.frames * pixels; i += grid_stride()) {
    const int64_t b = i / pixels / e.frames, t = i / pixels % e.frames, p = i % pixels;
    const int64_t maps = b * e.frames * pixels;
    key_value_grad_pixel<scalar_t, acc_t>(grad_out[b], grad_score + maps, query[b], value[b], score + maps,
                                          index + maps, grad_key[b], grad_value[b], e, w, scale, t,
                                          p / w.width, p % w.width);
  }
}

}  // namespace

cudaError_t launch_local_argmax_attention_forward(
    DType dtype, InputFrames query, InputFrames key, InputFrames value, OutputFrames out,
    void* score, int64_t* index, int64_t batch, const Extent& extent, const Window& window,
    double scale, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    return gpu::launch(forward_kernel<scalar_t, acc_t>, batch * extent.frames * window.pixels(), stream,
                       typed<const scalar_t>(query), typed<const scalar_t>(key), typed<const scalar_t>(value),
                       typed<scalar_t>(out), static_cast<scalar_t*>(score), index, batch, extent, window,
                       static_cast<acc_t>(scale));
  });
}

cudaError_t launch_local_argmax_attention_backward(
    DType dtype, InputFrames grad_out, const void* grad_score, InputFrames query,
    InputFrames key, InputFrames value, const void* score, const int64_t* index,
    OutputFrames grad_query, OutputFrames grad_key, OutputFrames grad_value, int64_t batch,
    const Extent& extent, const Window& window, double scale, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const auto go = typed<const scalar_t>(grad_out);
    const auto gs = static_cast<const scalar_t*>(grad_score);
    const auto v = typed<const scalar_t>(value);
    const cudaError_t error =
        gpu::launch(query_grad_kernel<scalar_t, acc_t>, batch * window.pixels(), stream, go, gs,
                    typed<const scalar_t>(key), v, index, typed<acc_t>(grad_query), batch, extent, window,
                    static_cast<acc_t>(scale));
    if (error != cudaSuccess) return error;
    return gpu::launch(key_value_grad_kernel<scalar_t, acc_t>, batch * extent.frames * window.pixels(), stream, go,
                       gs, typed<const scalar_t>(query), v, static_cast<const scalar_t*>(score), index,
                       typed<acc_t>(grad_key), typed<acc_t>(grad_value), batch, extent, window,
                       static_cast<acc_t>(scale));
  });
}

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
