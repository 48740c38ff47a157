// Trajectory-aware attention (TTVSR): the per-token arithmetic, shared by the CPU launcher
// (cpu/trajectory_attention.cpp) and the CUDA kernels (cuda/trajectory_attention.cu), so
// both round, test, normalise and rank exactly alike.
//
// Semantics (see vsr_kernels.trajectory_attention): for token p = (i, j) and frame t,
// (x, y) = location[t, :, p] rounded to nearest, ties to even, in the location's dtype;
// inside the h x w grid the key and value of frame t at (y, x) are read, outside (or NaN)
// zero vectors. sim_t = <q / max(|q|, eps), k_t / max(|k_t|, eps)>, eps = 1e-12
// (F.normalize's rule); index = the lowest t of the largest sim_t (NaN ranks highest,
// through the shared `beats`); score = sim_index; out = v_index.
//
// The similarity is computed from three sums over the channels, <q, k>, |q|^2 and |k|^2:
// sim = <q, k> / (max(|q|, eps) * max(|k|, eps)). An outside key is a zero vector, whose
// similarity is sum_c (q_c / max(|q|, eps)) * 0: 0, or NaN when q holds a NaN or an inf
// (inf / inf); `poison` = sum_c q_c * 0 carries exactly that.
//
// Gradient of the score, per token, with dq = max(|q|, eps), dk = max(|k|, eps), gs the
// score's upstream gradient (F.normalize's clamp passes the norm's gradient where |x| >= eps):
//   d/dq = gs * (k / (dq * dk) - [|q| >= eps] * s * q / dq^2)
//   d/dk = gs * (q / (dq * dk) - [|k| >= eps] * s * k / dk^2)
// i.e. grad_q = gain * k + q_self * q and grad_k = gain * q + k_self * k (Coefficients).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/host_device.h"

namespace vsr_kernels {
namespace trajectory_attention {

// F.normalize's default eps.
constexpr double kEps = 1e-12;

// Sizes of one batch element: T frames, D query/key channels, an h x w token grid.
struct Extent {
  int64_t frames, channels, height, width;
  VSR_HOST_DEVICE int64_t tokens() const { return height * width; }
};

// Nearest integer, ties to even, in the location's own precision: float and double use the
// current (round-to-nearest-even) rounding mode; float16/bfloat16 locations are converted to
// float first (exact) and every half-precision value >= 2**11 is already an integer.
VSR_HOST_DEVICE double round_half_even(double v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return std::nearbyint(v);
#endif
}
VSR_HOST_DEVICE float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

// Token (y * w + x) at which the trajectory location (lx, ly) of type loc_t reads, or -1
// when the rounded location lies outside the grid (NaN compares false: outside too).
template <typename loc_t>
VSR_HOST_DEVICE int64_t token_at(loc_t lx, loc_t ly, int64_t height, int64_t width) {
  // Compared in double, where every rounded float location and every grid bound is exact.
  const double x = static_cast<double>(round_half_even(lx));
  const double y = static_cast<double>(round_half_even(ly));
  if (!(x >= 0.0 && x <= static_cast<double>(width - 1) && y >= 0.0 && y <= static_cast<double>(height - 1)))
    return -1;
  return static_cast<int64_t>(y) * width + static_cast<int64_t>(x);
}

// max(sqrt(squares), eps): F.normalize's divisor.
template <typename acc_t>
VSR_HOST_DEVICE acc_t divisor(acc_t squares) {
  const acc_t n = sqrt(squares);
  return n > acc_t(kEps) ? n : acc_t(kEps);  // NaN norm: NaN (the comparison is false)
}

// sim of one frame from the channel sums: inside, <q, k>, |q|^2, |k|^2; outside, the
// poison of the query (0, or NaN for a non-finite query).
template <typename acc_t>
VSR_HOST_DEVICE acc_t similarity(bool inside, acc_t qk, acc_t qq, acc_t kk, acc_t poison) {
  if (!inside) return poison;
  return qk / (divisor(qq) * divisor(kk));
}

// Running selection over frames visited in increasing t: NaN beats every number, ties keep
// the earlier frame.
template <typename acc_t>
struct Best {
  acc_t sim;
  int64_t frame;  // -1 before the first frame
  VSR_HOST_DEVICE void offer(acc_t s, int64_t t) {
    if (frame < 0 || beats(s, sim)) {
      sim = s;
      frame = t;
    }
  }
};

// Gradient coefficients of one token: grad_q = gain * k + q_self * q, grad_k = gain * q + k_self * k.
template <typename acc_t>
struct Coefficients {
  acc_t gain, q_self, k_self;
};

// From the channel sums of the chosen (inside) key and the score's upstream gradient.
template <typename acc_t>
VSR_HOST_DEVICE Coefficients<acc_t> coefficients(acc_t qk, acc_t qq, acc_t kk, acc_t grad_score) {
  const acc_t dq = divisor(qq), dk = divisor(kk);
  const acc_t s = qk / (dq * dk);
  const acc_t gain = grad_score / (dq * dk);
  // |x| >= eps, as F.normalize's clamp_min lets the norm's gradient through; the norm's own
  // gradient is 0 at |x| = 0 (below eps anyway).
  const acc_t q_self = sqrt(qq) >= acc_t(kEps) ? -grad_score * s / (dq * dq) : acc_t(0);
  const acc_t k_self = sqrt(kk) >= acc_t(kEps) ? -grad_score * s / (dk * dk) : acc_t(0);
  return {gain, q_self, k_self};
}

}  // namespace trajectory_attention
}  // namespace vsr_kernels
