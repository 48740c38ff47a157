// The tiled backward of local argmax attention (AVX-512, float32): the gathers and scatters of
// the selected key and value pixels go through channels-last tiles of kTileChannels channels,
// one 64-byte vector per pixel, made and unmade by 16 x 16 transposes in registers. Included by
// local_argmax_attention_simd.h, inside its per-ISA namespace; the other copies report
// tile_channels() = 0 and keep the per-element kernels there.
//
// Why: on this Zen 5 core a hardware gather costs ~0.43 ns per element even from L1, and a
// scalar read-modify-write scatter ~0.5 ns, while a transpose costs ~0.03 ns per element, so
// moving a pixel's 16 channels as one vector, after transposing the planes a row at a time, does
// the same work for a fraction of the cost (benchmarks/NOTES.md, session 6). Each result element
// still receives the same terms in the same order as the per-element kernels: the same bits.

#if VSR_SIMD_FMA && VSR_SIMD_BYTES == 64
constexpr bool kTiles = true;

// In place: rows r[0..15] become columns. The masked forms with every lane set are the plain
// instructions; the unmasked intrinsics pass _mm512_undefined_ps(), which GCC 12 reports as
// maybe-uninitialized wherever they are inlined.
inline __m512 unpacklo(__m512 x, __m512 y) { return _mm512_mask_unpacklo_ps(x, 0xFFFF, x, y); }
inline __m512 unpackhi(__m512 x, __m512 y) { return _mm512_mask_unpackhi_ps(x, 0xFFFF, x, y); }
inline __m512 unpacklo2(__m512 x, __m512 y) {  // 64-bit pairs
  const __m512d xd = _mm512_castps_pd(x);
  return _mm512_castpd_ps(_mm512_mask_unpacklo_pd(xd, 0xFF, xd, _mm512_castps_pd(y)));
}
inline __m512 unpackhi2(__m512 x, __m512 y) {
  const __m512d xd = _mm512_castps_pd(x);
  return _mm512_castpd_ps(_mm512_mask_unpackhi_pd(xd, 0xFF, xd, _mm512_castps_pd(y)));
}
template <int Imm>
inline __m512 lanes128(__m512 x, __m512 y) {
  return _mm512_mask_shuffle_f32x4(x, 0xFFFF, x, y, Imm);
}

inline void transpose16(__m512 r[16]) {
  __m512 a[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = unpacklo(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = unpackhi(r[2 * i], r[2 * i + 1]);
  }
  __m512 b[16];
  for (int j = 0; j < 4; ++j) {
    b[4 * j] = unpacklo2(a[4 * j], a[4 * j + 2]);
    b[4 * j + 1] = unpackhi2(a[4 * j], a[4 * j + 2]);
    b[4 * j + 2] = unpacklo2(a[4 * j + 1], a[4 * j + 3]);
    b[4 * j + 3] = unpackhi2(a[4 * j + 1], a[4 * j + 3]);
  }
  // Now 128-bit lane l of b[4j + m] holds rows 4j .. 4j + 3 of column 4l + m.
  for (int m = 0; m < 4; ++m) {
    const __m512 c0 = lanes128<0x88>(b[m], b[4 + m]), c1 = lanes128<0xDD>(b[m], b[4 + m]),
                 c2 = lanes128<0x88>(b[8 + m], b[12 + m]), c3 = lanes128<0xDD>(b[8 + m], b[12 + m]);
    r[m] = lanes128<0x88>(c0, c2);
    r[4 + m] = lanes128<0x88>(c1, c3);
    r[8 + m] = lanes128<0xDD>(c0, c2);
    r[12 + m] = lanes128<0xDD>(c1, c3);
  }
}

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// tiles[i * 16 + c] = planes[c * stride + i] for i < m <= 16, c < 16. Whole groups store with
// 16 fixed instructions: a loop over a variable count became a spill of r and a `rep movsq`
// copy of it, whose 8-byte reads of the 64-byte spills stall on store forwarding.
inline void to_tile_group(const float* planes, int64_t stride, int64_t m, float* tiles) {
  const __mmask16 lanes = first_lanes(m);
  __m512 r[16];
  for (int c = 0; c < 16; ++c) r[c] = _mm512_maskz_loadu_ps(lanes, planes + c * stride);
  transpose16(r);
  if (m == 16)
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(tiles + i * 16, r[i]);
  else
    for (int i = 0; i < 16; ++i) _mm512_mask_storeu_ps(tiles + i * 16, i < m ? 0xFFFF : 0, r[i]);
}

// tiles[x * 16 + c] = planes[c * stride + x] for x < n, c < 16.
inline void to_tiles(const float* planes, int64_t stride, int64_t n, float* tiles) {
  for (int64_t x = 0; x < n; x += 16) to_tile_group(planes + x, stride, std::min<int64_t>(16, n - x), tiles + x * 16);
}

// planes[c * stride + x] = tiles[x * 16 + c] for x < n, c < 16, and the tiles zeroed behind (the
// ring row is reused next, as accumulators). Where the planes' lines are whole 64-byte lines
// (aligned, stride a multiple of 16), stored non-temporally: the results are not read again
// here, and a plain store would first read each line from memory.
inline void from_tiles_clearing(float* tiles, int64_t n, float* planes, int64_t stride) {
  const bool whole_lines = reinterpret_cast<uintptr_t>(planes) % 64 == 0 && stride % 16 == 0;
  for (int64_t x = 0; x < n; x += 16) {
    const int64_t m = std::min<int64_t>(16, n - x);
    const __mmask16 lanes = first_lanes(m);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) {
      const __mmask16 row = i < m ? 0xFFFF : 0;
      r[i] = _mm512_maskz_loadu_ps(row, tiles + (x + i) * 16);
      _mm512_mask_storeu_ps(tiles + (x + i) * 16, row, _mm512_setzero_ps());
    }
    transpose16(r);
    if (whole_lines && m == 16)
      for (int c = 0; c < 16; ++c) _mm512_stream_ps(planes + c * stride + x, r[c]);
    else
      for (int c = 0; c < 16; ++c) _mm512_mask_storeu_ps(planes + c * stride + x, lanes, r[c]);
  }
}

