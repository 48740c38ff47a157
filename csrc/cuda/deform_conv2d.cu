// CUDA kernels of deform_conv2d, sharing the per-point sampling math with the CPU launcher
// (kernels/deform_conv2d.h, common/bilinear.h). Torch-free: see DESIGN.md.
//
// Forward: an implicit GEMM. A block computes a 64-position x 64-output-channel tile of one
// (batch element, weight group); per 16-row slice of the column matrix (rows = (input
// channel, kernel point)), its threads gather the bilinear samples into shared memory, load
// the matching weight slice, and accumulate 4 x 4 outputs each in the accumulation dtype.
//
// Backward, deterministic without atomics (correctness first, not tuned):
// - input, offset and mask gradients: one block per (batch element, offset group); each thread
//   owns input channels of the group (so its grad_input scatter conflicts with no one), walks
//   the positions and kernel points in order, computes its column gradient (a dot over the
//   group's output channels) and its partial offset/mask gradients, which the block reduces in
//   a fixed tree order;
// - weight gradient: one thread per weight element, summing over (batch, position) in order;
// - bias gradient: one thread per output channel.
#include "deform_conv2d.cuh"
#include "launch.cuh"

namespace vsr_kernels {
namespace deform_conv2d {
namespace {

constexpr int kTileP = 64, kTileN = 64, kTileR = 16;
constexpr int kForwardThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kReduceThreads = 128;

template <typename acc_t, typename T>
__device__ acc_t column_value(const Geometry& g, const T* in_b, const T* off_b, const T* msk_b, int64_t c, int64_t k,
                              int64_t p) {
  const int64_t HoWo = g.positions();
  const Sample<acc_t> s = sample_at<acc_t>(g, off_b, HoWo, 1, msk_b, HoWo, 1, c / g.offset_group_in(), k, p / g.Wo,
                                           p % g.Wo, g.W, 1);
  return s.mask * bilinear_sample<acc_t>(s.at, in_b + c * g.H * g.W);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kForwardThreads) forward_kernel(const T* input, const T* offset, const T* weight,
                                                                  const T* mask, const T* bias, T* out, Geometry g) {
  __shared__ acc_t cols[kTileR][kTileP];
  __shared__ acc_t wts[kTileR][kTileN];
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), R = g.group_in() * kk;
  const int64_t p0 = int64_t(blockIdx.x) * kTileP, n0 = int64_t(blockIdx.y) * kTileN;
  const int64_t b = blockIdx.z / g.groups, gr = blockIdx.z % g.groups;
  const T* in_b = input + b * g.C * g.H * g.W;
  const T* off_b = offset + b * 2 * g.offset_groups * kk * HoWo;
  const T* msk_b = mask == nullptr ? nullptr : mask + b * g.offset_groups * kk * HoWo;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[4][4] = {};
  for (int64_t r0 = 0; r0 < R; r0 += kTileR) {
    for (int i = threadIdx.x; i < kTileR * kTileP; i += kForwardThreads) {
      const int rr = i / kTileP, pp = i % kTileP;
      const int64_t r = r0 + rr, p = p0 + pp;
      acc_t v = acc_t(0);
      if (r < R && p < HoWo) v = column_value<acc_t>(g, in_b, off_b, msk_b, gr * g.group_in() + r / kk, r % kk, p);
      cols[rr][pp] = v;
    }
    for (int i = threadIdx.x; i < kTileR * kTileN; i += kForwardThreads) {
      const int rr = i / kTileN, nn = i % kTileN;
      const int64_t r = r0 + rr, n = n0 + nn;
      wts[rr][nn] = r < R && n < g.group_out()
                        ? vsr_kernels::convert<acc_t>(weight[(gr * g.group_out() + n) * R + r])
                        : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kTileR; ++rr)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += cols[rr][ty * 4 + i] * wts[rr][tx * 4 + j];
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t p = p0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (p >= HoWo || n >= g.group_out()) continue;
      const int64_t o = gr * g.group_out() + n;
      const acc_t v = acc[i][j] + (bias == nullptr ? acc_t(0) : vsr_kernels::convert<acc_t>(bias[o]));
      out[(b * g.Cout + o) * HoWo + p] = vsr_kernels::convert<T>(v);
    }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) input_grad_kernel(const T* grad_out, const T* input,
                                                                    const T* offset, const T* weight, const T* mask,
                                                                    acc_t* grad_input, acc_t* grad_offset,
                                                                    acc_t* grad_mask, Geometry g) {
  __shared__ acc_t partial[3][kReduceThreads];
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), HW = g.H * g.W, R = g.group_in() * kk;
  const int64_t G = g.offset_groups, cpg = g.offset_group_in();
  const int64_t b = blockIdx.x / G, og = blockIdx.x % G;
  const T* in_b = input + b * g.C * HW;
  const T* off_b = offset + b * 2 * G * kk * HoWo;
  const T* msk_b = mask == nullptr ? nullptr : mask + b * G * kk * HoWo;
  const T* go_b = grad_out + b * g.Cout * HoWo;
  acc_t* gin_b = grad_input + b * g.C * HW;
  for (int64_t p = 0; p < HoWo; ++p) {
    for (int64_t k = 0; k < kk; ++k) {
      const Sample<acc_t> s = sample_at<acc_t>(g, off_b, HoWo, 1, msk_b, HoWo, 1, og, k, p / g.Wo, p % g.Wo, g.W, 1);
      acc_t gy = acc_t(0), gx = acc_t(0), gm = acc_t(0);
      for (int64_t c = og * cpg + threadIdx.x; c < (og + 1) * cpg; c += kReduceThreads) {
        const int64_t gr = c / g.group_in(), r = (c - gr * g.group_in()) * kk + k;
        acc_t gcol = acc_t(0);
        for (int64_t n = 0; n < g.group_out(); ++n) {
          const int64_t o = gr * g.group_out() + n;
          gcol += vsr_kernels::convert<acc_t>(weight[o * R + r]) * vsr_kernels::convert<acc_t>(go_b[o * HoWo + p]);
        }
        const T* plane = in_b + c * HW;
        gm += gcol * bilinear_sample<acc_t>(s.at, plane);
        const acc_t gs = gcol * s.mask;
        acc_t dy, dx;
        bilinear_coordinate_grad<acc_t>(s.at, plane, &dy, &dx);
        gy += gs * dy;
        gx += gs * dx;
        if (s.at.sampled)
          for (int nb = 0; nb < 4; ++nb)
            if (s.at.valid >> nb & 1u) gin_b[c * HW + s.at.offset[nb]] += gs * s.at.weight[nb];
      }
      partial[0][threadIdx.x] = gy;
      partial[1][threadIdx.x] = gx;
      partial[2][threadIdx.x] = gm;
      __syncthreads();
      for (int half = kReduceThreads / 2; half > 0; half /= 2) {  // fixed tree order: deterministic
        if (threadIdx.x < half)
          for (int q = 0; q < 3; ++q) partial[q][threadIdx.x] += partial[q][threadIdx.x + half];
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        const int64_t cy = offset_channel_y(g, og, k);
        grad_offset[(b * 2 * G * kk + cy) * HoWo + p] = partial[0][0];
        grad_offset[(b * 2 * G * kk + cy + 1) * HoWo + p] = partial[1][0];
        if (grad_mask != nullptr) grad_mask[(b * G * kk + mask_channel(g, og, k)) * HoWo + p] = partial[2][0];
      }
      __syncthreads();
    }
  }
}

template <typename T, typename acc_t>
__global__ void weight_grad_kernel(const T* grad_out, const T* input, const T* offset, const T* mask,
                                   acc_t* grad_weight, acc_t* grad_bias, Geometry g) {
  const int64_t kk = g.kernel_points(), HoWo = g.positions(), R = g.group_in() * kk;
  const int64_t G = g.offset_groups;
  for (int64_t e = gpu::first_element(); e < g.Cout * (R + 1); e += gpu::grid_stride()) {
    const int64_t o = e / (R + 1), r = e % (R + 1);
    acc_t acc = acc_t(0);
    for (int64_t b = 0; b < g.B; ++b) {
      const T* go = grad_out + (b * g.Cout + o) * HoWo;
      if (r == R) {  // the bias gradient of o
        for (int64_t p = 0; p < HoWo; ++p) acc += vsr_kernels::convert<acc_t>(go[p]);
        continue;
      }
      const int64_t c = o / g.group_out() * g.group_in() + r / kk;
      const T* in_b = input + b * g.C * g.H * g.W;
      const T* off_b = offset + b * 2 * G * kk * HoWo;
      const T* msk_b = mask == nullptr ? nullptr : mask + b * G * kk * HoWo;
      for (int64_t p = 0; p < HoWo; ++p)
        acc += vsr_kernels::convert<acc_t>(go[p]) * column_value<acc_t>(g, in_b, off_b, msk_b, c, r % kk, p);
    }
    if (r == R)
      grad_bias[o] = acc;
    else
      grad_weight[o * R + r] = acc;
  }
}

}  // namespace

