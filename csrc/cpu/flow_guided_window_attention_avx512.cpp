// The forward kernel of flow-guided window attention for AVX-512 CPUs (32-byte vectors with
// AVX-512VL: 32 registers), selected at run time (flow_guided_window_attention.cpp).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define VSR_SIMD_NS avx512
#define VSR_SIMD_FMA 1
#include "flow_guided_window_attention_simd.h"
#endif
