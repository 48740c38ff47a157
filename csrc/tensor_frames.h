// Torch glue shared by the CPU and CUDA launchers: views of tensors as kernels/ Frames.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "kernels/local_argmax_attention.h"

namespace vsr_kernels {

// The strides of a (B, T, C, H, W) frame stack or a (B, C, H, W) map (frame stride 0),
// whose H and W dimensions must flatten into one pixel dimension.
inline Strides frame_strides(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 || t.dim() == 5, "vsr_kernels: expected a 4-D or 5-D tensor");
  const int64_t H = t.size(-2), W = t.size(-1);
  // Pixel p = y * W + x; with W == 1 it is y, and PyTorch leaves the W stride arbitrary.
  const int64_t pixel = W == 1 ? t.stride(-2) : t.stride(-1);
  TORCH_CHECK(H <= 1 || W == 1 || t.stride(-2) == W * pixel,
              "vsr_kernels: H and W must flatten into one pixel dimension");
  const bool stack = t.dim() == 5;
  return {stack ? t.stride(1) : 0, t.stride(stack ? 2 : 1), pixel};
}

// Batch element b of t as Frames; T is the element type the kernels see.
template <typename T>
Frames<T> frames_at(const at::Tensor& t, int64_t b) {
  return {static_cast<T*>(t.data_ptr()) + b * t.stride(0), frame_strides(t)};
}

// t itself when pixel p = y * W + x lies at offset p (channels-first, possibly sliced along
// B, T or C), else a copy laid out so: neighbouring pixels then sit at neighbouring
// addresses (coalesced loads on GPU, cache-line reuse on CPU). A clone, not contiguous(),
// which would keep the arbitrary strides a contiguous tensor may have in size-1 dimensions.
inline at::Tensor channels_first(const at::Tensor& t) {
  const bool unit_pixels = t.stride(-1) == 1 && (t.size(-2) <= 1 || t.stride(-2) == t.size(-1));
  return unit_pixels ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Batch element b of a tensor made by channels_last(), as ChannelsLastFrames.
template <typename T>
ChannelsLastFrames<T> channels_last_at(const at::Tensor& t, int64_t b) {
  const Frames<T> f = frames_at<T>(t, b);
  TORCH_CHECK(f.stride.channel == 1 || t.size(-3) == 1, "vsr_kernels: expected adjacent channels");
  return {f.data, f.stride};
}

// The frames of a (B, T, C, H, W) or (B, C, H, W) tensor laid out channels-last, with the
// logical shape unchanged: per-pixel dot products then read contiguous memory.
inline at::Tensor channels_last(const at::Tensor& t) {
  if (t.dim() == 5) return t.permute({0, 1, 3, 4, 2}).contiguous().permute({0, 1, 4, 2, 3});
  return t.permute({0, 2, 3, 1}).contiguous().permute({0, 3, 1, 2});
}

// An uninitialised tensor of logical shape `like`'s, laid out channels-last.
inline at::Tensor empty_channels_last(const at::Tensor& like) {
  const auto s = like.sizes();
  if (like.dim() == 5) return at::empty({s[0], s[1], s[3], s[4], s[2]}, like.options()).permute({0, 1, 4, 2, 3});
  return at::empty({s[0], s[2], s[3], s[1]}, like.options()).permute({0, 3, 1, 2});
}

inline Window make_window(const at::Tensor& key, int64_t kernel_size, int64_t dilation, bool zero_border) {
  return {key.size(-2), key.size(-1), static_cast<int>(kernel_size), static_cast<int>(dilation), zero_border};
}

inline Extent make_extent(const at::Tensor& key, const at::Tensor& value) {
  return {key.size(1), key.size(2), value.size(2)};
}

// The forward's outputs, uninitialised: out (B, T, Cv, H, W) and score (B, T, H, W) in the
// input dtype, index (B, T, H, W) int64.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_forward_outputs(const at::Tensor& query,
                                                                            const at::Tensor& key,
                                                                            const at::Tensor& value) {
  const int64_t B = key.size(0), T = key.size(1), H = key.size(3), W = key.size(4);
  return {at::empty({B, T, value.size(2), H, W}, value.options()), at::empty({B, T, H, W}, query.options()),
          at::empty({B, T, H, W}, query.options().dtype(at::kLong))};
}

}  // namespace vsr_kernels
