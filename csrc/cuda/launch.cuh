// Generic CUDA launch helpers for the torch-free kernels of every op (nvcc only):
// - kBlockThreads, kMaxBlocks: the block size every launch() uses and the grid's cap;
// - TypedFrames<T> and typed<T>(BatchedFrames): a launcher's run-time typed frames with
//   their element type restored, indexed by batch element;
// - first_element(), grid_stride(): grid-stride loops over int64 element counts;
// - launch(kernel, elements, stream, args...): one grid-stride launch, none for no elements;
// - Types<scalar_t, acc_t> and dispatch(DType, fn): fn(Types<...>{}) for the run-time dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/frames.h"

namespace vsr_kernels {
namespace gpu {

// Threads per block of every launch(); kernels declare it in __launch_bounds__.
constexpr int kBlockThreads = 256;
// Enough resident threads for any current GPU; the grid-stride loops cover the rest, so
// the block count never overflows however many elements there are.
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

// The first element of this thread and the stride to its next, in int64: element counts
// may pass 2^31.
__device__ __forceinline__ int64_t first_element() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Launches `kernel` (a grid-stride loop over `elements`) with kBlockThreads threads per
// block on `stream`; no elements launch nothing, since a grid of zero blocks is a launch error.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), int64_t elements, cudaStream_t stream, Args... args) {
  if (elements == 0) return cudaSuccess;
  const int64_t blocks = std::min((elements + kBlockThreads - 1) / kBlockThreads, kMaxBlocks);
  kernel<<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(args...);
  return cudaGetLastError();
}

template <typename scalar_t_, typename acc_t_>
struct Types {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
};

// Calls fn(Types<element type, accumulation type>{}) for the run-time dtype: float16 and
// bfloat16 accumulate in float, float64 in double.
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

}  // namespace gpu
}  // namespace vsr_kernels
