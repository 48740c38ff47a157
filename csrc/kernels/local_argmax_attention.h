// Local argmax attention (MANA): the per-pixel arithmetic, shared by the CPU launcher and
// the CUDA kernels. Each function computes everything one thread (or one loop iteration)
// owns, so both backends run the same arithmetic in the same order.
//
// Semantics (see README): for pixel p = (y, x) of frame t, candidate j lies at
// (y + (j / K - r) * dilation, x + (j % K - r) * dilation), r = K / 2. Its score is
// scale * <query[:, p], key[t, :, candidate]>. Outside the frame a candidate is skipped
// ("exclude") or has a zero key and value ("zeros"). index = lowest j of the best score,
// score = that score, out[t, :, p] = score * value[t, :, candidate].
//
// Backward is gather-formulated: no thread writes anything another thread writes.
#pragma once

#include "host_device.h"

namespace vsr_kernels {

// Element (t, c, p) of a stack of feature maps, p = y * W + x, lives at
// data[t * frame + c * channel + p * pixel]. Channels-first maps have channel = H * W and
// pixel = 1; channels-last maps have channel = 1 and pixel = C.
struct Strides {
  int64_t frame, channel, pixel;
};

template <typename T>
struct Frames {
  T* data;
  Strides stride;
  VSR_HOST_DEVICE T& at(int64_t t, int64_t c, int64_t p) const {
    return data[t * stride.frame + c * stride.channel + p * stride.pixel];
  }
};

// Frames whose channels are adjacent in memory (channel stride 1, as the CPU launcher lays
// them out). The same element as Frames::at, but with the unit stride known to the
// compiler, which can then vectorise the loops over channels. The per-pixel functions take
// either kind.
template <typename T>
struct ChannelsLastFrames {
  T* data;
  Strides stride;  // stride.channel is 1
  VSR_HOST_DEVICE T& at(int64_t t, int64_t c, int64_t p) const {
    return data[t * stride.frame + p * stride.pixel + c];
  }
};

struct Window {
  int64_t height, width;
  int kernel_size, dilation;
  bool zero_border;  // "zeros": outside candidates score 0 with value 0; else they are skipped

  VSR_HOST_DEVICE int64_t pixels() const { return height * width; }

  // Pixel of candidate (jy, jx) of (y, x), j = jy * kernel_size + jx, or -1 when it lies
  // outside the frame. With sign = -1 it maps back: the pixel whose candidate it is (y, x).
  VSR_HOST_DEVICE int64_t candidate_pixel(int64_t y, int64_t x, int jy, int jx, int sign = 1) const {
    const int r = kernel_size / 2;
    const int64_t cy = y + sign * static_cast<int64_t>(jy - r) * dilation;
    const int64_t cx = x + sign * static_cast<int64_t>(jx - r) * dilation;
    if (cy < 0 || cy >= height || cx < 0 || cx >= width) return -1;
    return cy * width + cx;
  }

  // The same for candidate number j: two integer divisions, so loops over every candidate
  // walk (jy, jx) instead.
  VSR_HOST_DEVICE int64_t candidate_pixel(int64_t y, int64_t x, int j) const {
    return candidate_pixel(y, x, j / kernel_size, j % kernel_size);
  }
};

// Sizes of one batch element: T frames of C query/key channels and Cv value channels.
struct Extent {
  int64_t frames, channels, value_channels;
};

// <a[ta, :, pa], b[tb, :, pb]> over n channels, in four interleaved partial sums: four
// independent multiply-add chains instead of one keep the pipeline busy, on CPU and GPU alike.
template <typename acc_t, typename Input>
VSR_HOST_DEVICE acc_t dot(Input a, int64_t ta, int64_t pa, Input b, int64_t tb, int64_t pb, int64_t n) {
  acc_t part0 = 0, part1 = 0, part2 = 0, part3 = 0;
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    part0 += convert<acc_t>(a.at(ta, c, pa)) * convert<acc_t>(b.at(tb, c, pb));
    part1 += convert<acc_t>(a.at(ta, c + 1, pa)) * convert<acc_t>(b.at(tb, c + 1, pb));
    part2 += convert<acc_t>(a.at(ta, c + 2, pa)) * convert<acc_t>(b.at(tb, c + 2, pb));
    part3 += convert<acc_t>(a.at(ta, c + 3, pa)) * convert<acc_t>(b.at(tb, c + 3, pb));
  }
  for (; c < n; ++c) part0 += convert<acc_t>(a.at(ta, c, pa)) * convert<acc_t>(b.at(tb, c, pb));
  return (part0 + part1) + (part2 + part3);
}

