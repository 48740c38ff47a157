// CUDA kernels of flow-guided window attention: grid-stride loops, each element computed by
// the per-pixel functions the CPU launcher also runs (kernels/flow_guided_window_attention.h).
#include "flow_guided_window_attention.cuh"

#include "launch.cuh"

namespace vsr_kernels {
namespace flow_guided_window_attention {
namespace {

using gpu::first_element;
using gpu::grid_stride;
using gpu::kBlockThreads;
using gpu::typed;
using gpu::TypedFrames;

// Element i = ((b * heads + h) * chunks + chunk) * HW + p.
template <typename scalar_t, typename acc_t, typename coord_t>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(
    TypedFrames<const scalar_t> query, TypedFrames<const scalar_t> key, TypedFrames<const scalar_t> value,
    const coord_t* flow, const scalar_t* key_bias, const scalar_t* value_bias, TypedFrames<scalar_t> out, acc_t* lse,
    int64_t batch, Geometry g, acc_t scale) {
  const int64_t HW = g.pixels(), chunks = (g.head_dim + kCudaChunk - 1) / kCudaChunk;
  for (int64_t i = first_element(); i < batch * g.heads * chunks * HW; i += grid_stride()) {
    const int64_t p = i % HW, chunk = i / HW % chunks, h = i / HW / chunks % g.heads, b = i / HW / chunks / g.heads;
    int64_t by, bx;
    const bool finite = window_base(g, p, flow[b * 2 * HW + p], flow[(b * 2 + 1) * HW + p], &by, &bx);
    const int64_t c0 = chunk * kCudaChunk;
    acc_t l;
    if (finite) {
      l = forward_head<kCudaChunk, scalar_t, acc_t>(query[b], key[b], value[b], key_bias, value_bias, out[b], g,
                                                    scale, p, by, bx, h, c0);
    } else {
      const int64_t n = g.head_dim - c0 < kCudaChunk ? g.head_dim - c0 : kCudaChunk;
      nan_pixel<scalar_t>(out[b], p, h * g.head_dim + c0, n);
      l = vsr_kernels::convert<acc_t>(__int_as_float(0x7fc00000));
    }
    if (chunk == 0) lse[(b * g.heads + h) * HW + p] = l;
  }
}

// Element i = (b * heads + h) * HW + p.
template <typename scalar_t, typename acc_t, typename coord_t>
__global__ void __launch_bounds__(kBlockThreads, 2) pixel_grad_kernel(
    TypedFrames<const scalar_t> grad_out, TypedFrames<const scalar_t> query, TypedFrames<const scalar_t> key,
    TypedFrames<const scalar_t> value, const coord_t* flow, const scalar_t* key_bias, const scalar_t* value_bias,
    const acc_t* lse, TypedFrames<acc_t> grad_query, acc_t* prob, acc_t* dscore, int64_t* target, int64_t batch,
    Geometry g, acc_t scale) {
  const int64_t HW = g.pixels();
  const int cells = g.cells();
  for (int64_t i = first_element(); i < batch * g.heads * HW; i += grid_stride()) {
    const int64_t p = i % HW, h = i / HW % g.heads, b = i / HW / g.heads;
    int64_t by, bx;
    const bool finite = window_base(g, p, flow[b * 2 * HW + p], flow[(b * 2 + 1) * HW + p], &by, &bx);
    acc_t* ps = prob + ((b * HW + p) * g.heads + h) * cells;
    acc_t* ds = dscore + ((b * HW + p) * g.heads + h) * cells;
    if (finite) {
      backward_head<scalar_t, acc_t>(grad_out[b], query[b], key[b], value[b], key_bias, value_bias, grad_query[b],
                                     ps, ds, g, scale, lse[(b * g.heads + h) * HW + p], p, by, bx, h);
    } else {
      for (int n = 0; n < cells; ++n) ps[n] = ds[n] = 0;
      for (int64_t c = 0; c < g.head_dim; ++c) grad_query[b].at(0, h * g.head_dim + c, p) = 0;
    }
    if (h == 0)
      for (int n = 0; n < cells; ++n)
        target[(b * HW + p) * cells + n] = b * (HW + 1) + (finite ? cell_pixel(g, by, bx, n) : HW);
  }
}

// Element i = (b * chunks + chunk) * HW + t.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads, 2) key_value_grad_kernel(
    TypedFrames<const scalar_t> grad_out, TypedFrames<const scalar_t> query, const acc_t* prob, const acc_t* dscore,
    const int64_t* entries, const int64_t* offsets, TypedFrames<acc_t> grad_key, TypedFrames<acc_t> grad_value,
    int64_t batch, Geometry g) {
  const int64_t HW = g.pixels(), C = g.channels(), chunks = (C + kCudaChunk - 1) / kCudaChunk;
  for (int64_t i = first_element(); i < batch * chunks * HW; i += grid_stride()) {
    const int64_t t = i % HW, chunk = i / HW % chunks, b = i / HW / chunks;
    const int64_t c0 = chunk * kCudaChunk, n = C - c0 < kCudaChunk ? C - c0 : kCudaChunk;
    const int64_t segment = b * (HW + 1) + t;
    const Frames<acc_t> gk = grad_key[b], gv = grad_value[b];
    key_value_grad_target<scalar_t, acc_t>(grad_out[b], query[b], prob + b * HW * g.heads * g.cells(),
                                           dscore + b * HW * g.heads * g.cells(), entries + b * HW * g.cells(),
                                           offsets[segment] - b * HW * g.cells(),
                                           offsets[segment + 1] - b * HW * g.cells(), g, &gk.at(0, c0, t),
                                           &gv.at(0, c0, t), gk.stride.channel, c0, n);
  }
}

// Element i = (chunk * cells + n) * C + c: the partial sums of chunk `chunk` of pixels.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) bias_partial_kernel(
    TypedFrames<const scalar_t> grad_out, TypedFrames<const scalar_t> query, const acc_t* prob, const acc_t* dscore,
    acc_t* partial, int64_t batch, Geometry g) {
  const int64_t HW = g.pixels(), C = g.channels(), cells = g.cells(), total = batch * HW;
  const int64_t chunks = (total + kCudaBiasChunk - 1) / kCudaBiasChunk;
  for (int64_t i = first_element(); i < chunks * cells * C; i += grid_stride()) {
    const int64_t c = i % C, n = i / C % cells, chunk = i / C / cells, h = c / g.head_dim;
    acc_t dk = 0, dv = 0;
    const int64_t end = (chunk + 1) * kCudaBiasChunk < total ? (chunk + 1) * kCudaBiasChunk : total;
    for (int64_t j = chunk * kCudaBiasChunk; j < end; ++j) {
      const int64_t b = j / HW, p = j % HW, slot = (j * g.heads + h) * cells + n;
      const acc_t ds = dscore[slot], P = prob[slot];
      if (ds == 0 && P == 0) continue;  // a pixel with non-finite flow (or nothing to add)
      dk += ds * vsr_kernels::convert<acc_t>(query[b].at(0, c, p));
      dv += P * vsr_kernels::convert<acc_t>(grad_out[b].at(0, c, p));
    }
    partial[(chunk * 2) * cells * C + n * C + c] = dk;
    partial[(chunk * 2 + 1) * cells * C + n * C + c] = dv;
  }
}

// Element i = n * C + c: the partials summed in chunk order.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) bias_sum_kernel(const acc_t* partial, acc_t* grad_key_bias,
                                                                 acc_t* grad_value_bias, int64_t chunks,
                                                                 int64_t elements) {
  for (int64_t i = first_element(); i < elements; i += grid_stride()) {
    acc_t dk = 0, dv = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      dk += partial[(chunk * 2) * elements + i];
      dv += partial[(chunk * 2 + 1) * elements + i];
    }
    grad_key_bias[i] = dk;
    grad_value_bias[i] = dv;
  }
}

}  // namespace

