// CUDA kernels of trajectory-aware attention: one thread per token for the selection and the
// query gradient (the per-token math of kernels/trajectory_attention.h, as on CPU); the key
// and value gradients by a stable radix sort of the key tokens the query tokens add into and
// one thread per (run, channel) summing its run in token order: deterministic, no atomics.
#include <cub/device/device_radix_sort.cuh>

#include "launch.cuh"
#include "trajectory_attention.cuh"

namespace vsr_kernels {
namespace trajectory_attention {
namespace {

using gpu::first_element;
using gpu::grid_stride;
using gpu::kBlockThreads;
using gpu::TypedFrames;
using gpu::typed;

constexpr int kMinBlocksPerSm = 4;

// The token read at frame t by token p of batch element b, or -1.
__device__ __forceinline__ int64_t read_token(const double* location, int64_t b, int64_t t, int64_t p,
                                              const Extent& e) {
  const double* l = location + ((b * e.frames + t) * 2) * e.tokens() + p;
  return token_at<double>(l[0], l[e.tokens()], e.height, e.width);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) select_kernel(
    TypedFrames<const scalar_t> query, TypedFrames<const scalar_t> key, const double* location,
    scalar_t* score, int64_t* index, int64_t* chosen, int64_t batch, Extent e) {
  const int64_t N = e.tokens();
  for (int64_t i = first_element(); i < batch * N; i += grid_stride()) {
    const int64_t b = i / N, p = i % N;
    const Frames<const scalar_t> q = query[b], k = key[b];
    acc_t qq = 0, poison = 0;
    for (int64_t c = 0; c < e.channels; ++c) {
      const acc_t x = vsr_kernels::convert<acc_t>(q.at(0, c, p));
      qq += x * x;
      poison += x * acc_t(0);
    }
    Best<acc_t> best{acc_t(0), -1};
    int64_t best_pos = -1;
    for (int64_t t = 0; t < e.frames; ++t) {
      const int64_t pos = read_token(location, b, t, p, e);
      acc_t qk = 0, kk = 0;
      if (pos >= 0)
        for (int64_t c = 0; c < e.channels; ++c) {
          const acc_t x = vsr_kernels::convert<acc_t>(q.at(0, c, p));
          const acc_t y = vsr_kernels::convert<acc_t>(k.at(t, c, pos));
          qk += x * y;
          kk += y * y;
        }
      const int64_t before = best.frame;
      best.offer(similarity<acc_t>(pos >= 0, qk, qq, kk, poison), t);
      if (best.frame != before) best_pos = pos;
    }
    score[i] = vsr_kernels::convert<scalar_t>(best.sim);
    index[i] = best.frame;
    chosen[i] = best_pos;
  }
}

// One thread per output element (b, c, p): consecutive threads write consecutive tokens.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) gather_kernel(
    TypedFrames<const scalar_t> value, const int64_t* index, const int64_t* chosen, scalar_t* out, int64_t batch,
    int64_t channels, Extent e) {
  const int64_t N = e.tokens();
  for (int64_t i = first_element(); i < batch * channels * N; i += grid_stride()) {
    const int64_t b = i / (channels * N), c = i / N % channels, p = i % N;
    const int64_t pos = chosen[b * N + p];
    out[i] = pos >= 0 ? value[b].at(index[b * N + p], c, pos) : vsr_kernels::convert<scalar_t>(0.0f);
  }
}

// Per token: grad_query, the key token it adds into (sort key; B*T*N: none), its token number
// (sort value) and coefficients.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) query_grad_kernel(
    TypedFrames<const scalar_t> query, TypedFrames<const scalar_t> key, const double* location,
    const int64_t* index, const scalar_t* grad_score, acc_t* grad_query, int64_t* target, int64_t* token,
    acc_t* gain, acc_t* k_self, int64_t batch, Extent e) {
  const int64_t N = e.tokens();
  for (int64_t i = first_element(); i < batch * N; i += grid_stride()) {
    const int64_t b = i / N, p = i % N, t = index[i];
    const int64_t pos = t >= 0 && t < e.frames ? read_token(location, b, t, p, e) : -1;
    const Frames<const scalar_t> q = query[b], k = key[b];
    acc_t* gq = grad_query + b * e.channels * N + p;
    token[i] = i;
    target[i] = pos >= 0 ? (b * e.frames + t) * N + pos : batch * e.frames * N;
    if (pos < 0) {
      for (int64_t c = 0; c < e.channels; ++c) gq[c * N] = 0;
      gain[i] = 0;
      k_self[i] = 0;
      continue;
    }
    acc_t qq = 0, qk = 0, kk = 0;
    for (int64_t c = 0; c < e.channels; ++c) {
      const acc_t x = vsr_kernels::convert<acc_t>(q.at(0, c, p));
      const acc_t y = vsr_kernels::convert<acc_t>(k.at(t, c, pos));
      qq += x * x;
      qk += x * y;
      kk += y * y;
    }
    const Coefficients<acc_t> cf = coefficients<acc_t>(qk, qq, kk, vsr_kernels::convert<acc_t>(grad_score[i]));
    for (int64_t c = 0; c < e.channels; ++c)
      gq[c * N] = cf.gain * vsr_kernels::convert<acc_t>(k.at(t, c, pos)) +
                  cf.q_self * vsr_kernels::convert<acc_t>(q.at(0, c, p));
    gain[i] = cf.gain;
    k_self[i] = cf.k_self;
  }
}

// One thread per (channel c, sorted entry j); the thread at the head of a run of equal keys
// sums the run in order: grad[b, t, c, pos] = sum of weight * source[b, c, p] (+ k_self *
// own[b, t, c, pos] for the key). Consecutive threads take consecutive entries (sorted by
// key token, so mostly consecutive positions).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) run_sum_kernel(
    const int64_t* keys, const int64_t* tokens, int64_t entries, const acc_t* weight, const acc_t* k_self,
    TypedFrames<const scalar_t> source, TypedFrames<const scalar_t> own, bool has_self, acc_t* grad,
    int64_t channels, int64_t batch, Extent e) {
  const int64_t N = e.tokens(), none = batch * e.frames * N;
  for (int64_t i = first_element(); i < channels * entries; i += grid_stride()) {
    const int64_t c = i / entries, j = i % entries, target = keys[j];
    if (target >= none || (j > 0 && keys[j - 1] == target)) continue;
    const int64_t bt = target / N, pos = target % N, b = bt / e.frames, t = bt % e.frames;
    const acc_t kv = has_self ? vsr_kernels::convert<acc_t>(own[b].at(t, c, pos)) : acc_t(0);
    acc_t sum = 0;
    for (int64_t r = j; r < entries && keys[r] == target; ++r) {
      const int64_t tk = tokens[r];
      sum += weight[tk] * vsr_kernels::convert<acc_t>(source[b].at(0, c, tk % N));
      if (has_self) sum += k_self[tk] * kv;
    }
    grad[(bt * channels + c) * N + pos] = sum;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) fill_kernel(acc_t* data, int64_t n, acc_t v) {
  for (int64_t i = first_element(); i < n; i += grid_stride()) data[i] = v;
}

int end_bit(int64_t largest) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) <= largest) ++bits;
  return bits;
}

