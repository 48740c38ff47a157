// Torch glue of local argmax attention's CUDA kernels: checks, device guard, current stream,
// output allocation. The kernels themselves are torch-free (cuda/local_argmax_attention.cu);
// this file is built only where PyTorch has CUDA.
//
// c10/cuda is all the glue needs (at::cuda:: names are aliases of these); unlike
// ATen/cuda/CUDAContext.h it does not pull in the cuBLAS and cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../cuda/local_argmax_attention.cuh"
#include "../glue/local_argmax_attention.h"

namespace vsr_kernels {
namespace local_argmax_attention {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t kernel_size,
    int64_t dilation, double scale, bool zero_border) {
  const Window w = check_forward(at::kCUDA, query, key, value, kernel_size, dilation, zero_border);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  auto [out, score, index] = empty_forward_outputs(query, key, value);
  if (score.numel() == 0) return {out, score, index};
  const auto q = channels_first(query), k = channels_first(key), v = channels_first(value);
  check_launch(kForwardOp, launch_local_argmax_attention_forward(
      kernel_dtype(query), input_frames(q), input_frames(k), input_frames(v), output_frames(out),
      score.mutable_data_ptr(), index.mutable_data_ptr<int64_t>(), key.size(0), make_extent(k, v), w, scale,
      c10::cuda::getCurrentCUDAStream()));
  return {out, score, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_score, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& score, const at::Tensor& index,
    int64_t kernel_size, int64_t dilation, double scale, bool zero_border) {
  const Window w = check_backward(at::kCUDA, grad_out, grad_score, query, key, value, score, index, kernel_size,
                                  dilation, zero_border);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const int64_t B = key.size(0), H = key.size(3), W = key.size(4);
  if (B == 0 || H == 0 || W == 0)
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
  // float16 and bfloat16 gradients are accumulated in float32, then rounded once.
  const auto dtype = query.scalar_type();
  const auto acc_options = query.options().dtype(accumulation_dtype(dtype));
  auto grad_query = at::empty(query.sizes(), acc_options);
  auto grad_key = at::empty(key.sizes(), acc_options);
  auto grad_value = at::empty(value.sizes(), acc_options);
  const auto go = channels_first(grad_out), q = channels_first(query), k = channels_first(key),
             v = channels_first(value);
  const auto gs = grad_score.contiguous(), sc = score.contiguous(), ix = index.contiguous();
  check_launch(kBackwardOp, launch_local_argmax_attention_backward(
      kernel_dtype(query), input_frames(go), gs.const_data_ptr(), input_frames(q), input_frames(k),
      input_frames(v), sc.const_data_ptr(), ix.const_data_ptr<int64_t>(), output_frames(grad_query),
      output_frames(grad_key), output_frames(grad_value), B, make_extent(k, v), w, scale,
      c10::cuda::getCurrentCUDAStream()));
  return {to_contiguous(grad_query, dtype), to_contiguous(grad_key, dtype), to_contiguous(grad_value, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CUDA, m) {
  m.impl("local_argmax_attention", &forward_cuda);
  m.impl("local_argmax_attention_backward", &backward_cuda);
}

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
