// Local argmax attention (MANA): the per-pixel arithmetic of the CUDA kernels, and the
// Window both backends index candidates by. The CPU backend runs the same semantics in its
// own blocked form (cpu/local_argmax_attention_simd.h: vectors of pixels, a scatter
// backward); the definitions below are the contract both follow.
//
// Semantics (see README): for pixel p = (y, x) of frame t, candidate j lies at
// (y + (j / K - r) * dilation, x + (j % K - r) * dilation), r = K / 2. Its score is
// scale * <query[:, p], key[t, :, candidate]>. Outside the frame a candidate is skipped
// ("exclude") or has a zero key and value ("zeros"). index = lowest j of the best score,
// score = that score, out[t, :, p] = score * value[t, :, candidate].
//
// Backward is gather-formulated: no thread writes anything another thread writes.
#pragma once

#include <cstdint>

#include "../common/frames.h"
#include "../common/host_device.h"

namespace vsr_kernels {
namespace local_argmax_attention {

// Bounds of the window parameters, checked by the torch glue before a Window is made
// (glue/local_argmax_attention.h): K * K candidate numbers fit an int, and every offset
// (j / K - r) * dilation is computed in int64.
constexpr int64_t kMaxKernelSize = 32767;
constexpr int64_t kMaxDilation = 2147483647;

struct Window {
  int64_t height, width;
  int kernel_size, dilation;  // in [1, kMaxKernelSize] (odd) and [1, kMaxDilation]
  bool zero_border;  // "zeros": outside candidates score 0 with value 0; else they are skipped

  VSR_HOST_DEVICE int64_t pixels() const { return height * width; }
  VSR_HOST_DEVICE int candidates() const { return kernel_size * kernel_size; }

  // Pixel of candidate (jy, jx) of (y, x), j = jy * kernel_size + jx, or -1 when it lies
  // outside the frame. With sign = -1 it maps back: the pixel whose candidate it is (y, x).
  VSR_HOST_DEVICE int64_t candidate_pixel(int64_t y, int64_t x, int jy, int jx, int sign = 1) const {
    const int r = kernel_size / 2;
    const int64_t cy = y + sign * static_cast<int64_t>(jy - r) * dilation;
    const int64_t cx = x + sign * static_cast<int64_t>(jx - r) * dilation;
    if (cy < 0 || cy >= height || cx < 0 || cx >= width) return -1;
    return cy * width + cx;
  }

