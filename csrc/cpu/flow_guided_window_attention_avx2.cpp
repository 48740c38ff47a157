// The forward kernel of flow-guided window attention for AVX2 + FMA CPUs, selected at run time
// (flow_guided_window_attention.cpp): only this translation unit is compiled for them.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's gather intrinsics (a false positive)
#pragma GCC target("avx2,fma")
#define VSR_SIMD_NS avx2
#define VSR_SIMD_BYTES 32
#define VSR_SIMD_FMA 1
#include "flow_guided_window_attention_simd.h"
#endif