// The workspace: target, token, sorted keys, sorted tokens (int64 each) and the weights
// gain, k_self and ones (double-sized slots, enough for either accumulation type), then cub's.
struct Workspace {
  int64_t *target, *token, *keys, *tokens;
  void *gain, *k_self, *ones, *cub;
  size_t cub_bytes;
};

size_t cub_bytes(int64_t items, int bits) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), items, 0, bits);
  return bytes;
}

Workspace carve(void* base, int64_t items, size_t cub_size) {
  auto* p = static_cast<char*>(base);
  const size_t slot = static_cast<size_t>(items) * 8;
  Workspace w;
  w.target = reinterpret_cast<int64_t*>(p);
  w.token = reinterpret_cast<int64_t*>(p + slot);
  w.keys = reinterpret_cast<int64_t*>(p + 2 * slot);
  w.tokens = reinterpret_cast<int64_t*>(p + 3 * slot);
  w.gain = p + 4 * slot;
  w.k_self = p + 5 * slot;
  w.ones = p + 6 * slot;
  w.cub = p + 7 * slot;
  w.cub_bytes = cub_size;
  return w;
}

}  // namespace

cudaError_t launch_trajectory_attention_select(
    DType dtype, InputFrames query, InputFrames key, const double* location, void* score, int64_t* index,
    int64_t* chosen, int64_t batch, const Extent& extent, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    return gpu::launch(select_kernel<scalar_t, acc_t>, batch * extent.tokens(), stream, typed<const scalar_t>(query),
                       typed<const scalar_t>(key), location, static_cast<scalar_t*>(score), index, chosen, batch,
                       extent);
  });
}

