// Transparent huge pages for the large tensors a CPU kernel writes in full.
//
// A fresh output of more than glibc's mmap threshold (32 MiB at most) comes from a new mmap
// on every call, and a smaller one often from the top of the heap, which glibc gives back to
// the system once a few such tensors are freed (an autograd step frees its gradients together):
// either way each of its 4 KiB pages costs a first-touch fault (~0.7 µs on one host here, ~3.4
// µs on a busier one that reclaims freed guest memory: a 103 MB output is 25 k faults, more
// than writing it). With THP in "madvise" mode (the default on many distributions) asking for
// 2 MiB pages turns the tensor's whole 2 MiB-aligned pages into one fault each; only its
// unaligned ends keep 4 KiB pages. The memory used is the same when every page is written,
// which is why only outputs the kernels write completely are advised. A hint: errors are ignored.
#pragma once

#include <ATen/core/Tensor.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>

namespace vsr_kernels::cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.defined()) return;
  const size_t bytes = t.nbytes();
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Faults in, writable and without changing its contents, share `part` of `parts` of a fresh
// output that advise_huge_pages advised (shares disjoint, split at 2 MiB boundaries;
// MADV_POPULATE_WRITE, Linux 5.14+; elsewhere, or on error, nothing happens and the kernel's
// stores fault the pages in as before). A parallel kernel whose tasks each populate their
// share early has the 2 MiB pages zeroed on all threads at once, not inside one later stream
// of stores (trajectory_attention's forward: 3 ms of CPU per call less at 2 threads).
inline void populate_share(const at::Tensor& t, int64_t part, int64_t parts) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20, kPage = uintptr_t(4) << 10;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge || parts <= 0 || part < 0 || part >= parts) return;  // shares of whole 2 MiB pages
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr()) & ~(kPage - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes;
  auto boundary = [&](int64_t k) {  // where share k starts
    if (k >= parts) return end;
    return k <= 0 ? start : std::max(start, (start + (end - start) / uintptr_t(parts) * uintptr_t(k)) & ~(kHuge - 1));
  };
  const uintptr_t lo = boundary(part), hi = boundary(part + 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#else
  (void)t;
  (void)part;
  (void)parts;
#endif
}

}  // namespace vsr_kernels::cpu
