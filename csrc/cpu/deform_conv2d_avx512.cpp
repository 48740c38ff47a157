// The AVX-512 per-tile kernels of deform_conv2d (float32): see deform_conv2d_isa.h. Only this
// translation unit is compiled for AVX-512, through the target pragma.
#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx2,fma")
// GCC 12's avx512fintrin.h: _mm512_undefined_* inside the masked intrinsics warns falsely.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "deform_conv2d_isa.h"

namespace vsr_kernels {
namespace deform_conv2d {
namespace avx512 {
namespace {

// The bilinear neighbours of 16 sample points (common/bilinear.h's rule, vectorised):
// neighbour n = 2 i + j is (y0 + i, x0 + j) at offset o + {0, 1, W, W + 1}.
struct Taps {
  __m512i o;            // y0 W + x0 (0 for a point outside)
  __m512 ly, lx, hy, hx;  // fractional parts and their complements (0, 0, 1, 1 outside)
  __m512 poison;        // NaN where y or x is NaN (the NaN itself), else 0
  __mmask16 valid[4];   // neighbour n lies in the plane and the point in [-1, H) x [-1, W)
  __mmask16 inside;     // the point lies in [-1, H) x [-1, W) (its coordinate gradient may be nonzero)
  __mmask16 sampled;    // ... and strictly inside (-1, H) x (-1, W) (it samples the plane)
};

struct PointCoords {
  __m512 y, x;
};

// The sample points of kernel point (i, j) at the 16 positions q, q + 1, ... (lanes outside
// `lanes` read no offset and are left outside).
inline PointCoords coords(const TileArgs& a, int64_t k, int64_t q, __mmask16 lanes) {
  const int64_t i = k / a.kw, j = k % a.kw;
  const int64_t cy = 2 * (a.og * a.kh * a.kw + k);
  const float* oy = a.offset + cy * a.HoWo + a.p0 + q;
  const __m512 dy = _mm512_maskz_loadu_ps(lanes, oy);
  const __m512 dx = _mm512_maskz_loadu_ps(lanes, oy + a.HoWo);
  const __m512i yb = _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, a.ybase + q),
                                      _mm512_set1_epi32(static_cast<int32_t>(i * a.dil_h)));
  const __m512i xb = _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, a.xbase + q),
                                      _mm512_set1_epi32(static_cast<int32_t>(j * a.dil_w)));
  return {_mm512_add_ps(_mm512_cvtepi32_ps(yb), dy), _mm512_add_ps(_mm512_cvtepi32_ps(xb), dx)};
}