// The tiles of up to 16 pixels' selections sel[0 .. m) (tile(s): where pixel s's tile starts;
// `none`: what a pixel selecting nothing, and lanes from m on, read), transposed back into one
// vector per channel, lanes = pixels. Returns the lanes whose pixel selects one.
template <typename TileOf>
inline __mmask16 gather_columns(const int32_t* sel, int64_t m, const float* none, TileOf tile, __m512 r[16]) {
  __mmask16 selected = 0;
  for (int j = 0; j < 16; ++j) {
    const int32_t s = j < m ? sel[j] : -1;
    r[j] = _mm512_loadu_ps(s < 0 ? none : tile(s));
    selected |= __mmask16(s >= 0) << j;
  }
  transpose16(r);
  return selected;
}

// Channels [c, c + 16) of selection_grad's sum over pixels [p0, p0 + n) (sel, acc: the band's):
// acc[i] = fma(go[c'][p0 + i], v[c'][sel[i]], acc[i]) for c' in increasing order, the value
// pixels read from tiles of the window [lo, hi) that holds every selected one. A pixel that
// selects nothing reads the window's first pixel (its sum is never used).
inline void selection_tile(const SelectionArgs<float>& a, int64_t c, const int32_t* sel, float* acc, int64_t n,
                           int64_t lo, int64_t hi) {
  const int64_t stride = a.channel_stride;
  to_tiles(a.v + c * stride + lo, stride, hi - lo, a.window);
  const float* go = a.go + c * stride + a.p0;
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    const __mmask16 lanes = first_lanes(m);
    __m512 r[16];
    gather_columns(sel + i, m, a.window, [&](int32_t s) { return a.window + (s - lo) * 16; }, r);
    __m512 sum = _mm512_maskz_loadu_ps(lanes, acc + i);
    for (int k = 0; k < 16; ++k) sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, go + k * stride + i), r[k], sum);
    _mm512_mask_storeu_ps(acc + i, lanes, sum);
  }
}

// A 64-byte-aligned, zero-filled scratch of n floats.
class TileBuffer {
 public:
  explicit TileBuffer(int64_t n) : storage_(n + 16) {
    const auto misalignment = reinterpret_cast<uintptr_t>(storage_.data()) % 64;
    data_ = storage_.data() + (misalignment ? (64 - misalignment) / sizeof(float) : 0);
  }
  float* data() { return data_; }

 private:
  std::vector<float> storage_;
  float* data_;
};

// See TileArgs (local_argmax_attention_isa.h). Per frame, rows in increasing y: the key row
// entering the window of row y (y + reach) is transposed into the ring (its grad_key and
// grad_value ring rows are zero: the buffer starts zeroed, and each flush clears its row); then
// each pixel's terms are one vector each, in increasing x: grad_query's (into its tile, or, for
// frames whose tiles exceed kMaxQueryTileBytes, per 16 pixels their key tiles transposed back
// and added to its planes: the same masked fmas as gather_fma_masked, frames in increasing t),
// grad_key's and grad_value's; the ring row no later query row can reach (y - reach) is
// transposed out into grad_key and grad_value.
constexpr int64_t kMaxQueryTileBytes = 512 << 10;

