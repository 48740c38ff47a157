// The element types of the tensors of one kernel call, as the torch-free CUDA launchers take
// them (torch_glue.h's kernel_dtype maps an at::Tensor to one). Accumulation is in float, or
// double for kFloat64.
#pragma once

namespace vsr_kernels {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

}  // namespace vsr_kernels
