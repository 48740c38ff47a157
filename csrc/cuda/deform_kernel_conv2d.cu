// CUDA kernels of deform_kernel_conv2d, sharing the per-point math with the CPU launcher
// (kernels/deform_kernel_conv2d.h; both samplings are common/bilinear.h's). Torch-free: see
// DESIGN.md.
//
// Forward: one thread per output element (b, c, ho, wo), consecutive threads along wo (the
// offset, mask and output reads coalesce); a channel's kernel scope is a few dozen values,
// read through the cache.
//
// Backward, deterministic without atomics (the partition of the CPU launcher; correctness
// first, not tuned), recomputing both samplings:
// - point_grad_kernel, one thread per (b, tap, position): walks the channels in order and
//   writes the kernel-offset gradient at the end of each kernel group and the input-offset and
//   mask gradients at the end of each offset group;
// - plane_grad_kernel, one thread per (b, c): walks the positions and taps in order and
//   scatters into its own input-gradient plane and its own (b, c) weight and bias partials;
// - reduce_kernel, one thread per weight / bias element: sums the partials over b in order.
#include "deform_kernel_conv2d.cuh"
#include "launch.cuh"

namespace vsr_kernels {
namespace deform_kernel_conv2d {
namespace {

// The kernel-scope sampler of tap k of kernel group gk at position p of batch element b.
template <typename acc_t, typename T>
__device__ Bilinear<acc_t> scope_at(const Geometry& g, const T* kernel_offset, int64_t b, int64_t gk, int64_t k,
                                    int64_t p) {
  const int64_t HoWo = g.positions();
  const T* ko = kernel_offset + (b * 2 * g.kernel_groups * g.kernel_points() + pair_channel(g, gk, k)) * HoWo + p;
  acc_t ky, kx;
  kernel_point(g, k, vsr_kernels::convert<acc_t>(ko[0]), vsr_kernels::convert<acc_t>(ko[HoWo]), &ky, &kx);
  return scope_sampler(g, ky, kx);
}

// The input tap of tap k of offset group og at position p of batch element b (offset may be null).
template <typename acc_t, typename T>
__device__ InputTap<acc_t> input_at(const Geometry& g, const T* offset, int64_t b, int64_t og, int64_t k, int64_t p) {
  const int64_t HoWo = g.positions();
  acc_t dy = acc_t(0), dx = acc_t(0);
  if (offset != nullptr) {
    const T* o = offset + (b * 2 * g.offset_groups * g.kernel_points() + pair_channel(g, og, k)) * HoWo + p;
    dy = vsr_kernels::convert<acc_t>(o[0]);
    dx = vsr_kernels::convert<acc_t>(o[HoWo]);
  }
  return input_tap(g, offset != nullptr, k, p / g.Wo, p % g.Wo, dy, dx);
}

template <typename acc_t, typename T>
__device__ acc_t mask_at(const Geometry& g, const T* mask, int64_t b, int64_t og, int64_t k, int64_t p) {
  if (mask == nullptr) return acc_t(1);
  return vsr_kernels::convert<acc_t>(
      mask[(b * g.offset_groups * g.kernel_points() + mask_channel(g, og, k)) * g.positions() + p]);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(gpu::kBlockThreads)
    forward_kernel(const T* input, const T* weight, const T* kernel_offset, const T* offset, const T* mask,
                   const T* bias, T* out, Geometry g) {
  const int64_t HoWo = g.positions(), kk = g.kernel_points();
  for (int64_t e = gpu::first_element(); e < g.B * g.C * HoWo; e += gpu::grid_stride()) {
    const int64_t p = e % HoWo, bc = e / HoWo, c = bc % g.C, b = bc / g.C;
    const int64_t gk = g.kernel_group_of(c), og = g.offset_group_of(c);
    const T* scope = weight + c * g.Sh * g.Sw;
    const T* plane = input + bc * g.H * g.W;
    acc_t acc = acc_t(0);
    for (int64_t k = 0; k < kk; ++k) {
      const acc_t kv = bilinear_sample<acc_t>(scope_at<acc_t>(g, kernel_offset, b, gk, k, p), scope);
      const acc_t xv = input_sample<acc_t>(input_at<acc_t>(g, offset, b, og, k, p), plane);
      acc += kv * (mask_at<acc_t>(g, mask, b, og, k, p) * xv);
    }
    if (bias != nullptr) acc += vsr_kernels::convert<acc_t>(bias[c]);
    out[e] = vsr_kernels::convert<T>(acc);
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(gpu::kBlockThreads)
    point_grad_kernel(const T* grad_out, const T* input, const T* weight, const T* kernel_offset, const T* offset,
                      const T* mask, acc_t* grad_kernel_offset, acc_t* grad_offset, acc_t* grad_mask, Geometry g) {
  const int64_t HoWo = g.positions(), kk = g.kernel_points();
  const int64_t cgk = g.kernel_group_channels(), cog = g.offset_group_channels();
  for (int64_t e = gpu::first_element(); e < g.B * kk * HoWo; e += gpu::grid_stride()) {
    const int64_t p = e % HoWo, k = e / HoWo % kk, b = e / (kk * HoWo);
    acc_t g_ky = acc_t(0), g_kx = acc_t(0), g_y = acc_t(0), g_x = acc_t(0), g_m = acc_t(0);
    Bilinear<acc_t> at_scope = scope_at<acc_t>(g, kernel_offset, b, 0, k, p);
    InputTap<acc_t> at_input = input_at<acc_t>(g, offset, b, 0, k, p);
    acc_t m = mask_at<acc_t>(g, mask, b, 0, k, p);
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t gk = c / cgk, og = c / cog;
      if (c > 0 && c % cgk == 0) at_scope = scope_at<acc_t>(g, kernel_offset, b, gk, k, p);
      if (c > 0 && c % cog == 0) {
        at_input = input_at<acc_t>(g, offset, b, og, k, p);
        m = mask_at<acc_t>(g, mask, b, og, k, p);
      }
      const T* scope = weight + c * g.Sh * g.Sw;
      const T* plane = input + (b * g.C + c) * g.H * g.W;
      const acc_t kv = bilinear_sample<acc_t>(at_scope, scope);
      const acc_t xv = input_sample<acc_t>(at_input, plane);
      const TapGrad<acc_t> d =
          tap_grad(vsr_kernels::convert<acc_t>(grad_out[(b * g.C + c) * HoWo + p]), kv, m, xv);
      acc_t dky, dkx;
      bilinear_coordinate_grad<acc_t>(at_scope, scope, &dky, &dkx);
      g_ky += d.kernel * dky;
      g_kx += d.kernel * dkx;
      g_m += d.mask;
      if (offset != nullptr) {
        acc_t dy, dx;
        bilinear_coordinate_grad<acc_t>(at_input.at, plane, &dy, &dx);
        g_y += d.input * dy;
        g_x += d.input * dx;
      }
      if ((c + 1) % cgk == 0) {  // the last channel of kernel group gk
        acc_t* o = grad_kernel_offset + (b * 2 * g.kernel_groups * kk + pair_channel(g, gk, k)) * HoWo + p;
        o[0] = g_ky;
        o[HoWo] = g_kx;
        g_ky = g_kx = acc_t(0);
      }
      if ((c + 1) % cog == 0) {  // the last channel of offset group og
        if (grad_offset != nullptr) {
          acc_t* o = grad_offset + (b * 2 * g.offset_groups * kk + pair_channel(g, og, k)) * HoWo + p;
          o[0] = g_y;
          o[HoWo] = g_x;
        }
        if (grad_mask != nullptr)
          grad_mask[(b * g.offset_groups * kk + mask_channel(g, og, k)) * HoWo + p] = g_m;
        g_y = g_x = g_m = acc_t(0);
      }
    }
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(gpu::kBlockThreads)
    plane_grad_kernel(const T* grad_out, const T* input, const T* weight, const T* kernel_offset, const T* offset,
                      const T* mask, acc_t* grad_input, acc_t* weight_partial, acc_t* bias_partial, Geometry g) {
  const int64_t HoWo = g.positions(), kk = g.kernel_points(), SS = g.Sh * g.Sw, HW = g.H * g.W;
  for (int64_t bc = gpu::first_element(); bc < g.B * g.C; bc += gpu::grid_stride()) {
    const int64_t c = bc % g.C, b = bc / g.C;
    const int64_t gk = g.kernel_group_of(c), og = g.offset_group_of(c);
    const T* scope = weight + c * SS;
    const T* plane = input + bc * HW;
    acc_t* gplane = grad_input + bc * HW;
    acc_t* gscope = weight_partial + bc * SS;
    acc_t bias_sum = acc_t(0);
    for (int64_t p = 0; p < HoWo; ++p) {
      const acc_t go = vsr_kernels::convert<acc_t>(grad_out[bc * HoWo + p]);
      bias_sum += go;
      for (int64_t k = 0; k < kk; ++k) {
        const Bilinear<acc_t> s = scope_at<acc_t>(g, kernel_offset, b, gk, k, p);
        const InputTap<acc_t> t = input_at<acc_t>(g, offset, b, og, k, p);
        const acc_t m = mask_at<acc_t>(g, mask, b, og, k, p);
        const TapGrad<acc_t> d =
            tap_grad(go, bilinear_sample<acc_t>(s, scope), m, input_sample<acc_t>(t, plane));
        if (s.sampled)
          for (int n = 0; n < 4; ++n)
            if (s.valid >> n & 1u) gscope[s.offset[n]] += d.kernel * s.weight[n];
        if (t.deformed) {
          if (t.at.sampled)  // outside, or on the -1 edge: a coordinate gradient only
            for (int n = 0; n < 4; ++n)
              if (t.at.valid >> n & 1u) gplane[t.at.offset[n]] += d.input * t.at.weight[n];
        } else if (t.grid >= 0) {
          gplane[t.grid] += d.input;
        }
      }
    }
    bias_partial[bc] = bias_sum;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(gpu::kBlockThreads)
    reduce_kernel(const acc_t* weight_partial, const acc_t* bias_partial, acc_t* grad_weight, acc_t* grad_bias,
                  Geometry g) {
  const int64_t SS = g.Sh * g.Sw;
  for (int64_t e = gpu::first_element(); e < g.C * (SS + 1); e += gpu::grid_stride()) {
    const int64_t c = e / (SS + 1), s = e % (SS + 1);
    acc_t sum = acc_t(0);
    if (s == SS) {
      for (int64_t b = 0; b < g.B; ++b) sum += bias_partial[b * g.C + c];
      grad_bias[c] = sum;
    } else {
      for (int64_t b = 0; b < g.B; ++b) sum += weight_partial[(b * g.C + c) * SS + s];
      grad_weight[c * SS + s] = sum;
    }
  }
}

}  // namespace

cudaError_t launch_deform_kernel_conv2d_forward(DType dtype, const void* input, const void* weight,
                                                const void* kernel_offset, const void* offset, const void* mask,
                                                const void* bias, void* out, const Geometry& g, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) -> cudaError_t {
    using T = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    return gpu::launch(forward_kernel<T, acc_t>, g.B * g.C * g.positions(), stream, static_cast<const T*>(input),
                       static_cast<const T*>(weight), static_cast<const T*>(kernel_offset),
                       static_cast<const T*>(offset), static_cast<const T*>(mask), static_cast<const T*>(bias),
                       static_cast<T*>(out), g);
  });
}

cudaError_t launch_deform_kernel_conv2d_backward(DType dtype, const void* grad_out, const void* input,
                                                 const void* weight, const void* kernel_offset, const void* offset,
                                                 const void* mask, void* grad_input, void* grad_weight,
                                                 void* grad_kernel_offset, void* grad_offset, void* grad_mask,
                                                 void* grad_bias, void* weight_partial, void* bias_partial,
                                                 const Geometry& g, cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) -> cudaError_t {
    using T = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const T* go = static_cast<const T*>(grad_out);
    const T* in = static_cast<const T*>(input);
    const T* w = static_cast<const T*>(weight);
    const T* ko = static_cast<const T*>(kernel_offset);
    const T* off = static_cast<const T*>(offset);
    const T* m = static_cast<const T*>(mask);
    cudaError_t error = gpu::launch(point_grad_kernel<T, acc_t>, g.B * g.kernel_points() * g.positions(), stream, go,
                                    in, w, ko, off, m, static_cast<acc_t*>(grad_kernel_offset),
                                    static_cast<acc_t*>(grad_offset), static_cast<acc_t*>(grad_mask), g);
    if (error != cudaSuccess) return error;
    error = gpu::launch(plane_grad_kernel<T, acc_t>, g.B * g.C, stream, go, in, w, ko, off, m,
                        static_cast<acc_t*>(grad_input), static_cast<acc_t*>(weight_partial),
                        static_cast<acc_t*>(bias_partial), g);
    if (error != cudaSuccess) return error;
    return gpu::launch(reduce_kernel<acc_t>, g.C * (g.Sh * g.Sw + 1), stream,
                       static_cast<const acc_t*>(weight_partial), static_cast<const acc_t*>(bias_partial),
                       static_cast<acc_t*>(grad_weight), static_cast<acc_t*>(grad_bias), g);
  });
}

}  // namespace deform_kernel_conv2d
}  // namespace vsr_kernels
