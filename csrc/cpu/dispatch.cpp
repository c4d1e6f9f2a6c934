// Runtime choice of the CPU loops: the widest ISA this CPU supports, or FASTBN_CPU_ISA.
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace fastbn {
namespace cpu {
namespace isa_default {
const KernelTable& table();
}
#if defined(__x86_64__)
namespace isa_avx2 {
const KernelTable& table();
}
namespace isa_avx512 {
const KernelTable& table();
}
#endif

namespace {
const KernelTable& choose() {
  // FASTBN_CPU_ISA=default|avx2|avx512 caps the choice (for benchmarking and tests).
  const char* cap = std::getenv("FASTBN_CPU_ISA");
  auto allowed = [&](const char* isa) {
    if (!cap || !*cap) return true;
    if (std::strcmp(cap, "default") == 0) return false;
    if (std::strcmp(cap, "avx2") == 0) return std::strcmp(isa, "avx2") == 0;
    return true;
  };
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (allowed("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return isa_avx512::table();
  if (allowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return isa_avx2::table();
#endif
  (void)allowed;
  return isa_default::table();
}
}  // namespace

const KernelTable& kernels() {
  static const KernelTable& t = choose();
  return t;
}

template <>
const Kernels<float>& kernels_for<float>() {
  return kernels().f32;
}
template <>
const Kernels<double>& kernels_for<double>() {
  return kernels().f64;
}
template <>
const Kernels<bf16>& kernels_for<bf16>() {
  return kernels().bfloat16;
}

}  // namespace cpu
}  // namespace fastbn
