// The forward kernel of local argmax attention for every CPU: the compiler's baseline vector
// width (SSE2 on x86-64), no fused multiply-add. See local_argmax_attention_simd.h.
#define VSR_SIMD_NS base
#define VSR_SIMD_BYTES 16
#define VSR_SIMD_FMA 0
#include "local_argmax_attention_simd.h"
