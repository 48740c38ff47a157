// Torch glue of the CUDA kernels: checks, device guard, current stream, output allocation.
// The kernels themselves are torch-free (cuda/*.cu); this file is built only where PyTorch
// has CUDA.
//
// c10/cuda is all the glue needs (at::cuda:: names are aliases of these); unlike
// ATen/cuda/CUDAContext.h it does not pull in the cuBLAS and cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#include "cuda/local_argmax_attention.cuh"
#include "tensor_frames.h"

namespace vsr_kernels {
namespace {

using NamedTensor = std::pair<const char*, const at::Tensor&>;

// Every tensor on the CUDA device of the first one, in its dtype, which the kernels take.
void check_tensors(std::initializer_list<NamedTensor> tensors) {
  const auto& [first_name, first] = *tensors.begin();
  TORCH_CHECK(first.is_cuda(), "vsr_kernels CUDA backend: ", first_name,
              " must be a CUDA tensor, got one on ", first.device());
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "vsr_kernels CUDA backend supports float16, bfloat16, float32 and float64, got ", dtype);
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t.device() == first.device(), "vsr_kernels CUDA backend: ", name, " must be on ",
                first.device(), " like ", first_name, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "vsr_kernels CUDA backend: ", name, " must have dtype ",
                dtype, " like ", first_name, ", got ", t.scalar_type());
  }
}

// The kernels index every tensor by the sizes of key and value, so a mismatch would read or
// write out of bounds: refuse it here.
void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "vsr_kernels CUDA backend: ", name, " must have shape ",
              expected, ", got ", t.sizes());
}

void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  TORCH_CHECK(key.dim() == 5 && value.dim() == 5, "vsr_kernels CUDA backend: key and value must be 5-D");
  const int64_t B = key.size(0), T = key.size(1), C = key.size(2), H = key.size(3), W = key.size(4);
  check_shape("query", query, {B, C, H, W});
  check_shape("value", value, {B, T, value.size(2), H, W});
}

DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: return DType::kFloat64;  // check_tensors admits no other dtype
  }
}

InputFrames input_frames(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), frame_strides(t)};
}

OutputFrames output_frames(at::Tensor& t) {
  return {t.mutable_data_ptr(), t.stride(0), frame_strides(t)};
}

void check_launch(cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "vsr_kernels CUDA kernel launch failed: ", cudaGetErrorString(error));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t kernel_size,
    int64_t dilation, double scale, bool zero_border) {
  check_tensors({{"query", query}, {"key", key}, {"value", value}});
  check_inputs(query, key, value);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const int64_t B = key.size(0);
  auto [out, score, index] = empty_forward_outputs(query, key, value);
  if (score.numel() == 0) return {out, score, index};
  const auto q = channels_first(query), k = channels_first(key), v = channels_first(value);
  check_launch(launch_local_argmax_attention_forward(
      kernel_dtype(query), input_frames(q), input_frames(k), input_frames(v), output_frames(out),
      score.mutable_data_ptr(), index.mutable_data_ptr<int64_t>(), B, make_extent(k, v),
      make_window(k, kernel_size, dilation, zero_border), scale, c10::cuda::getCurrentCUDAStream()));
  return {out, score, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_score, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& score, const at::Tensor& index,
    int64_t kernel_size, int64_t dilation, double scale, bool zero_border) {
  check_tensors({{"query", query}, {"key", key}, {"value", value}, {"grad_out", grad_out},
                 {"grad_score", grad_score}, {"score", score}});
  check_inputs(query, key, value);
  const int64_t B = key.size(0), T = key.size(1), H = key.size(3), W = key.size(4);
  check_shape("grad_out", grad_out, value.sizes());
  check_shape("grad_score", grad_score, {B, T, H, W});
  check_shape("score", score, {B, T, H, W});
  check_shape("index", index, {B, T, H, W});
  TORCH_CHECK(index.device() == query.device() && index.scalar_type() == at::kLong,
              "vsr_kernels CUDA backend: index must be int64 on ", query.device(), ", got ",
              index.scalar_type(), " on ", index.device());
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  if (B == 0 || H == 0 || W == 0)
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
  // float16 and bfloat16 gradients are accumulated in float32, then rounded once.
  const auto dtype = query.scalar_type();
  const auto acc_options = query.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  auto grad_query = at::empty(query.sizes(), acc_options);
  auto grad_key = at::empty(key.sizes(), acc_options);
  auto grad_value = at::empty(value.sizes(), acc_options);
  const auto go = channels_first(grad_out), q = channels_first(query), k = channels_first(key),
             v = channels_first(value);
  const auto gs = grad_score.contiguous(), sc = score.contiguous(), ix = index.contiguous();
  check_launch(launch_local_argmax_attention_backward(
      kernel_dtype(query), input_frames(go), gs.const_data_ptr(), input_frames(q), input_frames(k),
      input_frames(v), sc.const_data_ptr(), ix.const_data_ptr<int64_t>(), output_frames(grad_query),
      output_frames(grad_key), output_frames(grad_value), B, make_extent(k, v),
      make_window(k, kernel_size, dilation, zero_border), scale, c10::cuda::getCurrentCUDAStream()));
  return {grad_query.to(dtype), grad_key.to(dtype), grad_value.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CUDA, m) {
  m.impl("local_argmax_attention", &forward_cuda);
  m.impl("local_argmax_attention_backward", &backward_cuda);
}

}  // namespace vsr_kernels
