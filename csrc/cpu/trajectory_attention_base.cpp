// The float32 kernels of trajectory attention for every CPU: 4 lanes of plain C++, separate
// multiply and add. See trajectory_attention_simd.h.
#define VSR_SIMD_NS base
#define VSR_SIMD_BITS 0
#include "trajectory_attention_simd.h"