inline Taps taps(const TileArgs& a, PointCoords p, __mmask16 lanes) {
  Taps t;
  const __m512 minus1 = _mm512_set1_ps(-1.0f), one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  const __m512 Hf = _mm512_set1_ps(static_cast<float>(a.H)), Wf = _mm512_set1_ps(static_cast<float>(a.W));
  const __m512 y = p.y, x = p.x;
  // Ordered comparisons: a NaN coordinate is outside.
  t.inside = lanes & _mm512_cmp_ps_mask(y, minus1, _CMP_GE_OQ) & _mm512_cmp_ps_mask(y, Hf, _CMP_LT_OQ) &
             _mm512_cmp_ps_mask(x, minus1, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, Wf, _CMP_LT_OQ);
  t.sampled = t.inside & _mm512_cmp_ps_mask(y, minus1, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x, minus1, _CMP_GT_OQ);
  const __mmask16 nan_y = lanes & _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  const __mmask16 nan_x = lanes & _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  t.poison = _mm512_mask_blend_ps(nan_y, _mm512_mask_blend_ps(nan_x, zero, x), y);
  const __m512 yc = _mm512_maskz_mov_ps(t.inside, y), xc = _mm512_maskz_mov_ps(t.inside, x);
  const __m512 fy = _mm512_roundscale_ps(yc, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 fx = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512i y0 = _mm512_cvttps_epi32(fy), x0 = _mm512_cvttps_epi32(fx);
  t.ly = _mm512_sub_ps(yc, fy);
  t.lx = _mm512_sub_ps(xc, fx);
  t.hy = _mm512_sub_ps(one, t.ly);
  t.hx = _mm512_sub_ps(one, t.lx);
  const __m512i izero = _mm512_setzero_si512();
  const __mmask16 ok_y0 = _mm512_cmpge_epi32_mask(y0, izero);
  const __mmask16 ok_y1 = _mm512_cmplt_epi32_mask(y0, _mm512_set1_epi32(a.H - 1));
  const __mmask16 ok_x0 = _mm512_cmpge_epi32_mask(x0, izero);
  const __mmask16 ok_x1 = _mm512_cmplt_epi32_mask(x0, _mm512_set1_epi32(a.W - 1));
  t.valid[0] = t.inside & ok_y0 & ok_x0;
  t.valid[1] = t.inside & ok_y0 & ok_x1;
  t.valid[2] = t.inside & ok_y1 & ok_x0;
  t.valid[3] = t.inside & ok_y1 & ok_x1;
  t.o = _mm512_maskz_add_epi32(t.inside, _mm512_mullo_epi32(y0, _mm512_set1_epi32(a.W)), x0);
  return t;
}

inline __mmask16 lanes_of(int64_t q, int64_t n) {
  const int64_t left = n - q;
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// The four neighbours of 16 sample points in one plane, read as two pairs per point: the
// neighbours (y0 + r, x0) and (y0 + r, x0 + 1) of row r are adjacent, so where both lie in
// the plane one 8-byte gather lane reads them (8-lane qword gathers cost about 9 cycles here,
// 16-lane dword gathers 15: the pairs halve the lanes); a point with only one of them in the
// plane (x0 == -1 or x0 == W - 1) reads it with a 4-byte gather instead. Nothing outside the
// plane is read, as the scalar rule says.
struct Pairs {
  __m256i idx[2][2];      // [row][half]: the left neighbour's offset of lanes 0-7 / 8-15
  __m512i o[4];           // each neighbour's offset (for the 4-byte reads at the edges)
  __mmask8 pair[2][2];    // [row][half]: both neighbours of the row in the plane
  __mmask16 edge[4];      // neighbour in the plane, its row partner not
  bool any_edge;
};

inline Pairs pairs_of(const __m512i o, const __mmask16 valid[4], int32_t W) {
  Pairs p;
  p.o[0] = o;
  p.o[1] = _mm512_add_epi32(o, _mm512_set1_epi32(1));
  p.o[2] = _mm512_add_epi32(o, _mm512_set1_epi32(W));
  p.o[3] = _mm512_add_epi32(o, _mm512_set1_epi32(W + 1));
  unsigned edges = 0;
  for (int r = 0; r < 2; ++r) {
    const __mmask16 both = valid[2 * r] & valid[2 * r + 1];
    p.idx[r][0] = _mm512_castsi512_si256(p.o[2 * r]);
    p.idx[r][1] = _mm512_extracti64x4_epi64(p.o[2 * r], 1);
    p.pair[r][0] = __mmask8(both & 0xFF);
    p.pair[r][1] = __mmask8(both >> 8);
    p.edge[2 * r] = valid[2 * r] & ~both;
    p.edge[2 * r + 1] = valid[2 * r + 1] & ~both;
    edges |= p.edge[2 * r] | p.edge[2 * r + 1];
  }
  p.any_edge = edges != 0;
  return p;
}

inline void read_neighbours(const Pairs& p, const float* plane, __m512 x[4]) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const long long* base = reinterpret_cast<const long long*>(plane);
  for (int r = 0; r < 2; ++r) {
    const __m512 lo = _mm512_castsi512_ps(
        _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), p.pair[r][0], p.idx[r][0], base, 4));
    const __m512 hi = _mm512_castsi512_ps(
        _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), p.pair[r][1], p.idx[r][1], base, 4));
    x[2 * r] = _mm512_permutex2var_ps(lo, even, hi);
    x[2 * r + 1] = _mm512_permutex2var_ps(lo, odd, hi);
  }
  if (p.any_edge)
    for (int nb = 0; nb < 4; ++nb) x[nb] = _mm512_mask_i32gather_ps(x[nb], p.edge[nb], p.o[nb], plane, 4);
}


// ---------------------------------------------------------------------------------------
// GEMMs of the tiles (MKL's sgemm runs its AVX2 kernels on this AMD CPU: ≈ 24 FLOP/cycle).
// Register blocks of MR rows × NV 16-float vectors of C, the reduction in increasing k, so
// the results do not depend on the blocking or the threads.