cudaError_t launch_flow_guided_window_attention_forward(
    DType dtype, bool coord_double, InputFrames query, InputFrames key, InputFrames value, const void* flow,
    const void* key_bias, const void* value_bias, OutputFrames out, void* lse, int64_t batch, const Geometry& g,
    double scale, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const int64_t chunks = (g.head_dim + kCudaChunk - 1) / kCudaChunk;
    const int64_t elements = batch * g.heads * chunks * g.pixels();
    const auto run = [&](auto coord) {
      using coord_t = decltype(coord);
      return gpu::launch(forward_kernel<scalar_t, acc_t, coord_t>, elements, stream, typed<const scalar_t>(query),
                         typed<const scalar_t>(key), typed<const scalar_t>(value), static_cast<const coord_t*>(flow),
                         static_cast<const scalar_t*>(key_bias), static_cast<const scalar_t*>(value_bias),
                         typed<scalar_t>(out), static_cast<acc_t*>(lse), batch, g, static_cast<acc_t>(scale));
    };
    return coord_double ? run(double{}) : run(float{});
  });
}

cudaError_t launch_flow_guided_window_attention_pixel_grad(
    DType dtype, bool coord_double, InputFrames grad_out, InputFrames query, InputFrames key, InputFrames value,
    const void* flow, const void* key_bias, const void* value_bias, const void* lse, OutputFrames grad_query,
    void* prob, void* dscore, int64_t* target, int64_t batch, const Geometry& g, double scale, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const auto run = [&](auto coord) {
      using coord_t = decltype(coord);
      return gpu::launch(pixel_grad_kernel<scalar_t, acc_t, coord_t>, batch * g.heads * g.pixels(), stream,
                         typed<const scalar_t>(grad_out), typed<const scalar_t>(query), typed<const scalar_t>(key),
                         typed<const scalar_t>(value), static_cast<const coord_t*>(flow),
                         static_cast<const scalar_t*>(key_bias), static_cast<const scalar_t*>(value_bias),
                         static_cast<const acc_t*>(lse), typed<acc_t>(grad_query), static_cast<acc_t*>(prob),
                         static_cast<acc_t*>(dscore), target, batch, g, static_cast<acc_t>(scale));
    };
    return coord_double ? run(double{}) : run(float{});
  });
}

