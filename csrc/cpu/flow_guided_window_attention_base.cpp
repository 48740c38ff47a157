// The forward kernel of flow-guided window attention for every CPU: the baseline vector
// instructions (SSE2 on x86-64), no fused multiply-add. See flow_guided_window_attention_simd.h.
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in always-inlined helpers only
#define VSR_SIMD_NS base
#define VSR_SIMD_BYTES 16
#define VSR_SIMD_FMA 0
#include "flow_guided_window_attention_simd.h"
