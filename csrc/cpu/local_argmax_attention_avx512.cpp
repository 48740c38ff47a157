// The forward kernel of local argmax attention for AVX-512 CPUs, selected at run time
// (local_argmax_attention.cpp): only this translation unit is compiled for them, through
// the target pragma, so the extension still loads on any x86-64 CPU.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx2,fma")
#define VSR_SIMD_NS avx512
#define VSR_SIMD_BYTES 64
#define VSR_SIMD_FMA 1
#include "local_argmax_attention_simd.h"
#endif
