// Views of stacks of feature maps as the per-element functions of every op index them:
// Strides, Frames<T>, ChannelsLastFrames<T>, BatchedFrames<Void> and dot<acc_t>(...).
// Torch-free and CUDA-free: included by the CPU launchers, the CUDA kernels and the glue.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace vsr_kernels {

// Element (t, c, p) of a stack of feature maps, p = y * W + x, lives at
// data[t * frame + c * channel + p * pixel]. Channels-first maps have channel = H * W and
// pixel = 1; channels-last maps have channel = 1 and pixel = C. A single (C, H, W) map is a
// stack with frame stride 0.
struct Strides {
  int64_t frame, channel, pixel;
};

template <typename T>
struct Frames {
  T* data;
  Strides stride;
  VSR_HOST_DEVICE T& at(int64_t t, int64_t c, int64_t p) const {
    return data[t * stride.frame + c * stride.channel + p * stride.pixel];
  }
};

// Frames whose channels are adjacent in memory (channel stride 1, as the CPU launchers lay
// them out). The same element as Frames::at, but with the unit stride known to the
// compiler, which can then vectorise the loops over channels. Per-element functions written
// over an `Input` template parameter take either kind.
template <typename T>
struct ChannelsLastFrames {
  T* data;
  Strides stride;  // stride.channel is 1
  VSR_HOST_DEVICE T& at(int64_t t, int64_t c, int64_t p) const {
    return data[t * stride.frame + p * stride.pixel + c];
  }
};

// A (B, T, C, H, W) frame stack, or a (B, C, H, W) map with frame stride 0, whose element
// type is known only at run time (see dtype.h): batch element b is the Frames at
// data + b * batch_stride elements. What the torch glue hands the torch-free CUDA launchers.
template <typename Void>
struct BatchedFrames {
  Void* data;
  int64_t batch_stride;
  Strides stride;
};
using InputFrames = BatchedFrames<const void>;
using OutputFrames = BatchedFrames<void>;

// <a[ta, :, pa], b[tb, :, pb]> over n channels, in four interleaved partial sums: four
// independent multiply-add chains instead of one keep the pipeline busy, on CPU and GPU alike.
template <typename acc_t, typename Input>
VSR_HOST_DEVICE acc_t dot(Input a, int64_t ta, int64_t pa, Input b, int64_t tb, int64_t pb, int64_t n) {
  const auto product = [&](int64_t c) {
    return vsr_kernels::convert<acc_t>(a.at(ta, c, pa)) * vsr_kernels::convert<acc_t>(b.at(tb, c, pb));
  };
  acc_t part0 = 0, part1 = 0, part2 = 0, part3 = 0;
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    part0 += product(c);
    part1 += product(c + 1);
    part2 += product(c + 2);
    part3 += product(c + 3);
  }
  for (; c < n; ++c) part0 += product(c);
  return (part0 + part1) + (part2 + part3);
}

}  // namespace vsr_kernels
