// CPU launchers of local argmax attention: at::parallel_for over rows of pixels, each
// pixel computed by the shared per-pixel functions in kernels/local_argmax_attention.h.
// Inputs are read channels-last where a pixel's channels are read together (see each launcher).
// float16 and bfloat16 are computed in float32 and rounded once to the input dtype, as on GPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../glue/local_argmax_attention.h"

namespace vsr_kernels {
namespace local_argmax_attention {
namespace {

// Rows of pixels per task: enough work to amortise scheduling, small enough to balance.
constexpr int64_t kRowsPerTask = 4;

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t kernel_size,
    int64_t dilation, double scale, bool zero_border) {
  const Window w = check_forward(at::kCPU, query, key, value, kernel_size, dilation, zero_border);
  const int64_t B = key.size(0), T = key.size(1), H = key.size(3), W = key.size(4);
  auto [out, score, index] = empty_forward_outputs(query, key, value);
  if (score.numel() == 0) return {out, score, index};
  // Query and key are read K*K times per pixel by dot products: channels-last makes those
  // contiguous (see backward_cpu for why channels-first is slow). Value is read and out
  // written once per pixel: copying them costs more than their strided access.
  const auto q = channels_last(query), k = channels_last(key), v = channels_first(value);
  const Extent e = make_extent(key, value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "local_argmax_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, B * T * H, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / (T * H), t = row / H % T, y = row % H;
        scalar_t* sc = score.data_ptr<scalar_t>() + (b * T + t) * H * W + y * W;
        int64_t* ix = index.data_ptr<int64_t>() + (b * T + t) * H * W + y * W;
        for (int64_t x = 0; x < W; ++x)
          forward_pixel<scalar_t, acc_t>(channels_last_at<const scalar_t>(q, b), channels_last_at<const scalar_t>(k, b),
                                         frames_at<const scalar_t>(v, b), frames_at<scalar_t>(out, b), e, w,
                                         static_cast<acc_t>(scale), t, y, x, sc + x, ix + x);
      }
    });
  });
  return {out, score, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_score, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& score, const at::Tensor& index,
    int64_t kernel_size, int64_t dilation, double scale, bool zero_border) {
  const Window w = check_backward(at::kCPU, grad_out, grad_score, query, key, value, score, index, kernel_size,
                                  dilation, zero_border);
  const int64_t B = key.size(0), T = key.size(1), H = key.size(3), W = key.size(4);
  if (B == 0 || H == 0 || W == 0)
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
  // Every pixel reads and writes all channels of a few pixels. Channels-first, those sit
  // H*W elements apart, a power-of-two stride at common frame sizes, which maps them all
  // to one cache set; channels-last they are adjacent. So the gradients are computed
  // channels-last, in the accumulation dtype, and returned contiguous in the input dtype.
  // Empty T, C or Cv need no special case: the loops over them run zero times, so T = 0
  // gives a zero grad_query and Cv = 0 leaves only grad_score's part of the score gradient.
  const auto go = channels_last(grad_out), q = channels_last(query), k = channels_last(key),
             v = channels_last(value);
  const auto acc_options = query.options().dtype(accumulation_dtype(query.scalar_type()));
  auto grad_query = empty_channels_last(query, acc_options), grad_key = empty_channels_last(key, acc_options),
       grad_value = empty_channels_last(value, acc_options);
  const auto gs = grad_score.contiguous(), sc = score.contiguous(), ix = index.contiguous();
  const Extent e = make_extent(key, value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "local_argmax_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    // A (b, t) map of grad_score, score or index: contiguous (B, T, H, W).
    auto map_at = [&](const at::Tensor& m, int64_t b) { return m.data_ptr<scalar_t>() + b * T * H * W; };
    auto in = [&](const at::Tensor& t, int64_t b) { return channels_last_at<const scalar_t>(t, b); };
    auto grad = [&](at::Tensor& t, int64_t b) { return channels_last_at<acc_t>(t, b); };
    at::parallel_for(0, B * H, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        for (int64_t x = 0; x < W; ++x)
          query_grad_pixel<scalar_t, acc_t>(in(go, b), map_at(gs, b), in(k, b), in(v, b),
                                            ix.data_ptr<int64_t>() + b * T * H * W, grad(grad_query, b), e, w, s,
                                            y, x);
      }
    });
    at::parallel_for(0, B * T * H, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / (T * H), t = row / H % T, y = row % H;
        for (int64_t x = 0; x < W; ++x)
          key_value_grad_pixel<scalar_t, acc_t>(in(go, b), map_at(gs, b), in(q, b), in(v, b), map_at(sc, b),
                                                ix.data_ptr<int64_t>() + b * T * H * W, grad(grad_key, b),
                                                grad(grad_value, b), e, w, s, t, y, x);
      }
    });
  });
  const auto dtype = query.scalar_type();
  return {to_contiguous(grad_query, dtype), to_contiguous(grad_key, dtype), to_contiguous(grad_value, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsr_kernels, CPU, m) {
  m.impl("local_argmax_attention", &forward_cpu);
  m.impl("local_argmax_attention_backward", &backward_cpu);
}

}  // namespace local_argmax_attention
}  // namespace vsr_kernels