cudaError_t launch_deform_conv2d_forward(DType dtype, const void* input, const void* offset, const void* weight,
                                         const void* mask, const void* bias, void* out, const Geometry& g,
                                         cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) -> cudaError_t {
    using T = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const int64_t tiles_p = (g.positions() + kTileP - 1) / kTileP, tiles_n = (g.group_out() + kTileN - 1) / kTileN;
    if (g.B * g.groups == 0 || tiles_p == 0 || tiles_n == 0) return cudaSuccess;
    if (tiles_n > 65535 || g.B * g.groups > 65535 || tiles_p > 2147483647) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(tiles_p), static_cast<unsigned>(tiles_n),
                    static_cast<unsigned>(g.B * g.groups));
    forward_kernel<T, acc_t><<<grid, kForwardThreads, 0, stream>>>(
        static_cast<const T*>(input), static_cast<const T*>(offset), static_cast<const T*>(weight),
        static_cast<const T*>(mask), static_cast<const T*>(bias), static_cast<T*>(out), g);
    return cudaGetLastError();
  });
}

cudaError_t launch_deform_conv2d_backward(DType dtype, const void* grad_out, const void* input, const void* offset,
                                          const void* weight, const void* mask, void* grad_input, void* grad_offset,
                                          void* grad_mask, void* grad_weight, void* grad_bias, const Geometry& g,
                                          cudaStream_t stream) {
  return gpu::dispatch(dtype, [&](auto types) -> cudaError_t {
    using T = typename decltype(types)::scalar_t;
    using acc_t = typename decltype(types)::acc_t;
    const int64_t programs = g.B * g.offset_groups;
    if (programs > 2147483647) return cudaErrorInvalidConfiguration;
    if (programs > 0 && g.positions() > 0)
      input_grad_kernel<T, acc_t><<<static_cast<unsigned>(programs), kReduceThreads, 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(input), static_cast<const T*>(offset),
          static_cast<const T*>(weight), static_cast<const T*>(mask), static_cast<acc_t*>(grad_input),
          static_cast<acc_t*>(grad_offset), static_cast<acc_t*>(grad_mask), g);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
    return gpu::launch(weight_grad_kernel<T, acc_t>, g.Cout * (g.group_in() * g.kernel_points() + 1), stream,
                       static_cast<const T*>(grad_out), static_cast<const T*>(input), static_cast<const T*>(offset),
                       static_cast<const T*>(mask), static_cast<acc_t*>(grad_weight), static_cast<acc_t*>(grad_bias),
                       g);
  });
}

}  // namespace deform_conv2d
}  // namespace vsr_kernels
