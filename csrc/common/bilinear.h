// Bilinear sampling of one point of a (H, W) plane with torchvision's boundary rule, and its
// gradient: op-independent, shared by every op that samples at fractional positions
// (deform_conv2d; issue 10's deformable-kernel convolution) on CPU and CUDA.
//
// Rule (torchvision.ops.deform_conv2d, DCNv2): a point with y <= -1, y >= H, x <= -1 or x >= W
// samples 0; otherwise its four neighbours floor(y) + {0, 1}, floor(x) + {0, 1} are weighted
// bilinearly and each neighbour outside the plane reads 0 (a neighbour inside is read even at
// weight 0: a NaN pixel spreads to the samples next to it). A NaN coordinate gives a NaN sample.
// Gradient: in the values, the bilinear weights; in the coordinates, the one-sided derivative
// towards +1 wherever the sample is not differentiable, including the -1 edge (y == -1 with
// -1 <= x < W, or x == -1 with -1 <= y < H), where the sample is 0 but grows towards the
// plane: torchvision's backward computes exactly that.
// Torch-free on purpose: see DESIGN.md, "Why torch-free .cu files".
#pragma once

#include <cstdint>

#include "host_device.h"

#if defined(__CUDACC__)
#define VSR_UNROLL _Pragma("unroll")
#else
#include <cmath>
#define VSR_UNROLL
#endif

namespace vsr_kernels {

// The four neighbours of one sample point, in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1)
// with y1 = y0 + 1 and x1 = x0 + 1. A neighbour outside the plane (or every neighbour of a
// point outside the sampled region) has weight 0, grad_y 0, grad_x 0, offset 0 and its bit
// of `valid` clear: it is never read, so a NaN next to the plane cannot leak in, while a
// neighbour inside with weight 0 is read (0 * NaN = NaN, as torchvision computes).
template <typename acc_t>
struct Bilinear {
  int64_t offset[4];  // y * row_stride + x * col_stride of each neighbour
  acc_t weight[4];    // d sample / d value of each neighbour
  acc_t grad_y[4];    // d weight / d y
  acc_t grad_x[4];    // d weight / d x
  acc_t poison;       // NaN when y or x is NaN (the sample and its coordinate gradient are NaN), else 0
  bool sampled;       // the point samples the plane (strictly inside (-1, H) x (-1, W))
  unsigned valid;     // bit n set: neighbour n lies in the plane (and the point in the region)
};

template <typename acc_t>
VSR_HOST_DEVICE acc_t floor_of(acc_t v) {
  return floor(v);
}

// The neighbours of point (y, x) of an (H, W) plane whose element (y, x) lies at
// y * row_stride + x * col_stride.
template <typename acc_t>
VSR_HOST_DEVICE Bilinear<acc_t> bilinear(acc_t y, acc_t x, int64_t H, int64_t W, int64_t row_stride,
                                         int64_t col_stride) {
  Bilinear<acc_t> b;
  // NaN compares false everywhere: a NaN coordinate is treated as outside (samples 0).
  // The region where the coordinate gradient can be nonzero: the sampled region and its -1 edge.
  const bool inside = y >= acc_t(-1) && y < acc_t(H) && x >= acc_t(-1) && x < acc_t(W);
  b.sampled = inside && y > acc_t(-1) && x > acc_t(-1);
  b.valid = 0;
  b.poison = y != y ? y : x != x ? x : acc_t(0);
  for (int i = 0; i < 4; ++i) {
    b.offset[i] = 0;
    b.weight[i] = b.grad_y[i] = b.grad_x[i] = acc_t(0);
  }
  if (!inside) return b;
  const acc_t fy = floor_of(y), fx = floor_of(x);
  const int64_t y0 = static_cast<int64_t>(fy), x0 = static_cast<int64_t>(fx);
  const acc_t ly = y - fy, lx = x - fx, hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  const bool ok_y[2] = {y0 >= 0, y0 + 1 <= H - 1};
  const bool ok_x[2] = {x0 >= 0, x0 + 1 <= W - 1};
  const acc_t wy[2] = {hy, ly}, wx[2] = {hx, lx};
  const acc_t sy[2] = {acc_t(-1), acc_t(1)};  // d wy / d y
VSR_UNROLL
  for (int i = 0; i < 2; ++i) {
VSR_UNROLL
    for (int j = 0; j < 2; ++j) {
      if (!(ok_y[i] && ok_x[j])) continue;
      const int n = 2 * i + j;
      b.valid |= 1u << n;
      b.offset[n] = (y0 + i) * row_stride + (x0 + j) * col_stride;
      b.weight[n] = b.sampled ? wy[i] * wx[j] : acc_t(0);
      b.grad_y[n] = sy[i] * wx[j];
      b.grad_x[n] = wy[i] * sy[j];
    }
  }
  return b;
}

// The sample at point b of a plane starting at `plane`, in acc_t.
template <typename acc_t, typename T>
VSR_HOST_DEVICE acc_t bilinear_sample(const Bilinear<acc_t>& b, const T* plane) {
  acc_t v = acc_t(0);
  if (!b.sampled) return b.poison;
VSR_UNROLL
  for (int n = 0; n < 4; ++n)
    if (b.valid >> n & 1u) v += b.weight[n] * vsr_kernels::convert<acc_t>(plane[b.offset[n]]);
  return v;
}

// d sample / d y and d sample / d x at point b of `plane`.
template <typename acc_t, typename T>
VSR_HOST_DEVICE void bilinear_coordinate_grad(const Bilinear<acc_t>& b, const T* plane, acc_t* dy, acc_t* dx) {
  acc_t gy = acc_t(0), gx = acc_t(0);
VSR_UNROLL
  for (int n = 0; n < 4; ++n) {
    if (!(b.valid >> n & 1u)) continue;
    const acc_t v = vsr_kernels::convert<acc_t>(plane[b.offset[n]]);
    gy += b.grad_y[n] * v;
    gx += b.grad_x[n] * v;
  }
  *dy = gy + b.poison;
  *dx = gx + b.poison;
}

}  // namespace vsr_kernels
