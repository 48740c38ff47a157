// The torch side of local_argmax_attention that its CPU entry points
// (cpu/local_argmax_attention.cpp) and its CUDA entry points
// (cuda_glue/local_argmax_attention.cpp) share: argument checks, the Window and Extent the
// kernels take, and the forward's outputs. It exists so that both backends check exactly
// the same things in one place: a direct torch.ops.vsr_kernels call bypasses the Python
// checks, and every size the kernels index by must be refused here when it disagrees.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "../kernels/local_argmax_attention.h"
#include "../torch_glue.h"

namespace vsr_kernels {
namespace local_argmax_attention {

constexpr const char* kForwardOp = "vsr_kernels.local_argmax_attention";
constexpr const char* kBackwardOp = "vsr_kernels.local_argmax_attention_backward";

// query (B, C, H, W), key (B, T, C, H, W), value (B, T, Cv, H, W): the kernels index all
// three (and the (B, T, H, W) maps) by these sizes.
inline void check_sizes(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  const NamedTensor q{"query", query}, k{"key", key}, v{"value", value};
  check_dim(op, q, 4);
  check_dim(op, k, 5);
  check_dim(op, v, 5);
  check_size(op, k, 0, "B", q, 0);
  check_size(op, k, 2, "C", q, 1);
  check_size(op, k, 3, "H", q, 2);
  check_size(op, k, 4, "W", q, 3);
  check_size(op, v, 0, "B", q, 0);
  check_size(op, v, 1, "T", k, 1);
  check_size(op, v, 3, "H", q, 2);
  check_size(op, v, 4, "W", q, 3);
}

// The window of a (B, T, C, H, W) key, after checking kernel_size and dilation: the only
// place the kernels' int fields are set, from values known to fit.
inline Window make_window(const char* op, const at::Tensor& key, int64_t kernel_size, int64_t dilation,
                          bool zero_border) {
  check_int_range(op, "kernel_size", kernel_size, 1, kMaxKernelSize, /*odd=*/true);
  check_int_range(op, "dilation", dilation, 1, kMaxDilation);
  return {key.size(3), key.size(4), static_cast<int>(kernel_size), static_cast<int>(dilation), zero_border};
}

inline Extent make_extent(const at::Tensor& key, const at::Tensor& value) {
  return {key.size(1), key.size(2), value.size(2)};
}

// Checks every argument of the forward for a backend whose tensors live on `device_type`
// devices; returns the window.
inline Window check_forward(at::DeviceType device_type, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, int64_t kernel_size, int64_t dilation, bool zero_border) {
  const char* op = kForwardOp;
  check_sizes(op, query, key, value);
  check_tensors(op, device_type, {{"query", query}, {"key", key}, {"value", value}});
  return make_window(op, key, kernel_size, dilation, zero_border);
}

// The same for the backward: grad_out has value's shape; grad_score, score and index are
// (B, T, H, W), index int64.
inline Window check_backward(at::DeviceType device_type, const at::Tensor& grad_out, const at::Tensor& grad_score,
                             const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& score, const at::Tensor& index, int64_t kernel_size, int64_t dilation,
                             bool zero_border) {
  const char* op = kBackwardOp;
  check_sizes(op, query, key, value);
  check_same_shape(op, {"grad_out", grad_out}, {"value", value});
  const int64_t B = key.size(0), T = key.size(1), H = key.size(3), W = key.size(4);
  for (const NamedTensor map : {NamedTensor{"grad_score", grad_score}, NamedTensor{"score", score},
                                NamedTensor{"index", index}})
    check_shape(op, map, {B, T, H, W}, "(B, T, H, W) of key");
  check_tensors(op, device_type, {{"query", query}, {"key", key}, {"value", value}, {"grad_out", grad_out},
                                  {"grad_score", grad_score}, {"score", score}});
  check_dtype(op, {"index", index}, at::kLong);
  TORCH_CHECK(index.device() == query.device(), op, ": index must be on ", query.device(), " like query, got ",
              index.device());
  return make_window(op, key, kernel_size, dilation, zero_border);
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

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