template <int MR, int NV>
inline void gemm_block(int64_t K, const float* A, int64_t a_m, int64_t a_k, const float* B, int64_t ldb, float* C,
                       int64_t ldc, const float* bias, bool accumulate, __mmask16 tail) {
  __m512 acc[MR][NV];
  _Pragma("GCC unroll 16")
  for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 16")
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    _Pragma("GCC unroll 16")
    for (int v = 0; v < NV; ++v)
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(tail, B + k * ldb + 16 * v) : _mm512_loadu_ps(B + k * ldb + 16 * v);
    _Pragma("GCC unroll 16")
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * a_m + k * a_k]);
      _Pragma("GCC unroll 16")
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  _Pragma("GCC unroll 16")
  for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 16")
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? tail : __mmask16(0xFFFF);
      __m512 x = acc[r][v];
      if (accumulate) x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c), x);
      if (bias != nullptr) x = _mm512_add_ps(x, _mm512_set1_ps(bias[r]));
      _mm512_mask_storeu_ps(c, m, x);
    }
}

template <int MR>
inline void gemm_rows(int64_t N, int64_t K, const float* A, int64_t a_m, int64_t a_k, const float* B, int64_t ldb,
                      float* C, int64_t ldc, const float* bias, bool accumulate) {
  int64_t j = 0;
  for (; j + 32 <= N; j += 32)
    gemm_block<MR, 2>(K, A, a_m, a_k, B + j, ldb, C + j, ldc, bias, accumulate, 0xFFFF);
  if (N - j > 16)
    gemm_block<MR, 2>(K, A, a_m, a_k, B + j, ldb, C + j, ldc, bias, accumulate, lanes_of(j + 16, N));
  else if (N - j > 0)
    gemm_block<MR, 1>(K, A, a_m, a_k, B + j, ldb, C + j, ldc, bias, accumulate, lanes_of(j, N));
}

// Dot products of rows: C[m][j] += sum over q of A[m lda + q] B[j ldb + q], 4 × 4 blocks of
// 16-lane partial sums, each reduced across its lanes at the end (a fixed order).
template <int MR, int NR>
inline void dot_block(int64_t Q, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  __m512 acc[MR][NR];
  _Pragma("GCC unroll 16")
  for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 16")
    for (int s = 0; s < NR; ++s) acc[r][s] = _mm512_setzero_ps();
  for (int64_t q = 0; q < Q; q += 16) {
    const __mmask16 m = lanes_of(q, Q);
    __m512 b[NR];
    _Pragma("GCC unroll 16")
    for (int s = 0; s < NR; ++s) b[s] = _mm512_maskz_loadu_ps(m, B + s * ldb + q);
    _Pragma("GCC unroll 16")
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_maskz_loadu_ps(m, A + r * lda + q);
      _Pragma("GCC unroll 16")
      for (int s = 0; s < NR; ++s) acc[r][s] = _mm512_fmadd_ps(a, b[s], acc[r][s]);
    }
  }
  _Pragma("GCC unroll 16")
  for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 16")
    for (int s = 0; s < NR; ++s) C[r * ldc + s] += _mm512_reduce_add_ps(acc[r][s]);
}

template <int MR>
inline void dot_rows(int64_t N, int64_t Q, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                     int64_t ldc) {
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) dot_block<MR, 4>(Q, A, lda, B + j * ldb, ldb, C + j, ldc);
  for (; j < N; ++j) dot_block<MR, 1>(Q, A, lda, B + j * ldb, ldb, C + j, ldc);
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_m, int64_t a_k, const float* B, int64_t ldb,
          float* C, int64_t ldc, const float* bias, bool accumulate) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8)
    gemm_rows<8>(N, K, A + m * a_m, a_m, a_k, B, ldb, C + m * ldc, ldc, bias == nullptr ? nullptr : bias + m,
                 accumulate);
  const float* Am = A + m * a_m;
  float* Cm = C + m * ldc;
  const float* bm = bias == nullptr ? nullptr : bias + m;
  switch (M - m) {
    case 7: gemm_rows<7>(N, K, Am, a_m, a_k, B, ldb, Cm, ldc, bm, accumulate); break;
    case 6: gemm_rows<6>(N, K, Am, a_m, a_k, B, ldb, Cm, ldc, bm, accumulate); break;
    case 5: gemm_rows<5>(N, K, Am, a_m, a_k, B, ldb, Cm, ldc, bm, accumulate); break;
    case 4: gemm_rows<4>(N, K, Am, a_m, a_k, B, ldb, Cm, ldc, bm, accumulate); break;
    case 3: gemm_rows<3>(N, K, Am, a_m, a_k, B, ldb, Cm, ldc, bm, accumulate); break;
    case 2: gemm_rows<2>(N, K, Am, a_m, a_k, B, ldb, Cm, ldc, bm, accumulate); break;
    case 1: gemm_rows<1>(N, K, Am, a_m, a_k, B, ldb, Cm, ldc, bm, accumulate); break;
    default: break;
  }
}

