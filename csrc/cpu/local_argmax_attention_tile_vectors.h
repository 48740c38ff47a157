// The vector operations of the tiled backward (local_argmax_attention_tiles.h), one struct per
// tile width: Vec holds kLanes floats (one pixel's channels of a tile, or one channel's pixels),
// Lanes a lane mask. TileVector16 (AVX-512 copy): 16 lanes and k-masks; TileVector8 (AVX2 and
// AVX-512 copies): 8 lanes and vector masks. Included inside the per-ISA namespace; defines
// VSR_TILE_VECTOR to 1 where tiles exist (not in the base copy).
//
// load_first / store_first touch only the first lanes of a mask built by first(n) (no access past
// them, so they may run off an allocation's end); fma_where(lanes, a, b, c) is a * b + c fused on
// the lanes, c elsewhere: the same bits per lane as the fused multiply-add itself.

#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
struct TileVector16 {
  static constexpr int kLanes = 16;
  using Vec = __m512;
  using Lanes = __mmask16;

  static Lanes first(int64_t n) { return n >= kLanes ? Lanes(0xFFFF) : Lanes((1u << n) - 1); }
  // The lanes j in `lanes` where s[j] >= 0 (s read on those lanes only).
  static Lanes selecting(Lanes lanes, const int32_t* s) {
    return _mm512_mask_cmpge_epi32_mask(lanes, _mm512_maskz_loadu_epi32(lanes, s), _mm512_setzero_si512());
  }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec broadcast(float x) { return _mm512_set1_ps(x); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load_first(Lanes m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void store_first(float* p, Lanes m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
  static void stream(float* p, Vec v) { _mm512_stream_ps(p, v); }  // p: 64-byte aligned
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec fma_where(Lanes m, Vec a, Vec b, Vec c) { return _mm512_mask3_fmadd_ps(a, b, c, m); }

  // In place: rows r[0..15] become columns. The masked forms with every lane set are the plain
  // instructions; the unmasked intrinsics pass _mm512_undefined_ps(), which GCC 12 reports as
  // maybe-uninitialized wherever they are inlined.
  static void transpose(Vec r[kLanes]) {
    Vec a[16];
    for (int i = 0; i < 8; ++i) {
      a[2 * i] = _mm512_mask_unpacklo_ps(r[2 * i], 0xFFFF, r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm512_mask_unpackhi_ps(r[2 * i], 0xFFFF, r[2 * i], r[2 * i + 1]);
    }
    Vec b[16];
    for (int j = 0; j < 4; ++j) {
      b[4 * j] = pairs_lo(a[4 * j], a[4 * j + 2]);
      b[4 * j + 1] = pairs_hi(a[4 * j], a[4 * j + 2]);
      b[4 * j + 2] = pairs_lo(a[4 * j + 1], a[4 * j + 3]);
      b[4 * j + 3] = pairs_hi(a[4 * j + 1], a[4 * j + 3]);
    }
    // Now 128-bit lane l of b[4j + m] holds rows 4j .. 4j + 3 of column 4l + m.
    for (int m = 0; m < 4; ++m) {
      const Vec c0 = quarters<0x88>(b[m], b[4 + m]), c1 = quarters<0xDD>(b[m], b[4 + m]),
                c2 = quarters<0x88>(b[8 + m], b[12 + m]), c3 = quarters<0xDD>(b[8 + m], b[12 + m]);
      r[m] = quarters<0x88>(c0, c2);
      r[4 + m] = quarters<0x88>(c1, c3);
      r[8 + m] = quarters<0xDD>(c0, c2);
      r[12 + m] = quarters<0xDD>(c1, c3);
    }
  }

 private:
  static Vec pairs_lo(Vec x, Vec y) {  // unpacklo of 64-bit pairs
    const __m512d xd = _mm512_castps_pd(x);
    return _mm512_castpd_ps(_mm512_mask_unpacklo_pd(xd, 0xFF, xd, _mm512_castps_pd(y)));
  }
  static Vec pairs_hi(Vec x, Vec y) {
    const __m512d xd = _mm512_castps_pd(x);
    return _mm512_castpd_ps(_mm512_mask_unpackhi_pd(xd, 0xFF, xd, _mm512_castps_pd(y)));
  }
  template <int Imm>
  static Vec quarters(Vec x, Vec y) {  // 128-bit lanes of x and y
    return _mm512_mask_shuffle_f32x4(x, 0xFFFF, x, y, Imm);
  }
};

#endif

#if VSR_SIMD_FMA && VSR_SIMD_BYTES >= 32
#define VSR_TILE_VECTOR 1

struct TileVector8 {
  static constexpr int kLanes = 8;
  using Vec = __m256;
  using Lanes = __m256i;  // all ones in a lane that is set

  static Lanes first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, kLanes))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Lanes selecting(Lanes lanes, const int32_t* s) {
    const __m256i sel = _mm256_maskload_epi32(s, lanes);
    return _mm256_and_si256(lanes, _mm256_cmpgt_epi32(sel, _mm256_set1_epi32(-1)));
  }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec broadcast(float x) { return _mm256_set1_ps(x); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load_first(Lanes m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static void store_first(float* p, Lanes m, Vec v) { _mm256_maskstore_ps(p, m, v); }
  static void stream(float* p, Vec v) { _mm256_stream_ps(p, v); }  // p: 32-byte aligned
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec fma_where(Lanes m, Vec a, Vec b, Vec c) {
    return _mm256_blendv_ps(c, _mm256_fmadd_ps(a, b, c), _mm256_castsi256_ps(m));
  }

  // In place: rows r[0..7] become columns.
  static void transpose(Vec r[kLanes]) {
    Vec a[8], b[8];
    for (int i = 0; i < 4; ++i) {
      a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // 128-bit half h of b[4j + m] holds rows 4j .. 4j + 3 of column 4h + m.
    for (int j = 0; j < 2; ++j) {
      b[4 * j] = _mm256_shuffle_ps(a[4 * j], a[4 * j + 2], 0x44);
      b[4 * j + 1] = _mm256_shuffle_ps(a[4 * j], a[4 * j + 2], 0xEE);
      b[4 * j + 2] = _mm256_shuffle_ps(a[4 * j + 1], a[4 * j + 3], 0x44);
      b[4 * j + 3] = _mm256_shuffle_ps(a[4 * j + 1], a[4 * j + 3], 0xEE);
    }
    for (int m = 0; m < 4; ++m) {
      r[m] = _mm256_permute2f128_ps(b[m], b[4 + m], 0x20);
      r[4 + m] = _mm256_permute2f128_ps(b[m], b[4 + m], 0x31);
    }
  }
};

#else
#define VSR_TILE_VECTOR 0
#endif
