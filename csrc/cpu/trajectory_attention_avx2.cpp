// The float32 kernels of trajectory attention for AVX2 + FMA CPUs (8 lanes, hardware gathers),
// selected at run time (trajectory_attention.cpp): only this translation unit is compiled for them.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma")
#define VSR_SIMD_NS avx2
#define VSR_SIMD_BITS 256
#include "trajectory_attention_simd.h"
#endif