void gemm_dot_accumulate(int64_t M, int64_t N, int64_t Q, const float* A, int64_t lda, const float* B, int64_t ldb,
                         float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dot_rows<4>(N, Q, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  for (; m < M; ++m) dot_rows<1>(N, Q, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
}

namespace {
}  // namespace

void forward_columns(const TileArgs& a, float* col) {
  const int64_t kk = int64_t(a.kh) * a.kw, n = a.n;
  for (int64_t k = 0; k < kk; ++k) {
    const float* om = a.mask == nullptr ? nullptr : a.mask + (a.og * kk + k) * a.HoWo + a.p0;
    for (int64_t q = 0; q < n; q += 16) {
      const __mmask16 lanes = lanes_of(q, n);
      const Taps t = taps(a, coords(a, k, q, lanes), lanes);
      const __m512 m = om == nullptr ? _mm512_set1_ps(1.0f) : _mm512_maskz_loadu_ps(lanes, om + q);
      // Weights with the mask folded in, as the scalar path: m (wy wx) where the point samples
      // the plane, poison m elsewhere (0, or NaN for a NaN coordinate or mask), reading nothing.
      const __m512 pm = _mm512_mul_ps(t.poison, m);
      const __m512 w0 = _mm512_mask_blend_ps(t.sampled, pm, _mm512_mul_ps(m, _mm512_mul_ps(t.hy, t.hx)));
      const __m512 w1 = _mm512_mask_blend_ps(t.sampled, pm, _mm512_mul_ps(m, _mm512_mul_ps(t.hy, t.lx)));
      const __m512 w2 = _mm512_mask_blend_ps(t.sampled, pm, _mm512_mul_ps(m, _mm512_mul_ps(t.ly, t.hx)));
      const __m512 w3 = _mm512_mask_blend_ps(t.sampled, pm, _mm512_mul_ps(m, _mm512_mul_ps(t.ly, t.lx)));
      const __mmask16 read[4] = {__mmask16(t.valid[0] & t.sampled), __mmask16(t.valid[1] & t.sampled),
                                 __mmask16(t.valid[2] & t.sampled), __mmask16(t.valid[3] & t.sampled)};
      const Pairs pr = pairs_of(t.o, read, a.W);
      const float* plane = a.input;
      float* dst = col + k * n + q;
      for (int64_t c = 0; c < a.channels; ++c, plane += a.HW, dst += kk * n) {
        __m512 x[4];
        read_neighbours(pr, plane, x);
        __m512 v = _mm512_mul_ps(w0, x[0]);
        v = _mm512_fmadd_ps(w1, x[1], v);
        v = _mm512_fmadd_ps(w2, x[2], v);
        v = _mm512_fmadd_ps(w3, x[3], v);
        _mm512_mask_storeu_ps(dst, lanes, v);
      }
    }
  }
}

void backward_tile(const TileArgs& a, const float* grad_col, float* val, float* goff, float* gmask, float* gin,
                   float* scratch) {
  const int64_t kk = int64_t(a.kh) * a.kw, n = a.n;
  const __m512 zero = _mm512_setzero_ps();
  alignas(64) int64_t o[16];  // each point's neighbour (y0, x0), widened
  const int64_t W = a.W, d[4] = {0, 1, W, W + 1};
  for (int64_t k = 0; k < kk; ++k) {
    const int64_t cm = a.og * kk + k;
    const float* om = a.mask == nullptr ? nullptr : a.mask + cm * a.HoWo + a.p0;
    float* gy_out = goff + 2 * cm * a.HoWo + a.p0;
    float* gx_out = gy_out + a.HoWo;
    float* gm_out = gmask == nullptr ? nullptr : gmask + cm * a.HoWo + a.p0;
    for (int64_t q = 0; q < n; q += 16) {
      const __mmask16 lanes = lanes_of(q, n);
      const Taps t = taps(a, coords(a, k, q, lanes), lanes);
      const __m512 m = om == nullptr ? _mm512_set1_ps(1.0f) : _mm512_maskz_loadu_ps(lanes, om + q);
      // Value weights (0 where the point does not sample the plane) and coordinate-gradient
      // weights d weight / d y, d weight / d x of each neighbour.
      const __m512 w0 = _mm512_maskz_mul_ps(t.sampled, t.hy, t.hx);
      const __m512 w1 = _mm512_maskz_mul_ps(t.sampled, t.hy, t.lx);
      const __m512 w2 = _mm512_maskz_mul_ps(t.sampled, t.ly, t.hx);
      const __m512 w3 = _mm512_maskz_mul_ps(t.sampled, t.ly, t.lx);
      // A point whose neighbours are all outside and whose coordinates are not NaN has no
      // coordinate gradient at all (the scalar path skips it): only `active` lanes accumulate.
      const __mmask16 active = t.inside | (lanes & _mm512_cmp_ps_mask(t.poison, t.poison, _CMP_UNORD_Q));
      const Pairs pr = pairs_of(t.o, t.valid, a.W);
      const unsigned full = t.sampled & t.valid[0] & t.valid[1] & t.valid[2] & t.valid[3];
      _mm512_storeu_si512(o, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(t.o)));
      _mm512_storeu_si512(o + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(t.o, 1)));
      __m512 acc_y = zero, acc_x = zero, acc_m = zero;
      const float* plane = a.input;
      const float* gc = grad_col + k * n + q;
      float* vr = val + k * n + q;
      for (int64_t c = 0; c < a.channels; ++c, plane += a.HW, gc += kk * n, vr += kk * n) {
        __m512 x[4];
        read_neighbours(pr, plane, x);
        const __m512 x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
        __m512 v = _mm512_mul_ps(w0, x0);
        v = _mm512_fmadd_ps(w1, x1, v);
        v = _mm512_fmadd_ps(w2, x2, v);
        v = _mm512_fmadd_ps(w3, x3, v);
        v = _mm512_mask_blend_ps(t.sampled, t.poison, v);
        // d sample / d y = hx (x2 - x0) + lx (x3 - x1); d sample / d x = hy (x1 - x0) + ly (x3 - x2).
        const __m512 dy = _mm512_add_ps(
            _mm512_fmadd_ps(t.hx, _mm512_sub_ps(x2, x0), _mm512_mul_ps(t.lx, _mm512_sub_ps(x3, x1))), t.poison);
        const __m512 dx = _mm512_add_ps(
            _mm512_fmadd_ps(t.hy, _mm512_sub_ps(x1, x0), _mm512_mul_ps(t.ly, _mm512_sub_ps(x3, x2))), t.poison);
        const __m512 g = _mm512_maskz_loadu_ps(lanes, gc);
        const __m512 gs = _mm512_mul_ps(g, m);
        acc_m = _mm512_fmadd_ps(g, v, acc_m);
        acc_y = _mm512_mask3_fmadd_ps(gs, dy, acc_y, active);
        acc_x = _mm512_mask3_fmadd_ps(gs, dx, acc_x, active);
        _mm512_mask_storeu_ps(vr, lanes, _mm512_mul_ps(v, m));
        // The scatter's values of this channel; added below, after every channel's.
        if (t.sampled == 0) continue;
        float* sc = scratch + c * 64;
        _mm512_storeu_ps(sc, _mm512_mul_ps(gs, w0));
        _mm512_storeu_ps(sc + 16, _mm512_mul_ps(gs, w1));
        _mm512_storeu_ps(sc + 32, _mm512_mul_ps(gs, w2));
        _mm512_storeu_ps(sc + 48, _mm512_mul_ps(gs, w3));
      }
      // The scatter into grad_input: per plane in order of position then neighbour, the
      // planes of the group interleaved per position, so that two read-modify-writes of one
      // element (a point's right neighbour is often the next point's left one) have the other
      // channels' between them instead of waiting on each other. A point with all four
      // neighbours in the plane (most of them) adds its values without tests.
      for (unsigned todo = t.sampled; todo != 0; todo &= todo - 1) {
        const int l = __builtin_ctz(todo);
        const float* sc = scratch + l;
        if (full >> l & 1u) {  // then o[l] >= 0
          float* at = gin + o[l];
          for (int64_t c = 0; c < a.channels; ++c, at += a.HW, sc += 64) {
            at[0] += sc[0];
            at[1] += sc[16];
            at[W] += sc[32];
            at[W + 1] += sc[48];
          }
          continue;
        }
        for (int64_t c = 0; c < a.channels; ++c, sc += 64)
          for (int nb = 0; nb < 4; ++nb)
            if (t.valid[nb] >> l & 1u) gin[c * a.HW + o[l] + d[nb]] += sc[16 * nb];
      }
      _mm512_mask_storeu_ps(gy_out + q, lanes, acc_y);
      _mm512_mask_storeu_ps(gx_out + q, lanes, acc_x);
      if (gm_out != nullptr) _mm512_mask_storeu_ps(gm_out + q, lanes, acc_m);
    }
  }
}

}  // namespace avx512
}  // namespace deform_conv2d
}  // namespace vsr_kernels
#endif
