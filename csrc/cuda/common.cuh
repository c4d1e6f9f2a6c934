// Small CUDA building blocks shared by fastbn's kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>

namespace fastbn {
namespace cuda {

constexpr int kWarp = 32;

// VEC values of T moved with one 16-byte (or narrower) load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Values of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / int(sizeof(T));

// Whether 16-byte vectors can be used: `inner` (the run length that must not be split) is a
// multiple of the vector and every pointer is 16-byte aligned.
template <typename T>
bool can_vectorize(int64_t inner, std::initializer_list<const void*> ptrs) {
  bool ok = inner % kVec16<T> == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return ok;
}

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Grid for a grid-stride loop over `n` items with `threads` per block.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t wanted = (n + threads - 1) / threads;
  const int64_t cap = int64_t(num_sms()) * 8;
  return unsigned(std::max<int64_t>(1, std::min(wanted, cap)));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of `threads` threads of KERNEL that the whole GPU keeps resident at once (one wave),
// asked of the occupancy calculator once per device.
template <auto KERNEL>
int64_t resident_blocks(int threads) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> per_sm[kMaxDevices];  // 0: not asked yet
  const int device = c10::cuda::current_device();
  int n = device < kMaxDevices ? per_sm[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, KERNEL, threads, 0));
    n = std::max(n, 1);
    if (device < kMaxDevices) per_sm[device].store(n, std::memory_order_relaxed);
  }
  return int64_t(n) * num_sms();
}

}  // namespace cuda
}  // namespace fastbn
