// The tiled backward of local argmax attention (float32, AVX-512 and AVX2): the gathers and
// scatters of the selected key and value pixels go through channels-last tiles of L channels, one
// vector per pixel (L = V::kLanes of the tile vector V: 16 or 8 with AVX-512, see tile_channels;
// 8 with AVX2), made and unmade by L x L transposes in registers. Included by
// local_argmax_attention_simd.h, inside its per-ISA namespace; the base copy reports
// tile_channels() = 0 and keeps the per-element kernels.
//
// Why: on this Zen 5 core a hardware gather costs ~0.43 ns per element even from L1, and a
// scalar read-modify-write scatter ~0.5 ns, while a transpose costs ~0.03 ns per element, so
// moving a pixel's L channels as one vector, after transposing the planes a row at a time, does
// the same work for a fraction of the cost (benchmarks/NOTES.md, sessions 6 and 7). Each result
// element still receives the same terms in the same order as the per-element kernels: the same
// bits.

#include "local_argmax_attention_tile_vectors.h"

#if VSR_TILE_VECTOR

// tiles[i * L + c] = planes[c * stride + i] for i < m <= L, c < L. Whole groups load and store
// with L fixed plain instructions: AVX2's masked loads and stores (vmaskmovps) cost several
// plain ones on this Zen core, and a loop over a variable count became a spill of r and a
// `rep movsq` copy of it, whose 8-byte reads of the 64-byte spills stall on store forwarding.
template <typename V>
inline void to_tile_group(const float* planes, int64_t stride, int64_t m, float* tiles) {
  constexpr int L = V::kLanes;
  typename V::Vec r[L];
  if (m == L) {
    for (int c = 0; c < L; ++c) r[c] = V::load(planes + c * stride);
    V::transpose(r);
    for (int i = 0; i < L; ++i) V::store(tiles + i * L, r[i]);
  } else {
    const typename V::Lanes lanes = V::first(m);
    for (int c = 0; c < L; ++c) r[c] = V::load_first(lanes, planes + c * stride);
    V::transpose(r);
    for (int i = 0; i < L; ++i)
      if (i < m) V::store(tiles + i * L, r[i]);
  }
}

// tiles[x * L + c] = planes[c * stride + x] for x < n, c < L.
template <typename V>
inline void to_tiles(const float* planes, int64_t stride, int64_t n, float* tiles) {
  constexpr int L = V::kLanes;
  for (int64_t x = 0; x < n; x += L) to_tile_group<V>(planes + x, stride, std::min<int64_t>(L, n - x), tiles + x * L);
}

// planes[c * stride + x] = tiles[x * tile_stride + c] for x < n, c < L, and those tiles zeroed behind (the
// ring row is reused next, as accumulators). A 64-byte line of each plane (16 pixels: one
// transposed group with AVX-512, two with AVX2) at a time: where the planes' lines are whole
// lines (aligned, stride a multiple of 16), each line is stored non-temporally by consecutive
// stores, as the results are not read again here and a plain store would first read the line
// from memory. (AVX2 stores of a line's halves a group apart left lines half written in the
// write-combining buffers: at two threads, up to twice as slow.)
template <typename V>
inline void from_tiles_clearing(float* tiles, int64_t tile_stride, int64_t n, float* planes, int64_t stride) {
  constexpr int L = V::kLanes, kGroups = 16 / L;  // transposed groups per line
  const bool whole_lines = reinterpret_cast<uintptr_t>(planes) % 64 == 0 && stride % 16 == 0;
  for (int64_t x = 0; x < n; x += 16) {
    typename V::Vec r[kGroups][L];
    int64_t m[kGroups];
    for (int h = 0; h < kGroups; ++h) {
      m[h] = std::clamp<int64_t>(n - x - h * L, 0, L);
      float* group = tiles + (x + h * L) * tile_stride;
      for (int i = 0; i < L; ++i) {
        r[h][i] = i < m[h] ? V::load(group + i * tile_stride) : V::zero();
        if (i < m[h]) V::store(group + i * tile_stride, V::zero());
      }
      V::transpose(r[h]);
    }
    if (whole_lines && n - x >= 16) {
      for (int c = 0; c < L; ++c)
        for (int h = 0; h < kGroups; ++h) V::stream(planes + c * stride + x + h * L, r[h][c]);
    } else {
      for (int c = 0; c < L; ++c)
        for (int h = 0; h < kGroups; ++h)
          if (m[h] > 0) V::store_first(planes + c * stride + x + h * L, V::first(m[h]), r[h][c]);
    }
  }
}

