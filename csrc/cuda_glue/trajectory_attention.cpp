// Torch glue of trajectory attention's CUDA kernels: checks, device guard, current stream,
// output and workspace allocation. The kernels themselves are torch-free
// (cuda/trajectory_attention.cu); this file is built only where PyTorch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "../cuda/trajectory_attention.cuh"
#include "../glue/trajectory_attention.h"

namespace vsr_kernels {
namespace trajectory_attention {
namespace {

// location as the kernels read it: contiguous float64 (exact for every float location).
at::Tensor location_f64(const at::Tensor& location) { return location.to(at::kDouble).contiguous(); }

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& query, const at::Tensor& key, at::TensorList values_in, const at::Tensor& location) {
  const std::vector<at::Tensor> values(values_in.begin(), values_in.end());
  check_forward(at::kCUDA, query, key, values, location);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  auto [outs, score, index] = empty_forward_outputs(query, key, values);
  if (score.numel() == 0) return {outs, score, index};
  const Extent e = make_extent(key);
  const int64_t B = key.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto q = channels_first(query), k = channels_first(key), loc = location_f64(location);
  auto chosen = at::empty_like(index);
  check_launch(kForwardOp, launch_trajectory_attention_select(
      kernel_dtype(query), input_frames(q), input_frames(k), loc.const_data_ptr<double>(), score.mutable_data_ptr(),
      index.mutable_data_ptr<int64_t>(), chosen.mutable_data_ptr<int64_t>(), B, e, stream));
  for (size_t m = 0; m < values.size(); ++m) {
    const auto v = channels_first(values[m]);
    check_launch(kForwardOp, launch_trajectory_attention_gather(
        kernel_dtype(query), input_frames(v), index.const_data_ptr<int64_t>(), chosen.const_data_ptr<int64_t>(),
        outs[m].mutable_data_ptr(), B, v.size(2), e, stream));
  }
  return {outs, score, index};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> backward_cuda(
    at::TensorList grad_outs_in, const at::Tensor& grad_score, const at::Tensor& query, const at::Tensor& key,
    at::TensorList values_in, const at::Tensor& location, const at::Tensor& index) {
  const std::vector<at::Tensor> grad_outs(grad_outs_in.begin(), grad_outs_in.end());
  const std::vector<at::Tensor> values(values_in.begin(), values_in.end());
  check_backward(at::kCUDA, grad_outs, grad_score, query, key, values, location, index);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const Extent e = make_extent(key);
  const int64_t B = key.size(0);
  TORCH_CHECK(B * e.tokens() <= std::numeric_limits<int>::max(), kBackwardOp,
              ": B * h * w must be below 2**31 for the CUDA sort, got ", B * e.tokens());
  const auto dtype = query.scalar_type();
  const auto acc_options = query.options().dtype(accumulation_dtype(dtype));
  auto grad_query = at::empty(query.sizes(), acc_options);
  auto grad_key = at::zeros(key.sizes(), acc_options);
  std::vector<at::Tensor> grad_values;
  for (const auto& v : values) grad_values.push_back(at::zeros(v.sizes(), acc_options));
  if (B * e.tokens() == 0) {
    grad_query.zero_();
  } else {
    const auto q = channels_first(query), k = channels_first(key), loc = location_f64(location);
    const auto gs = grad_score.contiguous(), ix = index.contiguous();
    std::vector<at::Tensor> gos;
    std::vector<InputFrames> go_frames;
    std::vector<void*> gv_ptrs;
    std::vector<int64_t> channels;
    for (size_t m = 0; m < values.size(); ++m) {
      gos.push_back(channels_first(grad_outs[m]));
      go_frames.push_back(input_frames(gos.back()));
      gv_ptrs.push_back(grad_values[m].mutable_data_ptr());
      channels.push_back(values[m].size(2));
    }
    const size_t bytes = trajectory_attention_workspace_bytes(B, e);
    auto workspace = at::empty({static_cast<int64_t>(bytes)}, query.options().dtype(at::kByte));
    check_launch(kBackwardOp, launch_trajectory_attention_backward(
        kernel_dtype(query), go_frames.data(), gs.const_data_ptr(), input_frames(q), input_frames(k),
        loc.const_data_ptr<double>(), ix.const_data_ptr<int64_t>(), grad_query.mutable_data_ptr(),
        grad_key.mutable_data_ptr(), gv_ptrs.data(), channels.data(), static_cast<int>(values.size()),
        workspace.mutable_data_ptr(), bytes, B, e, c10::cuda::getCurrentCUDAStream()));
  }
  std::vector<at::Tensor> gv;
  for (const auto& g : grad_values) gv.push_back(to_contiguous(g, dtype));
  return {to_contiguous(grad_query, dtype), to_contiguous(grad_key, dtype), gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CUDA, m) {
  m.impl("trajectory_attention", &forward_cuda);
  m.impl("trajectory_attention_backward", &backward_cuda);
}

}  // namespace trajectory_attention
}  // namespace vsr_kernels