inline void key_value_tiles_impl(const TileArgs& a) {
  const int64_t H = a.height, W = a.width, P = H * W;
  const int64_t reach = std::min(a.reach, H - 1), S = std::min(2 * reach + 1, H), ring = S * W;
  // grad_query's tiles for the whole frame, accumulated over the frames and transposed out once,
  // where they fit in L2 beside the rings; else each frame's terms are gathered into its planes.
  const int64_t gq_pixels = P * 64 <= kMaxQueryTileBytes ? P : 0;
  TileBuffer buffer((3 * ring + 2 * W + 1 + gq_pixels) * 16);
  float *const keys = buffer.data(), *const gkeys = keys + ring * 16, *const gvalues = gkeys + ring * 16,
               *const qrow = gvalues + ring * 16, *const gorow = qrow + W * 16, *const zeros = gorow + W * 16,
               *const gq_tiles = gq_pixels ? zeros + 16 : nullptr;
  auto slot = [&](int64_t y) { return y % S * W * 16; };  // where row y's tiles start in a ring
  for (int64_t t = 0; t < a.frames; ++t) {
    const int32_t* sel = a.sel + t * P;
    const float *g = a.g + t * P, *score = a.score + t * P, *k = a.k + t * a.key_frame_stride,
                *go = a.go + t * a.value_frame_stride;
    float *gk = a.gk + t * a.key_frame_stride, *gv = a.gv + t * a.value_frame_stride;
    auto flush = [&](int64_t y) {
      from_tiles_clearing(gkeys + slot(y), W, gk + y * W, P);
      from_tiles_clearing(gvalues + slot(y), W, gv + y * W, P);
    };
    int64_t entered = 0, flushed = 0;  // rows taken into the ring, and out of it
    for (int64_t y = 0; y < H; ++y) {
      for (; entered < H && entered <= y + reach; ++entered) {
        to_tiles(k + entered * W, P, W, keys + slot(entered));  // its gradient rows are zero
      }
      to_tiles(a.q + y * W, P, W, qrow);
      to_tiles(go + y * W, P, W, gorow);
      // Pixel s's tile in a ring: rows [y0, y0 + S) hold every pixel row y can select.
      const int64_t y0 = std::max<int64_t>(0, y - reach), shift = y0 % S * W - y0 * W;
      auto tile = [&](int32_t s) {
        int64_t o = s + shift;
        return (o >= ring ? o - ring : o) * 16;
      };
      const int64_t p0 = y * W;
      // The lines of the next row's planes (the key row entering next, the next query, grad_out
      // and grad_query rows), prefetched into L2 group by group: the 16-plane row reads are
      // more concurrent streams than the hardware prefetchers follow.
      const float* ahead[4] = {entered < H ? k + entered * W : nullptr, y + 1 < H ? a.q + p0 + W : nullptr,
                               y + 1 < H ? go + p0 + W : nullptr,
                               y + 1 < H && t > 0 && !gq_tiles ? a.gq + p0 + W : nullptr};
      for (int64_t x = 0; x < W; x += 16) {
        for (const float* plane : ahead)
          if (plane)
            for (int c = 0; c < 16; ++c) prefetch_line<1>(plane + c * P + x);
        if (gq_tiles) continue;
        const int64_t m = std::min<int64_t>(16, W - x);
        const __mmask16 lanes = first_lanes(m);
        __m512 r[16];
        const __mmask16 selected =
            gather_columns(sel + p0 + x, m, zeros, [&](int32_t s) { return keys + tile(s); }, r);
        const __m512 gp = _mm512_maskz_loadu_ps(lanes, g + p0 + x);
        for (int c = 0; c < 16; ++c) {
          float* gq = a.gq + c * P + p0 + x;
          const __m512 old = t == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lanes, gq);
          _mm512_mask_storeu_ps(gq, lanes, _mm512_mask3_fmadd_ps(gp, r[c], old, selected));
        }
      }
      for (int64_t x = 0; x < W; ++x) {
        const int32_t s = sel[p0 + x];
        if (s < 0) continue;
        if (gq_tiles) {
          float* gqt = gq_tiles + (p0 + x) * 16;
          _mm512_storeu_ps(gqt, _mm512_fmadd_ps(_mm512_set1_ps(g[p0 + x]), _mm512_loadu_ps(keys + tile(s)),
                                                _mm512_loadu_ps(gqt)));
        }
        float *gkt = gkeys + tile(s), *gvt = gvalues + tile(s);
        _mm512_storeu_ps(gkt, _mm512_fmadd_ps(_mm512_set1_ps(g[p0 + x]), _mm512_loadu_ps(qrow + x * 16),
                                              _mm512_loadu_ps(gkt)));
        _mm512_storeu_ps(gvt, _mm512_fmadd_ps(_mm512_set1_ps(score[p0 + x]), _mm512_loadu_ps(gorow + x * 16),
                                              _mm512_loadu_ps(gvt)));
      }
      for (; flushed <= y - reach; ++flushed) flush(flushed);
    }
    for (; flushed < H; ++flushed) flush(flushed);
  }
  if (gq_tiles) from_tiles_clearing(gq_tiles, P, a.gq, P);
  _mm_sfence();  // the non-temporal stores are visible before the task ends
}

int tile_channels(float) { return kTileChannels; }
void key_value_tiles(const TileArgs& a) { key_value_tiles_impl(a); }

#else
constexpr bool kTiles = false;

int tile_channels(float) { return 0; }
void key_value_tiles(const TileArgs&) { __builtin_trap(); }  // tile_channels() == 0: never called

#endif
