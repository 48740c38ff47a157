// Generic torch glue of every op's C++ entry points (CPU launchers and CUDA glue):
// - named argument checks that raise a TORCH_CHECK error naming the op, the argument, what
//   was expected and what was given: check_dim, check_size, check_shape, check_same_shape,
//   check_dtype, check_tensors (device and dtype of a group), check_int_range;
// - kernel_dtype: an at::Tensor's dtype as the torch-free launchers take it (common/dtype.h);
// - views of tensors as common/frames.h's Frames: frame_strides, frames_at, channels_first,
//   channels_last, channels_last_at, empty_channels_last, input_frames, output_frames;
// - check_launch (CUDA builds only): a launcher's cudaError_t as a TORCH_CHECK error.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

#include "common/dtype.h"
#include "common/frames.h"

#if defined(VSR_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace vsr_kernels {

// ---------------------------------------------------------------------------------------
// Argument checks. `op` is the op's name as users call it, e.g.
// "vsr_kernels.local_argmax_attention"; it starts every message.

struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

inline void check_dim(const char* op, NamedTensor t, int64_t dim) {
  TORCH_CHECK(t.tensor.dim() == dim, op, ": ", t.name, " must be ", dim, "-D, got a ", t.tensor.dim(),
              "-D tensor of shape ", t.tensor.sizes());
}

// Dimension `dim` of t, called `size_name` (e.g. "C"), equals dimension `ref_dim` of ref.
// Equality both ways: the kernels index t by ref's sizes (or the reverse), so a larger size
// is as wrong as a smaller one.
inline void check_size(const char* op, NamedTensor t, int64_t dim, const char* size_name, NamedTensor ref,
                       int64_t ref_dim) {
  TORCH_CHECK(t.tensor.size(dim) == ref.tensor.size(ref_dim), op, ": ", t.name, " must have ", size_name, " = ",
              ref.tensor.size(ref_dim), " like ", ref.name, ", got ", t.tensor.size(dim), " (", t.name, " has shape ",
              t.tensor.sizes(), ", ", ref.name, " ", ref.tensor.sizes(), ")");
}

// t has exactly the shape `expected`, described as `what` (e.g. "(B, T, H, W) of key").
inline void check_shape(const char* op, NamedTensor t, at::IntArrayRef expected, const char* what) {
  TORCH_CHECK(t.tensor.sizes() == expected, op, ": ", t.name, " must have shape ", expected, " = ", what, ", got ",
              t.tensor.sizes());
}

inline void check_same_shape(const char* op, NamedTensor t, NamedTensor ref) {
  TORCH_CHECK(t.tensor.sizes() == ref.tensor.sizes(), op, ": ", t.name, " must have the shape of ", ref.name, " ",
              ref.tensor.sizes(), ", got ", t.tensor.sizes());
}

inline void check_dtype(const char* op, NamedTensor t, at::ScalarType dtype) {
  TORCH_CHECK(t.tensor.scalar_type() == dtype, op, ": ", t.name, " must have dtype ", dtype, ", got ",
              t.tensor.scalar_type());
}

// The first tensor is on a `device_type` device (the backend's) in one of the dtypes the
// kernels take (float16, bfloat16, float32, float64); every other is on that device in that
// dtype. Tensors that must have another dtype (an int64 index) are checked apart.
inline void check_tensors(const char* op, at::DeviceType device_type, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  TORCH_CHECK(first.tensor.device().type() == device_type, op, ": ", first.name, " must be a ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor for this backend, got one on ",
              first.tensor.device());
  const auto dtype = first.tensor.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op, ": ",
              first.name, " must have dtype float16, bfloat16, float32 or float64, got ", dtype);
  for (const NamedTensor& t : tensors) {
    TORCH_CHECK(t.tensor.device() == first.tensor.device(), op, ": ", t.name, " must be on ", first.tensor.device(),
                " like ", first.name, ", got ", t.tensor.device());
    TORCH_CHECK(t.tensor.scalar_type() == dtype, op, ": ", t.name, " must have dtype ", dtype, " like ", first.name,
                ", got ", t.tensor.scalar_type());
  }
}

// lo <= value <= hi, and odd where `odd`: what an integer argument must be before a kernel
// narrows it (e.g. to int).
inline void check_int_range(const char* op, const char* name, int64_t value, int64_t lo, int64_t hi,
                            bool odd = false) {
  TORCH_CHECK(lo <= value && value <= hi && (!odd || value % 2 != 0), op, ": ", name, " must be ",
              odd ? "an odd integer" : "an integer", " in [", lo, ", ", hi, "], got ", value);
}

