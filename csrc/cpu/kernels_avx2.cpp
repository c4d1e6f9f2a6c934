// The CPU loops compiled for AVX2; used only when the running CPU has it (dispatch.cpp).
#include "cpu/kernels.h"

#if defined(__x86_64__)
namespace fastbn {
namespace cpu {
namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTBN_ISA_NAME "avx2"
#include "cpu/kernels_impl.inc"
#pragma GCC pop_options
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace fastbn
#endif
