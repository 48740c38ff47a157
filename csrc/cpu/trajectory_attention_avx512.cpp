// The float32 kernels of trajectory attention for AVX-512 CPUs (16 lanes, masked loads and
// gathers), selected at run time (trajectory_attention.cpp).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx2,fma")
#define VSR_SIMD_NS avx512
#define VSR_SIMD_BITS 512
#include "trajectory_attention_simd.h"
#endif
