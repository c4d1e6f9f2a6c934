// Where fastbn's large CPU outputs live.
//
// A fresh multi-megabyte buffer from malloc is a new mmap: the kernel then takes one page fault
// per 4 KiB on first touch, which on our 2-core machine costs more than BatchNorm itself
// (32 MiB: ~10 ms of faults against ~3 ms of work). A training loop asks for the same sizes every
// step, so outputs of 128 KiB and more come from a small cache of blocks that stay mapped (and are
// backed by transparent huge pages where the kernel allows), the way torch's CUDA caching
// allocator keeps device memory. The cache holds at most FASTBN_CPU_CACHE_MB (default 1024) MiB
// of free blocks; fastbn.empty_cache() returns them to the system.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace fastbn {
namespace cpu {

// at::empty on the CPU, through the cache for large sizes.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format);

struct CacheStats {
  int64_t cached_bytes, hits, misses;
};
CacheStats cache_stats();
void empty_cache();

}  // namespace cpu
}  // namespace fastbn