// The tiles of up to L pixels' selections sel[0 .. m) (tile(s): where pixel s's tile starts;
// `none`: what a pixel selecting nothing, and lanes from m on, read), transposed back into one
// vector per channel, lanes = pixels. Returns the lanes whose pixel selects one.
template <typename V, typename TileOf>
inline typename V::Lanes gather_columns(const int32_t* sel, int64_t m, const float* none, TileOf tile,
                                        typename V::Vec r[V::kLanes]) {
  for (int j = 0; j < V::kLanes; ++j) {
    const int32_t s = j < m ? sel[j] : -1;
    r[j] = V::load(s < 0 ? none : tile(s));
  }
  V::transpose(r);
  return V::selecting(V::first(m), sel);
}

// Channels [c, c + L) of selection_grad's sum over pixels [p0, p0 + n) (sel, acc: the band's):
// acc[i] = fma(go[c'][p0 + i], v[c'][sel[i]], acc[i]) for c' in increasing order, the value
// pixels read from tiles of the window [lo, hi) that holds every selected one. A pixel that
// selects nothing reads the window's first pixel (its sum is never used).
template <typename V>
inline void selection_tile(const SelectionArgs<float>& a, int64_t c, const int32_t* sel, float* acc, int64_t n,
                           int64_t lo, int64_t hi) {
  constexpr int L = V::kLanes;
  const int64_t stride = a.channel_stride;
  to_tiles<V>(a.v + c * stride + lo, stride, hi - lo, a.window);
  const float* go = a.go + c * stride + a.p0;
  for (int64_t i = 0; i < n; i += L) {
    const int64_t m = std::min<int64_t>(L, n - i);
    typename V::Vec r[L];
    gather_columns<V>(sel + i, m, a.window, [&](int32_t s) { return a.window + (s - lo) * L; }, r);
    if (m == L) {  // plain loads and stores: see to_tile_group
      typename V::Vec sum = V::load(acc + i);
      for (int k = 0; k < L; ++k) sum = V::fma(V::load(go + k * stride + i), r[k], sum);
      V::store(acc + i, sum);
    } else {
      const typename V::Lanes lanes = V::first(m);
      typename V::Vec sum = V::load_first(lanes, acc + i);
      for (int k = 0; k < L; ++k) sum = V::fma(V::load_first(lanes, go + k * stride + i), r[k], sum);
      V::store_first(acc + i, lanes, sum);
    }
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
// frames whose tiles exceed kMaxFrameTileBytes, per L pixels their key tiles transposed back
// and added to its planes: the same masked fmas as gather_fma_masked, frames in increasing t),
// grad_key's and grad_value's; the ring row no later query row can reach (y - reach) is
// transposed out into grad_key and grad_value.
constexpr int64_t kMaxFrameTileBytes = 512 << 10;

template <typename V>
inline void key_value_tiles_impl(const TileArgs& a) {
  const int64_t H = a.height, W = a.width, P = H * W;
  const int64_t reach = std::min(a.reach, H - 1), S = std::min(2 * reach + 1, H), ring = S * W;
  constexpr int L = V::kLanes;
  // Tiles of the whole frame, where they fit in L2 beside the rings (kMaxFrameTileBytes in all):
  // grad_query's, accumulated over the frames and transposed out once (else each frame's terms
  // are gathered into its planes); and, where both fit, the query's, transposed once rather than
  // a row at a time in every frame (else into qrow).
  const int64_t frame_tile_bytes = P * L * int64_t(sizeof(float));
  const int64_t gq_pixels = frame_tile_bytes <= kMaxFrameTileBytes ? P : 0,
                q_pixels = 2 * frame_tile_bytes <= kMaxFrameTileBytes ? P : 0;
  TileBuffer buffer((3 * ring + 2 * W + 1 + gq_pixels + q_pixels) * L);
  // The gradient ring interleaves each pixel's grad_key and grad_value tiles (a 64-byte line
  // for both with 8 lanes), which the scatter below updates together.
  float *const keys = buffer.data(), *const gkv = keys + ring * L, *const qrow = gkv + 2 * ring * L, *const gorow = qrow + W * L, *const zeros = gorow + W * L,
               *const gq_tiles = gq_pixels ? zeros + L : nullptr,
               *const q_tiles = q_pixels ? zeros + L + gq_pixels * L : nullptr;
  if (q_tiles) to_tiles<V>(a.q, P, P, q_tiles);
  auto slot = [&](int64_t y) { return y % S * W * L; };  // where row y's tiles start in a ring
  for (int64_t t = 0; t < a.frames; ++t) {
    const int32_t* sel = a.sel + t * P;
    const float *g = a.g + t * P, *score = a.score + t * P, *k = a.k + t * a.key_frame_stride,
                *go = a.go + t * a.value_frame_stride;
    float *gk = a.gk + t * a.key_frame_stride, *gv = a.gv + t * a.value_frame_stride;
    auto flush = [&](int64_t y) {
      from_tiles_clearing<V>(gkv + 2 * slot(y), 2 * L, W, gk + y * W, P);
      from_tiles_clearing<V>(gkv + 2 * slot(y) + L, 2 * L, W, gv + y * W, P);
    };
    int64_t entered = 0, flushed = 0;  // rows taken into the ring, and out of it
    for (int64_t y = 0; y < H; ++y) {
      for (; entered < H && entered <= y + reach; ++entered) {
        to_tiles<V>(k + entered * W, P, W, keys + slot(entered));  // its gradient rows are zero
      }
      const float* q = q_tiles ? q_tiles + y * W * L : qrow;  // the row's query tiles
      if (!q_tiles) to_tiles<V>(a.q + y * W, P, W, qrow);
      to_tiles<V>(go + y * W, P, W, gorow);
      // Pixel s's tile in a ring: rows [y0, y0 + S) hold every pixel row y can select.
      const int64_t y0 = std::max<int64_t>(0, y - reach), shift = y0 % S * W - y0 * W;
      auto tile = [&](int32_t s) {
        int64_t o = s + shift;
        return (o >= ring ? o - ring : o) * L;
      };
      const int64_t p0 = y * W;
      // The lines of the next row's planes (the key row entering next, the next query, grad_out
      // and grad_query rows, where not in whole-frame tiles), prefetched into L2 a 64-byte line
      // (16 pixels) of each plane at a time: the L-plane row reads are more concurrent streams
      // than the hardware prefetchers follow.
      const float* ahead[4] = {entered < H ? k + entered * W : nullptr,
                               y + 1 < H && !q_tiles ? a.q + p0 + W : nullptr,
                               y + 1 < H ? go + p0 + W : nullptr,
                               y + 1 < H && t > 0 && !gq_tiles ? a.gq + p0 + W : nullptr};
      for (int64_t line = 0; line < W; line += 16) {
        for (const float* plane : ahead)
          if (plane)
            for (int c = 0; c < L; ++c) prefetch_line<1>(plane + c * P + line);
        if (gq_tiles) continue;
        for (int64_t x = line; x < std::min(W, line + 16); x += L) {
          const int64_t m = std::min<int64_t>(L, W - x);
          const typename V::Lanes lanes = V::first(m);
          typename V::Vec r[L];
          const typename V::Lanes selected =
              gather_columns<V>(sel + p0 + x, m, zeros, [&](int32_t s) { return keys + tile(s); }, r);
          const typename V::Vec gp = V::load_first(lanes, g + p0 + x);
          for (int c = 0; c < L; ++c) {
            float* gq = a.gq + c * P + p0 + x;
            const typename V::Vec old = t == 0 ? V::zero() : V::load_first(lanes, gq);
            V::store_first(gq, lanes, V::fma_where(selected, gp, r[c], old));
          }
        }
      }
      for (int64_t x = 0; x < W; ++x) {
        const int32_t s = sel[p0 + x];
        if (s < 0) continue;
        if (gq_tiles) {
          float* gqt = gq_tiles + (p0 + x) * L;
          V::store(gqt, V::fma(V::broadcast(g[p0 + x]), V::load(keys + tile(s)), V::load(gqt)));
        }
        float *gkt = gkv + 2 * tile(s), *gvt = gkt + L;
        V::store(gkt, V::fma(V::broadcast(g[p0 + x]), V::load(q + x * L), V::load(gkt)));
        V::store(gvt, V::fma(V::broadcast(score[p0 + x]), V::load(gorow + x * L), V::load(gvt)));
      }
      for (; flushed <= y - reach; ++flushed) flush(flushed);
    }
    for (; flushed < H; ++flushed) flush(flushed);
  }
  if (gq_tiles) from_tiles_clearing<V>(gq_tiles, L, P, a.gq, P);
  _mm_sfence();  // the non-temporal stores are visible before the task ends
}

// Calls f(V()) with the tile vector V of `lanes` lanes (16: the AVX-512 copy only).
template <typename F>
inline void with_tile_vector(int lanes, F&& f) {
#if VSR_SIMD_BYTES == 64
  if (lanes == 16) return f(TileVector16());
#endif
  f(TileVector8());
}

// selection_tile over the leading whole tiles of a.tile_lanes channels; returns how far.
inline int64_t selection_tiles(const SelectionArgs<float>& a, const int32_t* sel, float* acc, int64_t n, int64_t lo,
                               int64_t hi) {
  int64_t c = 0;
  with_tile_vector(a.tile_lanes, [&](auto vector) {
    using V = decltype(vector);
    for (; c + V::kLanes <= a.channels; c += V::kLanes) selection_tile<V>(a, c, sel, acc, n, lo, hi);
  });
  return c;
}

// 16-lane tiles (AVX-512) except where the channel planes lie a multiple of 4 KiB apart (e.g.
// 64x64, 96x96, 128x128 frames): there 8-lane tiles measured 4-19 % faster on 12 such shapes,
// likely because the 16 planes a 16-lane tile reads or writes at one pixel all fall into one set
// of the 12-way L1 (sets repeat every 4 KiB; no counters to confirm it); on the 5 other shapes
// (80x80, 90x128, 90x160, 180x128, 180x320) 16 lanes measured 7-24 % faster (benchmarks/NOTES.md,
// session 10).
int tile_channels(float, int64_t plane_bytes) {
#if VSR_SIMD_BYTES == 64
  return plane_bytes % 4096 == 0 ? 8 : 16;
#else
  (void)plane_bytes;
  return 8;
#endif
}

void key_value_tiles(const TileArgs& a) {
  with_tile_vector(a.tile_lanes, [&](auto vector) { key_value_tiles_impl<decltype(vector)>(a); });
}

#else
int tile_channels(float, int64_t) { return 0; }  // no tiles in this copy
// tile_channels() == 0: never called.
inline int64_t selection_tiles(const SelectionArgs<float>&, const int32_t*, float*, int64_t, int64_t, int64_t) {
  __builtin_trap();
}
void key_value_tiles(const TileArgs&) { __builtin_trap(); }

#endif
