// Run-time choice of the per-instruction-set copy of a CPU kernel, shared by every op with
// per-ISA translation units (<op>_{base,avx2,avx512}.cpp, each compiled for its instruction
// set through #pragma GCC target, so the extension still loads on any x86-64 CPU). Included
// by the launchers only (it uses TORCH_CHECK), never by the per-ISA translation units.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace vsr_kernels {
namespace cpu {

enum class Isa { kBase, kAvx2, kAvx512 };

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
constexpr bool kX86 = true;
#else
constexpr bool kX86 = false;
#endif

inline bool cpu_supports(Isa isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == Isa::kBase;
}

// The widest copy the CPU runs, or the one VSR_KERNELS_CPU_ISA names ("base", "avx2",
// "avx512"; a wider one than the CPU supports is refused, naming `op`). Read at every call,
// so tests can force each path.
inline Isa select_isa(const char* op) {
  const char* forced = std::getenv("VSR_KERNELS_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    const std::string name(forced);
    TORCH_CHECK(name == "base" || name == "avx2" || name == "avx512", op,
                ": VSR_KERNELS_CPU_ISA must be base, avx2 or avx512, got ", name);
    const Isa isa = name == "base" ? Isa::kBase : name == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    TORCH_CHECK(cpu_supports(isa), op, ": VSR_KERNELS_CPU_ISA=", name, " but this CPU lacks it");
    return isa;
  }
  if (kX86 && cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
  if (kX86 && cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kBase;
}

}  // namespace cpu
}  // namespace vsr_kernels

// fn(args...) of the per-ISA copy `isa` names: avx512::fn, avx2::fn or base::fn, looked up from
// the caller's namespace (where each op keeps its per-ISA namespaces). Off x86 only base is built.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define VSR_CPU_ISA_CALL(isa, fn, ...)                                    \
  ((isa) == ::vsr_kernels::cpu::Isa::kAvx512 ? avx512::fn(__VA_ARGS__)    \
   : (isa) == ::vsr_kernels::cpu::Isa::kAvx2 ? avx2::fn(__VA_ARGS__)      \
                                             : base::fn(__VA_ARGS__))
#else
#define VSR_CPU_ISA_CALL(isa, fn, ...) base::fn(__VA_ARGS__)
#endif
