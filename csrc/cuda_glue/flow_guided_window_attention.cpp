// Torch glue of flow-guided window attention's CUDA kernels: checks, device guard, current
// stream, output allocation, and the stable sort of the backward's target list (at::sort with
// stable=true and at::searchsorted: deterministic). The kernels themselves are torch-free
// (cuda/flow_guided_window_attention.cu); this file is built only where PyTorch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cuda/flow_guided_window_attention.cuh"
#include "../glue/flow_guided_window_attention.h"

namespace vsr_kernels {
namespace flow_guided_window_attention {
namespace {

const void* pointer_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, const at::Tensor& flow, int64_t window_size,
                                                int64_t num_heads, const std::optional<at::Tensor>& key_bias,
                                                const std::optional<at::Tensor>& value_bias, double scale) {
  const Geometry g = check_inputs(kForwardOp, at::kCUDA, query, key, value, flow, window_size, num_heads, key_bias,
                                  value_bias);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const int64_t B = query.size(0);
  auto out = at::empty(query.sizes(), query.options());
  auto lse = at::empty({B, g.heads, g.height, g.width}, query.options().dtype(lse_dtype(query)));
  if (out.numel() == 0) return {out, lse};
  const auto q = channels_first(query), k = channels_first(key), v = channels_first(value);
  const auto coords = coordinates(flow);
  const auto kb = bias_or_undefined(key_bias), vb = bias_or_undefined(value_bias);
  check_launch(kForwardOp, launch_flow_guided_window_attention_forward(
      kernel_dtype(query), coords.scalar_type() == at::kDouble, input_frames(q), input_frames(k), input_frames(v),
      coords.const_data_ptr(), pointer_or_null(kb), pointer_or_null(vb), output_frames(out), lse.mutable_data_ptr(),
      B, g, scale, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& flow, const at::Tensor& lse, int64_t window_size, int64_t num_heads,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& value_bias, double scale) {
  const Geometry g = check_inputs(kBackwardOp, at::kCUDA, query, key, value, flow, window_size, num_heads, key_bias,
                                  value_bias);
  check_backward(at::kCUDA, grad_out, query, lse, g);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const auto dtype = query.scalar_type();
  const int64_t B = query.size(0), HW = g.pixels(), C = g.channels(), cells = g.cells();
  const auto acc_options = query.options().dtype(accumulation_dtype(dtype));
  auto grad_key_bias = at::zeros({cells, C}, acc_options), grad_value_bias = at::zeros({cells, C}, acc_options);
  if (query.numel() == 0)
    return {at::zeros(query.sizes(), query.options()), at::zeros(query.sizes(), query.options()),
            at::zeros(query.sizes(), query.options()), grad_key_bias.to(dtype), grad_value_bias.to(dtype)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto go = channels_first(grad_out), q = channels_first(query), k = channels_first(key),
             v = channels_first(value);
  const auto coords = coordinates(flow);
  const auto kb = bias_or_undefined(key_bias), vb = bias_or_undefined(value_bias);
  const auto ls = lse.contiguous();
  auto grad_query = at::empty(query.sizes(), acc_options), grad_key = at::empty(query.sizes(), acc_options),
       grad_value = at::empty(query.sizes(), acc_options);
  auto prob = at::empty({B, HW, g.heads, cells}, acc_options), dscore = at::empty({B, HW, g.heads, cells}, acc_options);
  auto target = at::empty({B * HW * cells}, query.options().dtype(at::kLong));
  check_launch(kBackwardOp, launch_flow_guided_window_attention_pixel_grad(
      kernel_dtype(query), coords.scalar_type() == at::kDouble, input_frames(go), input_frames(q), input_frames(k),
      input_frames(v), coords.const_data_ptr(), pointer_or_null(kb), pointer_or_null(vb), ls.const_data_ptr(),
      output_frames(grad_query), prob.mutable_data_ptr(), dscore.mutable_data_ptr(),
      target.mutable_data_ptr<int64_t>(), B, g, scale, stream));
  // Entries sorted stably by key position: each position's entries in increasing
  // (pixel, cell) order. Segment bounds by binary search.
  const auto [keys, entries] = at::sort(target, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto offsets = at::searchsorted(keys, at::arange(B * (HW + 1) + 1, target.options()));
  check_launch(kBackwardOp, launch_flow_guided_window_attention_key_value_grad(
      kernel_dtype(query), input_frames(go), input_frames(q), prob.const_data_ptr(), dscore.const_data_ptr(),
      entries.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), output_frames(grad_key),
      output_frames(grad_value), B, g, stream));
  if (key_bias.has_value() || value_bias.has_value()) {
    const int64_t chunks = (B * HW + kCudaBiasChunk - 1) / kCudaBiasChunk;
    auto partial = at::empty({chunks * 2 * cells * C}, acc_options);
    check_launch(kBackwardOp, launch_flow_guided_window_attention_bias_grad(
        kernel_dtype(query), input_frames(go), input_frames(q), prob.const_data_ptr(), dscore.const_data_ptr(),
        partial.mutable_data_ptr(), grad_key_bias.mutable_data_ptr(), grad_value_bias.mutable_data_ptr(), B, g,
        stream));
  }
  return {to_contiguous(grad_query, dtype), to_contiguous(grad_key, dtype), to_contiguous(grad_value, dtype),
          to_contiguous(grad_key_bias, dtype), to_contiguous(grad_value_bias, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CUDA, m) {
  m.impl("flow_guided_window_attention", &forward_cuda);
  m.impl("flow_guided_window_attention_backward", &backward_cuda);
}

}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
