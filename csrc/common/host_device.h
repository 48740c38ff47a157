// VSR_HOST_DEVICE, convert<To>(x) and beats(candidate, best): what every op's per-element
// functions need to run unchanged in the CPU launchers (host C++ compiler) and the CUDA
// kernels (nvcc). Torch-free on purpose: see DESIGN.md, "Why torch-free .cu files".
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define VSR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VSR_HOST_DEVICE inline
#endif

namespace vsr_kernels {

// Conversion between storage and accumulation types. On the host a static_cast, which
// rounds c10::Half and c10::BFloat16 to nearest like the CUDA intrinsics do. Not a plain
// static_cast in CUDA code because PyTorch compiles CUDA sources with
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove __half's
// and __nv_bfloat16's implicit conversions: those two go through the explicit intrinsics below.
// Call it qualified, vsr_kernels::convert<To>(x): for c10::Half and c10::BFloat16 arguments,
// argument-dependent lookup also finds c10::convert, and the unqualified call is ambiguous.
template <typename To, typename From>
VSR_HOST_DEVICE To convert(From x) {
  return static_cast<To>(x);
}

#if defined(__CUDACC__)
template <>
VSR_HOST_DEVICE float convert<float, __half>(__half x) {
  return __half2float(x);
}
template <>
VSR_HOST_DEVICE __half convert<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
VSR_HOST_DEVICE float convert<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
VSR_HOST_DEVICE __nv_bfloat16 convert<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

// A ranking that matches torch.max: NaN beats every number, and among equals the earlier
// candidate is kept (callers visit candidates in increasing index and only replace on a
// strict win).
template <typename acc_t>
VSR_HOST_DEVICE bool beats(acc_t candidate, acc_t best) {
  const bool candidate_nan = candidate != candidate;
  const bool best_nan = best != best;
  return (candidate_nan && !best_nan) || candidate > best;
}

}  // namespace vsr_kernels