// The DType of a tensor that passed check_tensors.
inline DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "vsr_kernels: no kernel dtype for ", t.scalar_type()); return DType::kFloat64;
  }
}

// ---------------------------------------------------------------------------------------
// Views of tensors as Frames.

// The strides of a (B, T, C, H, W) frame stack or a (B, C, H, W) map (frame stride 0),
// whose H and W dimensions must flatten into one pixel dimension.
inline Strides frame_strides(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 || t.dim() == 5, "vsr_kernels: expected a 4-D or 5-D tensor");
  const int64_t H = t.size(-2), W = t.size(-1);
  // Pixel p = y * W + x; with W == 1 it is y, and PyTorch leaves the W stride arbitrary.
  const int64_t pixel = W == 1 ? t.stride(-2) : t.stride(-1);
  // An empty tensor has no element to address, whatever its strides.
  TORCH_CHECK(t.numel() == 0 || H <= 1 || W == 1 || t.stride(-2) == W * pixel,
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

// Batch element b of a tensor made by channels_last() or empty_channels_last(), as
// ChannelsLastFrames. An empty tensor has no element to read, whatever its strides (which
// contiguous() leaves as they are).
template <typename T>
ChannelsLastFrames<T> channels_last_at(const at::Tensor& t, int64_t b) {
  const Frames<T> f = frames_at<T>(t, b);
  TORCH_CHECK(f.stride.channel == 1 || t.size(-3) == 1 || t.numel() == 0, "vsr_kernels: expected adjacent channels");
  return {f.data, f.stride};
}

// The frames of a (B, T, C, H, W) or (B, C, H, W) tensor laid out channels-last, with the
// logical shape unchanged: per-pixel dot products then read contiguous memory.
inline at::Tensor channels_last(const at::Tensor& t) {
  if (t.dim() == 5) return t.permute({0, 1, 3, 4, 2}).contiguous().permute({0, 1, 4, 2, 3});
  return t.permute({0, 2, 3, 1}).contiguous().permute({0, 3, 1, 2});
}

// An uninitialised tensor of logical shape `like`'s, laid out channels-last, with `options`.
inline at::Tensor empty_channels_last(const at::Tensor& like, const at::TensorOptions& options) {
  const auto s = like.sizes();
  if (like.dim() == 5) return at::empty({s[0], s[1], s[3], s[4], s[2]}, options).permute({0, 1, 4, 2, 3});
  return at::empty({s[0], s[2], s[3], s[1]}, options).permute({0, 3, 1, 2});
}

inline at::Tensor empty_channels_last(const at::Tensor& like) { return empty_channels_last(like, like.options()); }

// The whole (B, ...) tensor for a torch-free launcher, which indexes batch elements itself.
inline InputFrames input_frames(const at::Tensor& t) { return {t.const_data_ptr(), t.stride(0), frame_strides(t)}; }

inline OutputFrames output_frames(at::Tensor& t) { return {t.mutable_data_ptr(), t.stride(0), frame_strides(t)}; }

// ---------------------------------------------------------------------------------------
// Results: accumulation buffers and the dtype and layout every entry point returns.

// The dtype gradients of `dtype` inputs are accumulated in: float32 for float16 and bfloat16
// (as on the GPU), the input dtype otherwise.
inline at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

// t (an accumulation buffer) rounded once to `dtype`, with contiguous strides: t itself when
// it already is both, else one copy. Empty tensors are copied too, since contiguous() leaves
// their strides as they are and results must have the strides the fake tensors promise.
inline at::Tensor to_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous() && t.numel() != 0) return t;
  return at::empty(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

// The shape of an optional input's gradient: the input's, or (0,) when it is absent (what the
// schemas' fake tensors promise for a missing offset or mask).
inline std::vector<int64_t> optional_grad_shape(const c10::optional<at::Tensor>& t) {
  if (t.has_value()) return t->sizes().vec();
  return {0};
}

#if defined(VSR_WITH_CUDA)
// A torch-free launcher's result as an error: launch errors (bad configuration, no kernel
// image for this GPU) surface here, asynchronous ones at the next synchronisation.
inline void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}
#endif

}  // namespace vsr_kernels