  // The same for candidate number j in [0, candidates()): two integer divisions, so loops
  // over every candidate walk (jy, jx) instead.
  VSR_HOST_DEVICE int64_t candidate_pixel(int64_t y, int64_t x, int j) const {
    return candidate_pixel(y, x, j / kernel_size, j % kernel_size);
  }
};

// Sizes of one batch element: T frames of C query/key channels and Cv value channels.
struct Extent {
  int64_t frames, channels, value_channels;
};

// Forward for pixel p = (y, x) of frame t. score and index point at this pixel's slots.
template <typename scalar_t, typename acc_t, typename QueryKey = Frames<const scalar_t>>
VSR_HOST_DEVICE void forward_pixel(
    QueryKey query, QueryKey key, Frames<const scalar_t> value, Frames<scalar_t> out, const Extent& e,
    const Window& w, acc_t scale, int64_t t, int64_t y, int64_t x, scalar_t* score, int64_t* index) {
  const int64_t p = y * w.width + x;
  // The score of a zero-padded key, multiplied for real: a NaN or inf query still poisons
  // it, exactly as with F.unfold's zero padding.
  acc_t padded = 0;
  if (w.zero_border)
    for (int64_t c = 0; c < e.channels; ++c) padded += vsr_kernels::convert<acc_t>(query.at(0, c, p)) * acc_t(0);
  padded *= scale;
  int best_j = -1;
  int64_t best_pixel = -1;
  acc_t best = 0;
  for (int jy = 0; jy < w.kernel_size; ++jy) {
    for (int jx = 0; jx < w.kernel_size; ++jx) {
      const int64_t cand = w.candidate_pixel(y, x, jy, jx);
      if (cand < 0 && !w.zero_border) continue;
      const acc_t s = cand < 0 ? padded : scale * dot<acc_t>(query, 0, p, key, t, cand, e.channels);
      if (best_j < 0 || beats(s, best)) {
        best = s;
        best_j = jy * w.kernel_size + jx;
        best_pixel = cand;
      }
    }
  }
  *score = vsr_kernels::convert<scalar_t>(best);
  *index = best_j;
  for (int64_t c = 0; c < e.value_channels; ++c) {
    const acc_t v = best_pixel < 0 ? acc_t(0) : vsr_kernels::convert<acc_t>(value.at(t, c, best_pixel));
    out.at(t, c, p) = vsr_kernels::convert<scalar_t>(best * v);
  }
}

// d loss / d score of the selection made at pixel p of frame t, whose selected candidate is
// pixel sel: the direct gradient of `score` plus the one flowing through out = score * value.
template <typename acc_t, typename Input>
VSR_HOST_DEVICE acc_t score_grad(Input grad_out, Input value, const Extent& e, acc_t grad_score, int64_t t,
                                 int64_t p, int64_t sel) {
  return grad_score + dot<acc_t>(grad_out, t, p, value, t, sel, e.value_channels);
}

// Gradient of query pixel p = (y, x), summed over the T frames in order. grad_query is
// this pixel's (1, C) slot, in the accumulation type.
template <typename scalar_t, typename acc_t, typename Input = Frames<const scalar_t>,
          typename Output = Frames<acc_t>>
VSR_HOST_DEVICE void query_grad_pixel(
    Input grad_out, const scalar_t* grad_score, Input key, Input value, const int64_t* index, Output grad_query,
    const Extent& e, const Window& w, acc_t scale, int64_t y, int64_t x) {
  const int64_t p = y * w.width + x;
  for (int64_t c = 0; c < e.channels; ++c) grad_query.at(0, c, p) = 0;
  for (int64_t t = 0; t < e.frames; ++t) {
    // An index outside [0, K * K) selects nothing, as in key_value_grad_pixel, which never
    // matches it (only a direct call of the backward op can pass one).
    const int64_t j = index[t * w.pixels() + p];
    if (j < 0 || j >= w.candidates()) continue;
    const int64_t sel = w.candidate_pixel(y, x, static_cast<int>(j));
    if (sel < 0) continue;  // a zero-padded key: nothing to differentiate
    const acc_t gs = vsr_kernels::convert<acc_t>(grad_score[t * w.pixels() + p]);
    const acc_t g = scale * score_grad<acc_t>(grad_out, value, e, gs, t, p, sel);
    for (int64_t c = 0; c < e.channels; ++c)
      grad_query.at(0, c, p) += g * vsr_kernels::convert<acc_t>(key.at(t, c, sel));
  }
}

// Gradients of key and value pixel k = (y, x) of frame t: gathered from the at most K*K
// query pixels that could have selected it, visited in increasing j. grad_key and
// grad_value are this pixel's slots, in the accumulation type.
template <typename scalar_t, typename acc_t, typename Input = Frames<const scalar_t>,
          typename Output = Frames<acc_t>>
VSR_HOST_DEVICE void key_value_grad_pixel(
    Input grad_out, const scalar_t* grad_score, Input query, Input value, const scalar_t* score,
    const int64_t* index, Output grad_key, Output grad_value, const Extent& e, const Window& w,
    acc_t scale, int64_t t, int64_t y, int64_t x) {
  const int64_t k = y * w.width + x;
  for (int64_t c = 0; c < e.channels; ++c) grad_key.at(t, c, k) = 0;
  for (int64_t c = 0; c < e.value_channels; ++c) grad_value.at(t, c, k) = 0;
  for (int jy = 0; jy < w.kernel_size; ++jy) {
    for (int jx = 0; jx < w.kernel_size; ++jx) {
      const int64_t p = w.candidate_pixel(y, x, jy, jx, -1);
      if (p < 0 || index[t * w.pixels() + p] != jy * w.kernel_size + jx) continue;
      const acc_t gs = vsr_kernels::convert<acc_t>(grad_score[t * w.pixels() + p]);
      const acc_t g = scale * score_grad<acc_t>(grad_out, value, e, gs, t, p, k);
      const acc_t s = vsr_kernels::convert<acc_t>(score[t * w.pixels() + p]);
      for (int64_t c = 0; c < e.channels; ++c)
        grad_key.at(t, c, k) += g * vsr_kernels::convert<acc_t>(query.at(0, c, p));
      for (int64_t c = 0; c < e.value_channels; ++c)
        grad_value.at(t, c, k) += s * vsr_kernels::convert<acc_t>(grad_out.at(t, c, p));
    }
  }
}

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
