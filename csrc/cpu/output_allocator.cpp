#include "cpu/output_allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace fastbn {
namespace cpu {
namespace {

// From glibc's mmap threshold up: below it malloc reuses heap memory that is already mapped.
constexpr size_t kMinCached = size_t(128) << 10;
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallRound = size_t(64) << 10;

size_t round_size(size_t n) {
  const size_t unit = n >= kHugePage ? kHugePage : kSmallRound;
  return (n + unit - 1) / unit * unit;
}

size_t cache_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("FASTBN_CPU_CACHE_MB");
    return size_t(env ? std::strtoull(env, nullptr, 10) : 1024) << 20;
  }();
  return limit;
}

class BlockCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = nullptr;
    const bool huge = bytes >= kHugePage;
    if (posix_memalign(&p, huge ? kHugePage : 64, bytes) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: fewer, larger faults on first touch
#endif
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= cache_limit()) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  void release_all() {
    std::map<size_t, std::vector<void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& kv : blocks)
      for (void* p : kv.second) std::free(p);
  }

  CacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(cached_), hits_, misses_};
  }

 private:
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;  // exact (rounded) size -> free blocks
  size_t cached_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

BlockCache& cache() {
  static BlockCache* c = new BlockCache();  // never destroyed: tensors may outlive static teardown
  return *c;
}

struct Block {
  void* ptr;
  size_t bytes;
};

void release_block(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  cache().give_back(b->ptr, b->bytes);
  delete b;
}

class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCached) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = round_size(n);
    void* p = cache().take(bytes);
    TORCH_CHECK(p != nullptr, "fastbn: out of CPU memory allocating ", bytes, " bytes");
    return {p, new Block{p, bytes}, &release_block, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingAllocator* allocator() {
  static CachingAllocator* a = new CachingAllocator();
  return a;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format) {
  return at::detail::empty_generic(sizes, allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   format);
}

CacheStats cache_stats() { return cache().stats(); }
void empty_cache() { cache().release_all(); }

}  // namespace cpu
}  // namespace fastbn