// Forward for pixel p = (y, x) of frame t. score and index point at this pixel's slots.
template <typename scalar_t, typename acc_t, typename QueryKey = Frames<const scalar_t>>
VSR_HOST_DEVICE void local_argmax_forward_pixel(
    QueryKey query, QueryKey key, Frames<const scalar_t> value, Frames<scalar_t> out, const Extent& e,
    const Window& w, acc_t scale, int64_t t, int64_t y, int64_t x, scalar_t* score, int64_t* index) {
  const int64_t p = y * w.width + x;
  // The score of a zero-padded key, multiplied for real: a NaN or inf query still poisons
  // it, exactly as with F.unfold's zero padding.
  acc_t padded = 0;
  if (w.zero_border)
    for (int64_t c = 0; c < e.channels; ++c) padded += convert<acc_t>(query.at(0, c, p)) * acc_t(0);
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
  *score = convert<scalar_t>(best);
  *index = best_j;
  for (int64_t c = 0; c < e.value_channels; ++c) {
    const acc_t v = best_pixel < 0 ? acc_t(0) : convert<acc_t>(value.at(t, c, best_pixel));
    out.at(t, c, p) = convert<scalar_t>(best * v);
  }
}

// d loss / d score of the selection made at pixel p of frame t, whose selected candidate is
// pixel sel: the direct gradient of `score` plus the one flowing through out = score * value.
template <typename acc_t, typename Input>
VSR_HOST_DEVICE acc_t local_argmax_score_grad(Input grad_out, Input value, const Extent& e, acc_t grad_score,
                                              int64_t t, int64_t p, int64_t sel) {
  return grad_score + dot<acc_t>(grad_out, t, p, value, t, sel, e.value_channels);
}

// Gradient of query pixel p = (y, x), summed over the T frames in order. grad_query is
// this pixel's (1, C) slot, in the accumulation type.
template <typename scalar_t, typename acc_t, typename Input = Frames<const scalar_t>,
          typename Output = Frames<acc_t>>
VSR_HOST_DEVICE void local_argmax_query_grad_pixel(
    Input grad_out, const scalar_t* grad_score, Input key, Input value, const int64_t* index, Output grad_query,
    const Extent& e, const Window& w, acc_t scale, int64_t y, int64_t x) {
  const int64_t p = y * w.width + x;
  for (int64_t c = 0; c < e.channels; ++c) grad_query.at(0, c, p) = 0;
  for (int64_t t = 0; t < e.frames; ++t) {
    const int64_t sel = w.candidate_pixel(y, x, static_cast<int>(index[t * w.pixels() + p]));
    if (sel < 0) continue;  // a zero-padded key: nothing to differentiate
    const acc_t g = scale * local_argmax_score_grad<acc_t>(
                                grad_out, value, e, convert<acc_t>(grad_score[t * w.pixels() + p]), t, p, sel);
    for (int64_t c = 0; c < e.channels; ++c)
      grad_query.at(0, c, p) += g * convert<acc_t>(key.at(t, c, sel));
  }
}

// Gradients of key and value pixel k = (y, x) of frame t: gathered from the at most K*K
// query pixels that could have selected it, visited in increasing j. grad_key and
// grad_value are this pixel's slots, in the accumulation type.
template <typename scalar_t, typename acc_t, typename Input = Frames<const scalar_t>,
          typename Output = Frames<acc_t>>
VSR_HOST_DEVICE void local_argmax_key_value_grad_pixel(
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
      const acc_t g = scale * local_argmax_score_grad<acc_t>(
                                  grad_out, value, e, convert<acc_t>(grad_score[t * w.pixels() + p]), t, p, k);
      const acc_t s = convert<acc_t>(score[t * w.pixels() + p]);
      for (int64_t c = 0; c < e.channels; ++c)
        grad_key.at(t, c, k) += g * convert<acc_t>(query.at(0, c, p));
      for (int64_t c = 0; c < e.value_channels; ++c)
        grad_value.at(t, c, k) += s * convert<acc_t>(grad_out.at(t, c, p));
    }
  }
}

}  // namespace vsr_kernels
