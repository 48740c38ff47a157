// Transparent huge pages for the large tensors a CPU kernel writes in full.
//
// A fresh output of more than glibc's mmap threshold (32 MiB at most) comes from a new mmap
// on every call, so each of its 4 KiB pages costs a first-touch fault (~0.7 µs here: a
// 103 MB output is 25 k faults, ~17 ms, more than writing it). With THP in "madvise" mode
// (the default on many distributions) asking for 2 MiB pages turns those into a few dozen
// faults. The memory used is the same when every page is written, which is why only outputs
// the kernels write completely are advised. A hint: errors are ignored.
#pragma once

#include <ATen/core/Tensor.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace vsr_kernels::cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.defined()) return;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace vsr_kernels::cpu
