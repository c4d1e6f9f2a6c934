// ATen scalar type -> the element type of the CPU loops (kernels.h works without torch headers,
// so bfloat16 there is its own bit-compatible struct).
#pragma once
#include <c10/util/BFloat16.h>

#include "cpu/kernels.h"

namespace fastbn {
namespace cpu {

template <typename scalar_t>
struct KernelTypeOf {
  using type = scalar_t;
};
template <>
struct KernelTypeOf<c10::BFloat16> {
  using type = bf16;
};
template <typename scalar_t>
using kernel_type = typename KernelTypeOf<scalar_t>::type;

}  // namespace cpu
}  // namespace fastbn