cudaError_t launch_trajectory_attention_gather(
    DType dtype, InputFrames value, const int64_t* index, const int64_t* chosen, void* out, int64_t batch,
    int64_t value_channels, const Extent& extent, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    return gpu::launch(gather_kernel<scalar_t>, batch * value_channels * extent.tokens(), stream,
                       typed<const scalar_t>(value), index, chosen, static_cast<scalar_t*>(out), batch,
                       value_channels, extent);
  });
}

size_t trajectory_attention_workspace_bytes(int64_t batch, const Extent& extent) {
  const int64_t items = batch * extent.tokens();
  return static_cast<size_t>(items) * 8 * 7 + cub_bytes(items, end_bit(batch * extent.frames * extent.tokens()));
}

cudaError_t launch_trajectory_attention_backward(
    DType dtype, const InputFrames* grad_outs, const void* grad_score, InputFrames query, InputFrames key,
    const double* location, const int64_t* index, void* grad_query, void* grad_key, void* const* grad_values,
    const int64_t* value_channels, int num_values, void* workspace, size_t workspace_bytes, int64_t batch,
    const Extent& extent, cudaStream_t stream) {
  const int64_t items = batch * extent.tokens();
  if (items == 0) return cudaSuccess;
  const int bits = end_bit(batch * extent.frames * extent.tokens());
  const size_t sort_bytes = cub_bytes(items, bits);
  if (workspace_bytes < static_cast<size_t>(items) * 8 * 7 + sort_bytes) return cudaErrorInvalidValue;
  Workspace w = carve(workspace, items, sort_bytes);
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const auto q = typed<const scalar_t>(query), k = typed<const scalar_t>(key);
    auto* gain = static_cast<acc_t*>(w.gain);
    auto* k_self = static_cast<acc_t*>(w.k_self);
    auto* ones = static_cast<acc_t*>(w.ones);
    cudaError_t error = gpu::launch(query_grad_kernel<scalar_t, acc_t>, items, stream, q, k, location, index,
                                    static_cast<const scalar_t*>(grad_score), static_cast<acc_t*>(grad_query),
                                    w.target, w.token, gain, k_self, batch, extent);
    if (error != cudaSuccess) return error;
    error = gpu::launch(fill_kernel<acc_t>, items, stream, ones, items, acc_t(1));
    if (error != cudaSuccess) return error;
    size_t bytes = w.cub_bytes;
    error = cub::DeviceRadixSort::SortPairs(w.cub, bytes, static_cast<const int64_t*>(w.target), w.keys,
                                            static_cast<const int64_t*>(w.token), w.tokens, items, 0, bits, stream);
    if (error != cudaSuccess) return error;
    error = gpu::launch(run_sum_kernel<scalar_t, acc_t>, extent.channels * items, stream,
                        static_cast<const int64_t*>(w.keys), static_cast<const int64_t*>(w.tokens), items,
                        static_cast<const acc_t*>(gain), static_cast<const acc_t*>(k_self), q, k, true,
                        static_cast<acc_t*>(grad_key), extent.channels, batch, extent);
    for (int m = 0; m < num_values && error == cudaSuccess; ++m)
      error = gpu::launch(run_sum_kernel<scalar_t, acc_t>, value_channels[m] * items, stream,
                          static_cast<const int64_t*>(w.keys), static_cast<const int64_t*>(w.tokens), items,
                          static_cast<const acc_t*>(ones), static_cast<const acc_t*>(k_self),
                          typed<const scalar_t>(grad_outs[m]), k, false, static_cast<acc_t*>(grad_values[m]),
                          value_channels[m], batch, extent);
    return error;
  });
}

}  // namespace trajectory_attention
}  // namespace vsr_kernels
