// Table of the CPU inner loops, one table per instruction set.
//
// The loops themselves (kernels_impl.inc) use no torch header, so they can be compiled several
// times, once per ISA (default x86-64 / AVX2+FMA / AVX-512), each copy in its own namespace.
// dispatch.cpp picks the best table the running CPU supports: no SIGILL on older CPUs, full
// vector width on newer ones.
#pragma once
#include <cstdint>
#include <type_traits>  // used by kernels_impl.inc, which includes nothing itself

namespace fastbn {
namespace cpu {

// Bit-compatible with c10::BFloat16 (one uint16).
struct bf16 {
  uint16_t bits;
};

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// All pointers are dense; `rows x C` blocks are row-major (channels innermost).
template <typename T>
struct Kernels {
  using A = acc_t<T>;
  // --- BatchNorm, planar: `runs` runs of `n` contiguous values of one channel, `stride` apart ----
  // (one run when walking memory in order; N runs of H*W when a task owns a whole channel)
  // mean and sum of squared deviations (two passes: the block must fit L1)
  void (*plane_stats)(const T* x, int64_t runs, int64_t n, int64_t stride, double* mean, double* m2);
  // y = (x - mean) * scale + shift
  void (*plane_normalize)(const T* x, T* y, int64_t runs, int64_t n, int64_t stride, A mean, A scale, A shift);
  // sum(dy), sum(dy * (x - mean))
  void (*plane_grad_sums)(const T* dy, const T* x, int64_t runs, int64_t n, int64_t stride, A mean, double* sdy,
                          double* sdyxmu);
  // dx = dy * a - (x - mean) * b - c   (eval: b = c = 0)
  void (*plane_grad_input)(const T* dy, const T* x, T* dx, int64_t runs, int64_t n, int64_t stride, A mean, A a,
                           A b, A c);
  // plane_normalize over W consecutive channels at once (planes of n values; each run holds the W
  // planes back to back): for planes of one vector or so, a call per plane costs more than the plane
  void (*planes_normalize)(const T* x, T* y, int64_t runs, int64_t W, int64_t n, int64_t stride, const A* mean,
                           const A* scale, const A* shift);
  // plane_grad_input over W consecutive channels at once, likewise
  void (*planes_grad_input)(const T* dy, const T* x, T* dx, int64_t runs, int64_t W, int64_t n, int64_t stride,
                            const A* mean, const A* a, const A* b, const A* c);
  // plane_stats and plane_grad_sums over W consecutive channels at once, likewise, channel j's
  // results (the bits plane_stats / plane_grad_sums give it) at index j
  void (*planes_stats)(const T* x, int64_t runs, int64_t W, int64_t n, int64_t stride, double* mean, double* m2);
  void (*planes_grad_sums)(const T* dy, const T* x, int64_t runs, int64_t W, int64_t n, int64_t stride,
                           const A* mean, double* sdy, double* sdyxmu);

  // --- BatchNorm, channels innermost: `rows` rows of C channels, `stride` apart ----------------
  // per-channel mean (as its deviation from the row `base`) and m2 of the block, written
  void (*rows_stats)(const T* x, int64_t rows, int64_t C, int64_t stride, const T* base, A* dmean, A* m2);
  // from_memory: the tensor does not fit the caches (the caller knows its size): float rows of up
  // to 2 KB are walked one after the other rather than in blocks of rows (kernels_impl.inc: by_row)
  void (*rows_normalize)(const T* x, T* y, int64_t rows, int64_t C, int64_t stride, const A* mean,
                         const A* scale, const A* shift, bool from_memory);
  // per-channel sums of the block, written (not accumulated) to sdy/sdyxmu
  void (*rows_grad_sums)(const T* dy, const T* x, int64_t rows, int64_t C, int64_t stride, const A* mean,
                         A* sdy, A* sdyxmu);
  void (*rows_grad_input)(const T* dy, const T* x, T* dx, int64_t rows, int64_t C, int64_t stride,
                          const A* mean, const A* a, const A* b, const A* c, bool from_memory);

  // --- Linear + LeakyReLU epilogues on a (rows, N) block ------------------------------------
  // z <- leaky_relu(z + bias), in place; bias may be null
  void (*bias_leaky_relu)(T* z, int64_t rows, int64_t N, const T* bias, A slope);
  // gz = g * (saved > 0 ? 1 : slope); gbias[j] = sum_rows gz (written, if gbias non-null)
  void (*leaky_relu_grad)(const T* g, const T* saved, T* gz, int64_t rows, int64_t N, A slope,
                          A* gbias);
};

struct KernelTable {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<bf16> bfloat16;
};

// The table for the best ISA this CPU supports (chosen once).
const KernelTable& kernels();

template <typename T>
const Kernels<T>& kernels_for();

}  // namespace cpu
}  // namespace fastbn
