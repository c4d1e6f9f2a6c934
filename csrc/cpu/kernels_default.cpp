// The CPU loops compiled for the baseline ISA of the build (x86-64: SSE2); see kernels.h.
#include "cpu/kernels.h"

namespace fastbn {
namespace cpu {
namespace isa_default {
#define FASTBN_ISA_NAME "default"
#include "cpu/kernels_impl.inc"
}  // namespace isa_default
}  // namespace cpu
}  // namespace fastbn
