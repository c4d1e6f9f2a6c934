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

// An element of the loops' type as a double (outside the loops: this header is not compiled
// per ISA).
template <typename T>
double to_double(T v) {
  return double(v);
}
inline double to_double(bf16 v) {
  return double(float(c10::BFloat16(v.bits, c10::BFloat16::from_bits())));
}

}  // namespace cpu
}  // namespace fastbn
