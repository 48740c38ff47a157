// The forward kernel of flow-guided window attention for AVX-512 CPUs, selected at run time
// (flow_guided_window_attention.cpp): the padded channels-last rows in 32-byte vectors with
// AVX-512VL (32 registers), the channels-first rows in 64-byte vectors of 16 pixels.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's gather intrinsics (a false positive)
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define VSR_SIMD_NS avx512
#define VSR_SIMD_BYTES 64
#define VSR_SIMD_FMA 1
#include "flow_guided_window_attention_simd.h"
#endif
