// The CPU loops compiled for AVX512; used only when the running CPU has it (dispatch.cpp).
#include "cpu/kernels.h"

#if defined(__x86_64__)
namespace fastbn {
namespace cpu {
namespace isa_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define FASTBN_ISA_NAME "avx512"
#include "cpu/kernels_impl.inc"
#pragma GCC pop_options
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace fastbn
#endif
