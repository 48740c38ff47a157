// CUDA kernels of local argmax attention: grid-stride loops over pixels, each pixel
// computed by the per-pixel functions the CPU launcher also runs.
#include "local_argmax_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace vsr_kernels {
namespace {

constexpr int kThreads = 256;
// Blocks of kThreads that __launch_bounds__ keeps resident per SM, capping registers at 64:
// half an SM's threads hide the latency of the gathers. With no minimum, ptxas (CUDA 13)
// gives the key/value gradient 48 registers on sm_90 and spills; at 64 it still spills on
// sm_80, so that kernel keeps 3 blocks (80 registers).
constexpr int kMinBlocksPerSm = 4;
constexpr int kMinKeyValueGradBlocksPerSm = 3;
// Enough resident threads for any current GPU; the grid-stride loops cover the rest, so
// the block count never overflows however many pixels there are.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// BatchedFrames with its element type restored, indexed by batch element.
template <typename T>
struct TypedFrames {
  T* data;
  int64_t batch_stride;
  Strides stride;
  __device__ Frames<T> operator[](int64_t b) const { return {data + b * batch_stride, stride}; }
};

template <typename T, typename Void>
TypedFrames<T> typed(BatchedFrames<Void> frames) {
  return {static_cast<T*>(frames.data), frames.batch_stride, frames.stride};
}

__device__ int64_t first_element() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Element i = (b * T + t) * H * W + p of the (B, T, H, W) maps is pixel p of frame t of
// batch element b.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) forward_kernel(
    TypedFrames<const scalar_t> query, TypedFrames<const scalar_t> key,
    TypedFrames<const scalar_t> value, TypedFrames<scalar_t> out, scalar_t* score,
    int64_t* index, int64_t batch, Extent e, Window w, acc_t scale) {
  const int64_t pixels = w.pixels();
  for (int64_t i = first_element(); i < batch * e.frames * pixels; i += grid_stride()) {
    const int64_t b = i / pixels / e.frames, t = i / pixels % e.frames, p = i % pixels;
    local_argmax_forward_pixel<scalar_t, acc_t>(query[b], key[b], value[b], out[b], e, w, scale,
                                                t, p / w.width, p % w.width, score + i, index + i);
  }
}

// One thread per query pixel (b, p), summing its T frames itself: no atomics.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) query_grad_kernel(
    TypedFrames<const scalar_t> grad_out, const scalar_t* grad_score,
    TypedFrames<const scalar_t> key, TypedFrames<const scalar_t> value, const int64_t* index,
    TypedFrames<acc_t> grad_query, int64_t batch, Extent e, Window w, acc_t scale) {
  const int64_t pixels = w.pixels();
  for (int64_t i = first_element(); i < batch * pixels; i += grid_stride()) {
    const int64_t b = i / pixels, p = i % pixels, maps = b * e.frames * pixels;
    local_argmax_query_grad_pixel<scalar_t, acc_t>(grad_out[b], grad_score + maps, key[b],
                                                   value[b], index + maps, grad_query[b], e, w,
                                                   scale, p / w.width, p % w.width);
  }
}

// One thread per key/value pixel (b, t, p), gathering from the queries that selected it.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinKeyValueGradBlocksPerSm) key_value_grad_kernel(
    TypedFrames<const scalar_t> grad_out, const scalar_t* grad_score,
    TypedFrames<const scalar_t> query, TypedFrames<const scalar_t> value,
    const scalar_t* score, const int64_t* index, TypedFrames<acc_t> grad_key,
    TypedFrames<acc_t> grad_value, int64_t batch, Extent e, Window w, acc_t scale) {
  const int64_t pixels = w.pixels();
  for (int64_t i = first_element(); i < batch * e.frames * pixels; i += grid_stride()) {
    const int64_t b = i / pixels / e.frames, t = i / pixels % e.frames, p = i % pixels;
    const int64_t maps = b * e.frames * pixels;
    local_argmax_key_value_grad_pixel<scalar_t, acc_t>(
        grad_out[b], grad_score + maps, query[b], value[b], score + maps, index + maps,
        grad_key[b], grad_value[b], e, w, scale, t, p / w.width, p % w.width);
  }
}

// Launches `kernel` for `elements` grid-stride elements on `stream`; none launches nothing,
// since a grid of zero blocks is a launch error.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), int64_t elements, cudaStream_t stream,
                   Args... args) {
  if (elements == 0) return cudaSuccess;
  const int64_t blocks = std::min((elements + kThreads - 1) / kThreads, kMaxBlocks);
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args...);
  return cudaGetLastError();
}

template <typename scalar_t_, typename acc_t_>
struct Types {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
};

// Calls fn(Types<element type, accumulation type>{}) for the run-time dtype.
template <typename Fn>
cudaError_t dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: return fn(Types<__half, float>{});
    case DType::kBFloat16: return fn(Types<__nv_bfloat16, float>{});
    case DType::kFloat32: return fn(Types<float, float>{});
    case DType::kFloat64: return fn(Types<double, double>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_local_argmax_attention_forward(
    DType dtype, InputFrames query, InputFrames key, InputFrames value, OutputFrames out,
    void* score, int64_t* index, int64_t batch, const Extent& extent, const Window& window,
    double scale, cudaStream_t stream) {
  return dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    return launch(forward_kernel<scalar_t, acc_t>, batch * extent.frames * window.pixels(),
                  stream, typed<const scalar_t>(query), typed<const scalar_t>(key),
                  typed<const scalar_t>(value), typed<scalar_t>(out),
                  static_cast<scalar_t*>(score), index, batch, extent, window,
                  static_cast<acc_t>(scale));
  });
}

cudaError_t launch_local_argmax_attention_backward(
    DType dtype, InputFrames grad_out, const void* grad_score, InputFrames query,
    InputFrames key, InputFrames value, const void* score, const int64_t* index,
    OutputFrames grad_query, OutputFrames grad_key, OutputFrames grad_value, int64_t batch,
    const Extent& extent, const Window& window, double scale, cudaStream_t stream) {
  return dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const auto go = typed<const scalar_t>(grad_out);
    const auto gs = static_cast<const scalar_t*>(grad_score);
    const auto v = typed<const scalar_t>(value);
    const cudaError_t error = launch(
        query_grad_kernel<scalar_t, acc_t>, batch * window.pixels(), stream, go, gs,
        typed<const scalar_t>(key), v, index, typed<acc_t>(grad_query), batch, extent, window,
        static_cast<acc_t>(scale));
    if (error != cudaSuccess) return error;
    return launch(key_value_grad_kernel<scalar_t, acc_t>,
                  batch * extent.frames * window.pixels(), stream, go, gs,
                  typed<const scalar_t>(query), v, static_cast<const scalar_t*>(score), index,
                  typed<acc_t>(grad_key), typed<acc_t>(grad_value), batch, extent, window,
                  static_cast<acc_t>(scale));
  });
}

}  // namespace vsr_kernels
