// The torch side of flow_guided_window_attention shared by its CPU entry points
// (cpu/flow_guided_window_attention.cpp) and CUDA entry points
// (cuda_glue/flow_guided_window_attention.cpp): argument checks (a direct torch.ops call
// bypasses the Python ones, and every size the kernels index by is refused here when it
// disagrees), the Geometry, the coordinate view of the flow and the outputs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <algorithm>
#include <optional>
#include <tuple>

#include "../kernels/flow_guided_window_attention.h"
#include "../torch_glue.h"

namespace vsr_kernels {
namespace flow_guided_window_attention {

constexpr const char* kForwardOp = "vsr_kernels.flow_guided_window_attention";
constexpr const char* kBackwardOp = "vsr_kernels.flow_guided_window_attention_backward";

// query, key, value (B, C, H, W), flow (B, 2, H, W) floating, biases (w * w, C): checks
// everything and returns the geometry.
inline Geometry check_inputs(const char* op, at::DeviceType device_type, const at::Tensor& query,
                             const at::Tensor& key, const at::Tensor& value, const at::Tensor& flow,
                             int64_t window_size, int64_t num_heads, const std::optional<at::Tensor>& key_bias,
                             const std::optional<at::Tensor>& value_bias) {
  const NamedTensor q{"query", query}, k{"key", key}, v{"value", value}, f{"flow", flow};
  check_dim(op, q, 4);
  check_same_shape(op, k, q);
  check_same_shape(op, v, q);
  check_dim(op, f, 4);
  const int64_t B = query.size(0), C = query.size(1), H = query.size(2), W = query.size(3);
  check_shape(op, f, {B, 2, H, W}, "(B, 2, H, W) of query");
  check_tensors(op, device_type, {q, k, v});
  TORCH_CHECK(flow.device() == query.device(), op, ": flow must be on ", query.device(), " like query, got ",
              flow.device());
  TORCH_CHECK(at::isFloatingType(flow.scalar_type()), op, ": flow must have a floating dtype, got ",
              flow.scalar_type());
  check_int_range(op, "window_size", window_size, 1, kMaxWindowSize);
  check_int_range(op, "num_heads", num_heads, 1, std::max<int64_t>(C, 1));
  TORCH_CHECK(C >= 1 && C % num_heads == 0, op, ": the channels C = ", C, " of query must be a positive multiple of ",
              "num_heads = ", num_heads);
  const int64_t cells = window_size * window_size;
  for (const auto& [name, bias] : {std::pair<const char*, const std::optional<at::Tensor>&>{"key_bias", key_bias},
                                   std::pair<const char*, const std::optional<at::Tensor>&>{"value_bias", value_bias}}) {
    if (!bias.has_value()) continue;
    const NamedTensor nb{name, *bias};
    check_dim(op, nb, 2);
    check_shape(op, nb, {cells, C}, "(window_size**2, C)");
    check_tensors(op, device_type, {q, nb});
  }
  return {H, W, static_cast<int>(window_size), num_heads, C / num_heads};
}

// The dtype of the saved log-sum-exp (and of the backward's buffers): float64 for float64
// inputs, else float32.
inline at::ScalarType lse_dtype(const at::Tensor& query) { return accumulation_dtype(query.scalar_type()) ; }

// The flow as the kernels read it: contiguous (B, 2, H, W) in the coordinate dtype (float64
// for float64 flow, else float32).
inline at::Tensor coordinates(const at::Tensor& flow) {
  return flow.to(flow.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// A bias as the kernels read it: contiguous (cells, C), or an undefined tensor.
inline at::Tensor bias_or_undefined(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->contiguous() : at::Tensor();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

inline void check_backward(at::DeviceType device_type, const at::Tensor& grad_out, const at::Tensor& query,
                           const at::Tensor& lse, const Geometry& g) {
  const char* op = kBackwardOp;
  check_same_shape(op, {"grad_out", grad_out}, {"query", query});
  check_tensors(op, device_type, {{"query", query}, {"grad_out", grad_out}});
  check_shape(op, {"lse", lse}, {query.size(0), g.heads, g.height, g.width}, "(B, num_heads, H, W)");
  check_dtype(op, {"lse", lse}, lse_dtype(query));
  TORCH_CHECK(lse.device() == query.device(), op, ": lse must be on ", query.device(), " like query, got ",
              lse.device());
}

}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
