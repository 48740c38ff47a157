// The torch side of trajectory_attention shared by its CPU entry points
// (cpu/trajectory_attention.cpp) and its CUDA entry points (cuda_glue/trajectory_attention.cpp):
// argument checks and output allocation. A direct torch.ops.vsr_kernels call bypasses the
// Python checks, so every size the kernels index by is refused here when it disagrees.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../kernels/trajectory_attention.h"
#include "../torch_glue.h"

namespace vsr_kernels {
namespace trajectory_attention {

constexpr const char* kForwardOp = "vsr_kernels.trajectory_attention";
constexpr const char* kBackwardOp = "vsr_kernels.trajectory_attention_backward";

// query (B, D, h, w), key (B, T, D, h, w), values[i] (B, T, Dv_i, h, w), location
// (B, T, 2, h, w) floating point: the kernels index all of them by these sizes.
inline void check_sizes(const char* op, const at::Tensor& query, const at::Tensor& key,
                        const std::vector<at::Tensor>& values, const std::vector<std::string>& value_names,
                        const at::Tensor& location) {
  const NamedTensor q{"query", query}, k{"key", key}, l{"location", location};
  check_dim(op, q, 4);
  check_dim(op, k, 5);
  check_dim(op, l, 5);
  check_size(op, k, 0, "B", q, 0);
  check_size(op, k, 2, "D", q, 1);
  check_size(op, k, 3, "h", q, 2);
  check_size(op, k, 4, "w", q, 3);
  TORCH_CHECK(key.size(1) >= 1, op, ": key must hold T >= 1 frames in dim 1, got shape ", key.sizes());
  check_size(op, l, 0, "B", q, 0);
  check_size(op, l, 1, "T", k, 1);
  TORCH_CHECK(location.size(2) == 2, op, ": location must have 2 channels (x, y) in dim 2, got shape ",
              location.sizes());
  check_size(op, l, 3, "h", q, 2);
  check_size(op, l, 4, "w", q, 3);
  TORCH_CHECK(!values.empty(), op, ": values must hold at least one tensor");
  for (size_t i = 0; i < values.size(); ++i) {
    const NamedTensor v{value_names[i].c_str(), values[i]};
    check_dim(op, v, 5);
    check_size(op, v, 0, "B", q, 0);
    check_size(op, v, 1, "T", k, 1);
    check_size(op, v, 3, "h", q, 2);
    check_size(op, v, 4, "w", q, 3);
  }
  const auto ldt = location.scalar_type();
  TORCH_CHECK(ldt == at::kHalf || ldt == at::kBFloat16 || ldt == at::kFloat || ldt == at::kDouble, op,
              ": location must have a floating-point dtype (float16, bfloat16, float32 or float64), got ", ldt);
  TORCH_CHECK(location.device() == query.device(), op, ": location must be on ", query.device(),
              " like query, got ", location.device());
}

inline std::vector<std::string> names(const char* what, size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back(std::string(what) + "[" + std::to_string(i) + "]");
  return out;
}

// query, key and every value on a `device_type` device in one float dtype.
inline void check_devices_and_dtypes(const char* op, at::DeviceType device_type, const at::Tensor& query,
                                     const at::Tensor& key, const std::vector<at::Tensor>& values,
                                     const std::vector<std::string>& value_names) {
  check_tensors(op, device_type, {{"query", query}, {"key", key}});
  for (size_t i = 0; i < values.size(); ++i)
    check_tensors(op, device_type, {{"query", query}, {value_names[i].c_str(), values[i]}});
}

inline void check_forward(at::DeviceType device_type, const at::Tensor& query, const at::Tensor& key,
                          const std::vector<at::Tensor>& values, const at::Tensor& location) {
  const auto value_names = names("values", values.size());
  check_sizes(kForwardOp, query, key, values, value_names, location);
  check_devices_and_dtypes(kForwardOp, device_type, query, key, values, value_names);
}

// The backward also takes grad_outs[i] (B, Dv_i, h, w), grad_score (B, h, w) in the inputs'
// dtype and index (B, h, w) int64 (an index outside [0, T) selects nothing).
inline void check_backward(at::DeviceType device_type, const std::vector<at::Tensor>& grad_outs,
                           const at::Tensor& grad_score, const at::Tensor& query, const at::Tensor& key,
                           const std::vector<at::Tensor>& values, const at::Tensor& location,
                           const at::Tensor& index) {
  const char* op = kBackwardOp;
  const auto value_names = names("values", values.size());
  check_sizes(op, query, key, values, value_names, location);
  TORCH_CHECK(grad_outs.size() == values.size(), op, ": grad_outs must hold one tensor per value (",
              values.size(), "), got ", grad_outs.size());
  const auto grad_names = names("grad_outs", grad_outs.size());
  const int64_t B = key.size(0), h = key.size(3), w = key.size(4);
  for (size_t i = 0; i < values.size(); ++i)
    check_shape(op, {grad_names[i].c_str(), grad_outs[i]}, {B, values[i].size(2), h, w}, "(B, Dv, h, w) of value");
  check_shape(op, {"grad_score", grad_score}, {B, h, w}, "(B, h, w) of query");
  check_shape(op, {"index", index}, {B, h, w}, "(B, h, w) of query");
  check_devices_and_dtypes(op, device_type, query, key, values, value_names);
  for (size_t i = 0; i < values.size(); ++i)
    check_tensors(op, device_type, {{"query", query}, {grad_names[i].c_str(), grad_outs[i]}});
  check_tensors(op, device_type, {{"query", query}, {"grad_score", grad_score}});
  check_dtype(op, {"index", index}, at::kLong);
  TORCH_CHECK(index.device() == query.device(), op, ": index must be on ", query.device(), " like query, got ",
              index.device());
}

inline Extent make_extent(const at::Tensor& key) { return {key.size(1), key.size(2), key.size(3), key.size(4)}; }

// The forward's outputs, uninitialised: outs[i] (B, Dv_i, h, w) in the values' dtype, score
// (B, h, w) in query's, index (B, h, w) int64.
inline std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> empty_forward_outputs(
    const at::Tensor& query, const at::Tensor& key, const std::vector<at::Tensor>& values) {
  const int64_t B = key.size(0), h = key.size(3), w = key.size(4);
  std::vector<at::Tensor> outs;
  for (const auto& v : values) outs.push_back(at::empty({B, v.size(2), h, w}, v.options()));
  return {outs, at::empty({B, h, w}, query.options()), at::empty({B, h, w}, query.options().dtype(at::kLong))};
}

}  // namespace trajectory_attention
}  // namespace vsr_kernels
