// Shared by the CPU launchers (compiled by the host C++ compiler) and the CUDA kernels
// (compiled by nvcc). Torch-free on purpose: see DESIGN.md, "Why torch-free .cu files".
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VSR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VSR_HOST_DEVICE inline
#endif

namespace vsr_kernels {

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