cudaError_t launch_flow_guided_window_attention_key_value_grad(
    DType dtype, InputFrames grad_out, InputFrames query, const void* prob, const void* dscore,
    const int64_t* entries, const int64_t* offsets, OutputFrames grad_key, OutputFrames grad_value, int64_t batch,
    const Geometry& g, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const int64_t chunks = (g.channels() + kCudaChunk - 1) / kCudaChunk;
    return gpu::launch(key_value_grad_kernel<scalar_t, acc_t>, batch * chunks * g.pixels(), stream,
                       typed<const scalar_t>(grad_out), typed<const scalar_t>(query), static_cast<const acc_t*>(prob),
                       static_cast<const acc_t*>(dscore), entries, offsets, typed<acc_t>(grad_key),
                       typed<acc_t>(grad_value), batch, g);
  });
}

cudaError_t launch_flow_guided_window_attention_bias_grad(
    DType dtype, InputFrames grad_out, InputFrames query, const void* prob, const void* dscore, void* partial,
    void* grad_key_bias, void* grad_value_bias, int64_t batch, const Geometry& g, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) {
    using scalar_t = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const int64_t chunks = (batch * g.pixels() + kCudaBiasChunk - 1) / kCudaBiasChunk;
    const int64_t elements = g.cells() * g.channels();
    const cudaError_t error = gpu::launch(
        bias_partial_kernel<scalar_t, acc_t>, chunks * elements, stream, typed<const scalar_t>(grad_out),
        typed<const scalar_t>(query), static_cast<const acc_t*>(prob), static_cast<const acc_t*>(dscore),
        static_cast<acc_t*>(partial), batch, g);
    if (error != cudaSuccess) return error;
    return gpu::launch(bias_sum_kernel<acc_t>, elements, stream, static_cast<const acc_t*>(partial),
                       static_cast<acc_t*>(grad_key_bias), static_cast<acc_t*>(grad_value_bias), chunks, elements);
  });
}

}  // namespace flow_guided_window_attention
}  // namespace vsr_kernels
