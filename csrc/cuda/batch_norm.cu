// BatchNorm on CUDA. The same maths as the CPU loops (cpu/kernels_impl.inc) and the Python
// reference (fastbn/reference/):
//   forward:  per-channel Welford (mean, m2) -> y = (x - mean) * invstd * weight + bias
//   backward: per-channel sum(dy), sum(dy * (x - mean)) -> dx (see batch_norm_backward_input)
//
// Small channels (up to 32 values per thread of a block) run fused: one launch per direction,
// each block reducing whole channels, finishing their constants and running the elementwise pass
// over the same values. Larger ones run in three launches so that large N*H*W fills the GPU: a
// grid of (channel, split) blocks, one wave of them, each merges its values with warp shuffles
// and shared memory into one partial; a finalize kernel (a warp, or a block, per channel) merges
// the partials in a fixed order (deterministic); then the elementwise pass, a grid-stride loop.
// Statistics run on values shifted by the channel's first value (accuracy for large means);
// every pass reads 16-byte vectors where the layout allows, the walks over channels several of
// them before using any (kLoads). Everything runs on the current stream; partial offsets are
// 64-bit, elementwise indices 32-bit only where the size allows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>

#include "checks.h"
#include "cuda/common.cuh"

namespace fastbn {
namespace cuda {
namespace {

constexpr const char* kOp = "fastbn.batch_norm";
constexpr int kThreads = 256;

// ---- reduction states -----------------------------------------------------------------------

template <typename acc_t>
struct Welford {
  acc_t mean, m2;
  int64_t n;
};

// b / a for the merge weights: float's fast division (2 ulp, no slow-path branch, so the loads of
// an unrolled loop are not held behind it); double's exact one.
__device__ __forceinline__ float weight_ratio(float b, float a) { return __fdividef(b, a); }
__device__ __forceinline__ double weight_ratio(double b, double a) { return b / a; }

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const acc_t delta = b.mean - a.mean, frac = weight_ratio(acc_t(b.n), acc_t(n));
  return {a.mean + delta * frac, a.m2 + b.m2 + delta * delta * acc_t(a.n) * frac, n};
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_down(const Welford<acc_t>& w, int off) {
  return {__shfl_down_sync(0xffffffffu, w.mean, off), __shfl_down_sync(0xffffffffu, w.m2, off),
          __shfl_down_sync(0xffffffffu, w.n, off)};
}

template <typename acc_t>
struct GradSums {
  acc_t sdy, sdyxmu;
};

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> merge(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  return {a.sdy + b.sdy, a.sdyxmu + b.sdyxmu};
}

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> shfl_down(const GradSums<acc_t>& s, int off) {
  return {__shfl_down_sync(0xffffffffu, s.sdy, off), __shfl_down_sync(0xffffffffu, s.sdyxmu, off)};
}

// 16-byte loads a thread issues before it uses any: the walks hand out B = kLoads / (tensors
// read) indices at a time while B fit. The unrolled loops they replace checked their bound before
// each step and so issued the loads one at a time (seen in the SASS). On an H200, A/B in one
// call: the statistics reduction at 128x64x32x32 13.8 -> 12.7 us, channels_last fwd+bwd 86.6 ->
// 84.3 us of kernels, the fused kernels unchanged (benchmarks/results/gpu-2026-11-27, run 4).
constexpr int kLoads = 8;

// The B vectors at indices i, every load issued before any value is used.
template <typename T, int VEC, int B>
__device__ __forceinline__ void load_vecs(const T* __restrict__ p, const int64_t (&i)[B], Vec<T, VEC> (&out)[B]) {
#pragma unroll
  for (int b = 0; b < B; ++b) out[b] = *reinterpret_cast<const Vec<T, VEC>*>(p + i[b]);
}

// What is accumulated, B vectors of VEC values at a time (16-byte loads, or VEC = 1), by index
// into the dense tensors. `channel(c)` is loaded once per channel by each thread and handed to
// `add`.
template <typename scalar_t, typename acc_t>
struct StatsOp {
  using State = Welford<acc_t>;
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  static constexpr int kBatch = kLoads;  // vectors a batch: kLoads / (tensors read)
  const scalar_t* __restrict__ x;
  int64_t pivot_stride;  // channel c's first value is x[c * pivot_stride]
  __device__ State init() const { return {acc_t(0), acc_t(0), 0}; }
  // Welford runs on x - (the channel's first value): the shifted mean is small, so float32 keeps
  // its low bits when a channel's mean is large against its spread (x = 1e4 + randn).
  __device__ acc_t channel(int64_t c) const { return static_cast<acc_t>(x[c * pivot_stride]); }
  // B vectors at once (their loads all in flight): the mean and m2 of their B * VEC values by
  // two passes over registers, then Chan's merge into the running state.
  template <int VEC, int B>
  __device__ void add(State& s, const int64_t (&i)[B], acc_t pivot) const {
    Vec<scalar_t, VEC> in[B];
    load_vecs(x, i, in);
    constexpr int n = B * VEC;
    acc_t sum = 0;
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += static_cast<acc_t>(in[b].v[k]) - pivot;
    const acc_t m = sum / acc_t(n);
    acc_t m2 = 0;
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t d = static_cast<acc_t>(in[b].v[k]) - pivot - m;
        m2 += d * d;
      }
    s = merge(s, State{m, m2, n});
  }
  // Rows layout: each of the B vectors is one row of VEC consecutive channels, each channel with
  // its own state. The states always see the same rows, so they share one count and one merge
  // weight; channel k's B values are merged as above.
  template <int VEC, int B>
  __device__ void add_row(State (&s)[VEC], const int64_t (&i)[B], const acc_t (&pivot)[VEC]) const {
    Vec<scalar_t, VEC> in[B];
    load_vecs(x, i, in);
    const int64_t n = s[0].n + B;
    const acc_t frac = weight_ratio(acc_t(B), acc_t(n)), old_n = acc_t(s[0].n);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t v[B], sum = 0;
#pragma unroll
      for (int b = 0; b < B; ++b) sum += (v[b] = static_cast<acc_t>(in[b].v[k]) - pivot[k]);
      const acc_t m = sum / acc_t(B);
      acc_t m2 = 0;
#pragma unroll
      for (int b = 0; b < B; ++b) m2 += (v[b] - m) * (v[b] - m);
      const acc_t delta = m - s[k].mean;  // Chan's merge, a.n = old_n, b.n = B
      s[k].mean += delta * frac;
      s[k].m2 += m2 + delta * delta * old_n * frac;
      s[k].n = n;
    }
  }
};

template <typename scalar_t, typename acc_t>
struct GradSumsOp {
  using State = GradSums<acc_t>;
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  static constexpr int kBatch = kLoads / 2;
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ mean;
  __device__ State init() const { return {acc_t(0), acc_t(0)}; }
  __device__ acc_t channel(int64_t c) const { return mean[c]; }
  template <int VEC, int B>
  __device__ void add(State& s, const int64_t (&i)[B], acc_t mu) const {
    Vec<scalar_t, VEC> g[B], xin[B];
    load_vecs(dy, i, g);
    load_vecs(x, i, xin);
#pragma unroll
    for (int b = 0; b < B; ++b) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t gv = static_cast<acc_t>(g[b].v[k]);
        s.sdy += gv;
        s.sdyxmu += gv * (static_cast<acc_t>(xin[b].v[k]) - mu);
      }
    }
  }
  template <int VEC, int B>
  __device__ void add_row(State (&s)[VEC], const int64_t (&i)[B], const acc_t (&mu)[VEC]) const {
    Vec<scalar_t, VEC> g[B], xin[B];
    load_vecs(dy, i, g);
    load_vecs(x, i, xin);
#pragma unroll
    for (int b = 0; b < B; ++b) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t gv = static_cast<acc_t>(g[b].v[k]);
        s[k].sdy += gv;
        s[k].sdyxmu += gv * (static_cast<acc_t>(xin[b].v[k]) - mu[k]);
      }
    }
  }
};

template <typename State>
__device__ __forceinline__ State warp_merge(State s) {
  for (int off = kWarp / 2; off > 0; off >>= 1) s = merge(s, shfl_down(s, off));
  return s;
}

// ---- block-wide merges (blocks of kThreads threads, any shape) -------------------------------

// The states of every thread of the block, merged by the same tree every time; the result is
// valid in thread 0. `shared`: kThreads / kWarp states.
template <typename State>
__device__ __forceinline__ State block_merge(State s, State* shared) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x, lane = t % kWarp, warp = t / kWarp;
  s = warp_merge(s);
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) s = warp_merge(lane < kThreads / kWarp ? shared[lane] : State{});
  return s;
}

// Rows blocks (blockDim.x a power of 2 up to 32): the states of the threads that share a
// threadIdx.x (the same VEC channels) merged over threadIdx.y. Shuffles merge each warp's rows;
// warp w's lane tx leaves its states at states[w * width + tx * VEC + k] (width = blockDim.x *
// VEC; `states`: kThreads * VEC); column_total then merges one column j = tx * VEC + k over the
// warps, in order.
template <int VEC, typename State>
__device__ __forceinline__ void column_merge(State (&s)[VEC], State* states) {
  const int bx = blockDim.x, t = threadIdx.y * bx + threadIdx.x, lane = t % kWarp, warp = t / kWarp;
#pragma unroll
  for (int k = 0; k < VEC; ++k)
    for (int off = kWarp / 2; off >= bx; off >>= 1) s[k] = merge(s[k], shfl_down(s[k], off));
  if (lane < bx) {  // lane == threadIdx.x: the warp's first row of threads
#pragma unroll
    for (int k = 0; k < VEC; ++k) states[(warp * bx + lane) * VEC + k] = s[k];
  }
  __syncthreads();
}

template <typename State>
__device__ __forceinline__ State column_total(const State* states, int j, int width) {
  State s = states[j];
  for (int w = 1; w < kThreads / kWarp; ++w) s = merge(s, states[w * width + j]);
  return s;
}

// ---- walks over a channel's values ------------------------------------------------------------

// Calls f(indices) for the positions p = p0, p0 + pstep, ... below end, position p at index
// base + p * scale: arrays of B indices while B fit, then of one.
template <int B, typename F>
__device__ __forceinline__ void progression_walk(int64_t p, int64_t end, int64_t pstep, int64_t base,
                                                 int64_t scale, F&& f) {
  for (; p + (B - 1) * pstep < end; p += B * pstep) {
    int64_t i[B];
#pragma unroll
    for (int b = 0; b < B; ++b) i[b] = base + (p + b * pstep) * scale;
    f(i);
  }
  for (; p < end; p += pstep) {
    const int64_t i[1] = {base + p * scale};
    f(i);
  }
}

// Planar (N, C, S), VEC values per index: the vectors of channel c that this thread owns, planes
// n = n0, n0 + nstep, ... and in each plane the vectors threadIdx.x, threadIdx.x + blockDim.x,
// ... A short plane (S / VEC <= blockDim.x) is one vector per thread, so the batches run along
// the planes; a long one's along the plane.
template <int VEC, int B, typename F>
__device__ __forceinline__ void planar_walk(int64_t N, int64_t C, int64_t S, int64_t c, int64_t n0,
                                            int64_t nstep, F&& f) {
  const int64_t Sv = S / VEC, tx = threadIdx.x, bx = blockDim.x;
  if (Sv <= bx) {
    if (tx < Sv) progression_walk<B>(n0, N, nstep, c * S + tx * VEC, C * S, f);
  } else {
    for (int64_t n = n0; n < N; n += nstep) progression_walk<B>(tx, Sv, bx, (n * C + c) * S, VEC, f);
  }
}

// Rows (M, C): calls f(indices of row r's first owned channel c0) for rows r0, r0 + rstep, ...
template <int B, typename F>
__device__ __forceinline__ void rows_walk(int64_t M, int64_t C, int64_t c0, int64_t r0, int64_t rstep, F&& f) {
  progression_walk<B>(r0, M, rstep, c0, C, f);
}

// ---- reduction kernels: one partial per (split, channel) ------------------------------------

// Planar: block (c, split) of (bx, by) threads: thread (tx, ty) walks planes
// split * by + ty, + splits * by, ... (planar_walk), so a short plane still busies every thread.
template <int VEC, typename Op>
__global__ void __launch_bounds__(kThreads) planar_reduce_kernel(Op op, int64_t N, int64_t C, int64_t S,
                                                                  typename Op::State* __restrict__ partial) {
  using State = typename Op::State;
  __shared__ State warp_states[kThreads / kWarp];
  const int64_t c = blockIdx.x;
  const auto k = op.channel(c);
  State s = op.init();
  planar_walk<VEC, Op::kBatch>(N, C, S, c, int64_t(blockIdx.y) * blockDim.y + threadIdx.y,
                               int64_t(gridDim.y) * blockDim.y, [&](const auto& i) { op.template add<VEC>(s, i, k); });
  s = block_merge(s, warp_states);
  if (threadIdx.x == 0 && threadIdx.y == 0) partial[int64_t(blockIdx.y) * C + c] = s;
}

// Rows (M, C), channels innermost: thread (tx, ty) of block (bx, split) owns the VEC channels
// from (bx * blockDim.x + tx) * VEC (C % VEC == 0) and walks rows ty + blockDim.y * split, ...:
// a warp reads blockDim.x * VEC consecutive channels of 32 / blockDim.x rows.
template <int VEC, typename Op>
__global__ void __launch_bounds__(kThreads) rows_reduce_kernel(Op op, int64_t M, int64_t C,
                                                                typename Op::State* __restrict__ partial) {
  using State = typename Op::State;
  using acc_t = typename Op::acc_type;
  __shared__ State states[kThreads * VEC];
  const int width = blockDim.x * VEC;
  const int64_t cb = int64_t(blockIdx.x) * width, c0 = cb + int64_t(threadIdx.x) * VEC;
  State s[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[j] = op.init();
  if (c0 < C) {
    acc_t k[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) k[j] = op.channel(c0 + j);
    rows_walk<Op::kBatch>(M, C, c0, int64_t(blockIdx.y) * blockDim.y + threadIdx.y, int64_t(gridDim.y) * blockDim.y,
                          [&](const auto& i) { op.template add_row<VEC>(s, i, k); });
  }
  column_merge<VEC>(s, states);
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  if (t < width && cb + t < C) partial[int64_t(blockIdx.y) * C + cb + t] = column_total(states, t, width);
}

// ---- finalize: merge the partials of each channel in a fixed order -------------------------
// TPC threads per channel (a warp, or a whole block when there are many partials): thread l
// merges partials l, l + TPC, ... in order, then the threads are merged by the same tree every
// time (deterministic, and TPC loads in flight instead of one).

template <int TPC, typename State>
__device__ __forceinline__ State merge_partials(const State* __restrict__ partial, int splits, int64_t C,
                                                int64_t c, State* shared) {
  State s{};
  for (int k = threadIdx.x % TPC; k < splits; k += TPC) s = merge(s, partial[int64_t(k) * C + c]);
  if constexpr (TPC == kWarp) return warp_merge(s);
  else return block_merge(s, shared);
}

// Where the statistics go: the saved mean and inverse std, and the running stats (or none).
template <typename acc_t, typename running_t>
struct StatsOutputs {
  acc_t eps, momentum;
  acc_t* __restrict__ save_mean;
  acc_t* __restrict__ save_invstd;
  running_t* __restrict__ running_mean;  // nullptr: not tracked
  running_t* __restrict__ running_var;
  // Channel c's mean and inverse std from its merged state (of values shifted by `pivot`).
  __device__ void finish(const Welford<acc_t>& w, acc_t pivot, int64_t c, acc_t& mean, acc_t& invstd) const {
    mean = pivot + w.mean;
    invstd = acc_t(1) / sqrt(w.m2 / acc_t(w.n) + eps);
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    if (running_mean != nullptr) {
      const acc_t unbiased = w.n > 1 ? w.m2 / acc_t(w.n - 1) : acc_t(NAN);
      running_mean[c] = static_cast<running_t>((acc_t(1) - momentum) * static_cast<acc_t>(running_mean[c]) +
                                               momentum * mean);
      running_var[c] = static_cast<running_t>((acc_t(1) - momentum) * static_cast<acc_t>(running_var[c]) +
                                              momentum * unbiased);
    }
  }
};

template <int TPC, typename scalar_t, typename acc_t, typename running_t>
__global__ void __launch_bounds__(kThreads) finalize_stats_kernel(const Welford<acc_t>* __restrict__ partial,
                                                                   int splits, int64_t C, StatsOp<scalar_t, acc_t> op,
                                                                   StatsOutputs<acc_t, running_t> out) {
  __shared__ Welford<acc_t> shared[kThreads / kWarp];
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / TPC;  // the same in a group
  if (c >= C) return;
  const Welford<acc_t> w = merge_partials<TPC>(partial, splits, C, c, shared);
  if (threadIdx.x % TPC != 0) return;
  acc_t mean, invstd;
  out.finish(w, op.channel(c), c, mean, invstd);
}

// The two sums, and from them grad_weight = sum(dy * (x - mean)) * invstd and grad_bias = sum(dy)
// in the parameters' dtype (one launch instead of four small ops).
template <int TPC, typename acc_t, typename param_t>
__global__ void __launch_bounds__(kThreads) finalize_sums_kernel(
    const GradSums<acc_t>* __restrict__ partial, int splits, int64_t C, const acc_t* __restrict__ invstd,
    acc_t* __restrict__ sum_dy, acc_t* __restrict__ sum_dy_xmu, param_t* __restrict__ grad_weight,
    param_t* __restrict__ grad_bias) {
  __shared__ GradSums<acc_t> shared[kThreads / kWarp];
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / TPC;
  if (c >= C) return;
  const GradSums<acc_t> s = merge_partials<TPC>(partial, splits, C, c, shared);
  if (threadIdx.x % TPC != 0) return;
  sum_dy[c] = s.sdy;
  sum_dy_xmu[c] = s.sdyxmu;
  grad_weight[c] = static_cast<param_t>(s.sdyxmu * invstd[c]);
  grad_bias[c] = static_cast<param_t>(s.sdy);
}

// A warp per channel while each lane merges at most 2 partials; a block per channel beyond.
template <typename F>
void launch_finalize(int splits, int64_t C, F&& launch) {
  if (splits <= 2 * kWarp)
    launch(std::integral_constant<int, kWarp>(), dim3(unsigned(ceil_div(C * kWarp, kThreads))));
  else
    launch(std::integral_constant<int, kThreads>(), dim3(unsigned(C)));
}

// Eval: the saved statistics from the running ones (fresh tensors: they must not alias them).
template <typename acc_t, typename running_t>
__global__ void eval_stats_kernel(const running_t* __restrict__ running_mean,
                                  const running_t* __restrict__ running_var, int64_t C, acc_t eps,
                                  acc_t* __restrict__ save_mean, acc_t* __restrict__ save_invstd) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  save_mean[c] = static_cast<acc_t>(running_mean[c]);
  save_invstd[c] = acc_t(1) / sqrt(static_cast<acc_t>(running_var[c]) + eps);
}

// ---- fused kernels: whole channels per block, reduction and elementwise pass in one launch ----
// Where a block's channels are small (kFusedValues at most), the block reduces them, finishes
// the per-channel constants itself and runs the elementwise pass over the same values (read
// again, from L2): one launch instead of three, no partials in memory. F (FusedForward,
// FusedBackward) supplies the reduction `op`, `finish` (state -> per-channel constants, written
// out) and `apply` (the elementwise pass on one vector).

// A block's values: 32 per thread. Measured on an H200 (benchmarks/fused_threshold.py, graph
// replays): fusing was 1.2-1.6x faster at 2048-8192 values per channel, 0.93x at 15972.
constexpr int64_t kFusedValues = 32 * kThreads;

// The limit in use: FASTBN_CUDA_FUSED_VALUES overrides it (0: never fuse), read once, for
// measuring where fusing pays (benchmarks/fused_threshold.py).
int64_t fused_values_limit() {
  static const int64_t limit = [] {
    const char* env = std::getenv("FASTBN_CUDA_FUSED_VALUES");
    return env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : kFusedValues;
  }();
  return limit;
}

// y = (x - mean) * invstd * weight + bias, after the statistics.
template <typename scalar_t, typename acc_t, typename running_t>
struct FusedForward {
  using Op = StatsOp<scalar_t, acc_t>;
  static constexpr int kApplyBatch = kLoads;  // apply reads x
  struct Coef {
    acc_t mean, scale, shift;
  };
  Op op;
  StatsOutputs<acc_t, running_t> out;
  const acc_t* __restrict__ weight;  // nullptr: 1
  const acc_t* __restrict__ bias;    // nullptr: 0
  scalar_t* __restrict__ y;
  __device__ Coef finish(const Welford<acc_t>& w, int64_t c) const {
    acc_t mean, invstd;
    out.finish(w, op.channel(c), c, mean, invstd);
    return {mean, invstd * (weight ? weight[c] : acc_t(1)), bias ? bias[c] : acc_t(0)};
  }
  // Value k of each vector uses coef[k * step] (planar: step 0, rows: step 1).
  template <int VEC, int B>
  __device__ void apply(const int64_t (&i)[B], const Coef* coef, int step) const {
    Vec<scalar_t, VEC> in[B];
    load_vecs(op.x, i, in);
#pragma unroll
    for (int b = 0; b < B; ++b) {
      Vec<scalar_t, VEC> res;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const Coef& q = coef[k * step];
        res.v[k] = static_cast<scalar_t>((static_cast<acc_t>(in[b].v[k]) - q.mean) * q.scale + q.shift);
      }
      *reinterpret_cast<Vec<scalar_t, VEC>*>(y + i[b]) = res;
    }
  }
};

// All three training-mode gradients: the sums, grad_weight and grad_bias, then
// dx = weight * invstd * (dy - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu/M).
template <typename scalar_t, typename acc_t, typename param_t>
struct FusedBackward {
  using Op = GradSumsOp<scalar_t, acc_t>;
  static constexpr int kApplyBatch = kLoads / 2;  // apply reads dy and x
  struct Coef {
    acc_t mean, a, b, k;  // dx = (dy - b - (x - mean) * k) * a
  };
  Op op;
  const acc_t* __restrict__ invstd;
  const acc_t* __restrict__ weight;  // nullptr: 1
  acc_t inv_m;
  param_t* __restrict__ grad_weight;
  param_t* __restrict__ grad_bias;
  scalar_t* __restrict__ dx;
  __device__ Coef finish(const GradSums<acc_t>& s, int64_t c) const {
    const acc_t is = invstd[c];
    grad_weight[c] = static_cast<param_t>(s.sdyxmu * is);
    grad_bias[c] = static_cast<param_t>(s.sdy);
    return {op.mean[c], is * (weight ? weight[c] : acc_t(1)), s.sdy * inv_m, is * is * s.sdyxmu * inv_m};
  }
  template <int VEC, int B>
  __device__ void apply(const int64_t (&i)[B], const Coef* coef, int step) const {
    Vec<scalar_t, VEC> g[B], xin[B];
    load_vecs(op.dy, i, g);
    load_vecs(op.x, i, xin);
#pragma unroll
    for (int b = 0; b < B; ++b) {
      Vec<scalar_t, VEC> res;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const Coef& q = coef[k * step];
        const acc_t v = static_cast<acc_t>(g[b].v[k]) - q.b - (static_cast<acc_t>(xin[b].v[k]) - q.mean) * q.k;
        res.v[k] = static_cast<scalar_t>(v * q.a);
      }
      *reinterpret_cast<Vec<scalar_t, VEC>*>(dx + i[b]) = res;
    }
  }
};

// Planar: block c (one channel) of (bx, by) threads walks all N planes of its channel twice.
template <int VEC, typename F>
__global__ void __launch_bounds__(kThreads) fused_planar_kernel(F f, int64_t N, int64_t C, int64_t S) {
  using State = typename F::Op::State;
  using Coef = typename F::Coef;
  __shared__ State warp_states[kThreads / kWarp];
  __shared__ Coef coef;
  const int64_t c = blockIdx.x;
  const auto k = f.op.channel(c);
  State s = f.op.init();
  planar_walk<VEC, F::Op::kBatch>(N, C, S, c, threadIdx.y, blockDim.y,
                                  [&](const auto& i) { f.op.template add<VEC>(s, i, k); });
  s = block_merge(s, warp_states);
  if (threadIdx.x == 0 && threadIdx.y == 0) coef = f.finish(s, c);
  __syncthreads();
  const Coef q = coef;
  planar_walk<VEC, F::kApplyBatch>(N, C, S, c, threadIdx.y, blockDim.y,
                                   [&](const auto& i) { f.template apply<VEC>(i, &q, 0); });
}

// Rows: block b of (bx, by) threads owns channels b * bx * VEC ... and walks all M rows twice.
template <int VEC, typename F>
__global__ void __launch_bounds__(kThreads) fused_rows_kernel(F f, int64_t M, int64_t C) {
  using State = typename F::Op::State;
  using Coef = typename F::Coef;
  using acc_t = typename F::Op::acc_type;
  __shared__ State states[kThreads * VEC];
  __shared__ Coef coefs[kWarp * VEC];
  const int width = blockDim.x * VEC;
  const int64_t cb = int64_t(blockIdx.x) * width, c0 = cb + int64_t(threadIdx.x) * VEC;
  State s[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[j] = f.op.init();
  if (c0 < C) {
    acc_t k[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) k[j] = f.op.channel(c0 + j);
    rows_walk<F::Op::kBatch>(M, C, c0, threadIdx.y, blockDim.y,
                             [&](const auto& i) { f.op.template add_row<VEC>(s, i, k); });
  }
  column_merge<VEC>(s, states);
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  if (t < width && cb + t < C) coefs[t] = f.finish(column_total(states, t, width), cb + t);
  __syncthreads();
  if (c0 < C) {
    const Coef* mine = coefs + threadIdx.x * VEC;
    rows_walk<F::kApplyBatch>(M, C, c0, threadIdx.y, blockDim.y,
                              [&](const auto& i) { f.template apply<VEC>(i, mine, 1); });
  }
}

// ---- launch shapes ----------------------------------------------------------------------------

inline int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < cap && p < n) p *= 2;
  return p;
}

// Planar blocks: bx threads along a plane's S / VEC vectors, kThreads / bx planes side by side.
inline dim3 planar_block(int64_t S, int vec) {
  const int bx = pow2_at_least(S / vec, kThreads);
  return dim3(unsigned(bx), unsigned(kThreads / bx));
}

// How one call is walked: the vector width, and whether (and how) the fused kernel runs.
struct BatchNormPlan {
  int vec;         // values per load
  bool fused;      // one fused kernel (else reduce, finalize, elementwise)
  dim3 grid, block;  // the fused kernel's
};

// `ptrs`: every tensor the kernels read or write elementwise (16-byte vectors need them aligned).
template <typename scalar_t>
BatchNormPlan plan_batch_norm(const BatchNormLayout& L, std::initializer_list<const void*> ptrs) {
  BatchNormPlan p;
  p.vec = can_vectorize<scalar_t>(L.planar ? L.S : L.C, ptrs) ? kVec16<scalar_t> : 1;
  const int64_t M = L.per_channel(), limit = fused_values_limit();
  if (L.planar) {
    p.fused = M <= limit;
    p.block = planar_block(L.S, p.vec);
    p.grid = dim3(unsigned(L.C));
  } else {
    // bx * VEC channels per block, bx up to 8 (a warp reads 128 bytes of each of 4 rows). Not
    // narrower to fit the limit: with 2 or 4 the fused kernel was 0.54-0.94x the split ones.
    const int64_t groups = L.C / p.vec;
    const int bx = pow2_at_least(groups, 8);
    p.fused = M * bx * p.vec <= limit;
    p.block = dim3(unsigned(bx), unsigned(kThreads / bx));
    p.grid = dim3(unsigned(ceil_div(groups, bx)));
  }
  p.fused = p.fused && L.C <= 0x7fffffff;
  return p;
}

template <typename F>
void launch_fused(const F& f, const BatchNormLayout& L, const BatchNormPlan& p) {
  auto stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    if (L.planar)
      fused_planar_kernel<VEC><<<p.grid, p.block, 0, stream>>>(f, L.N, L.C, L.S);
    else
      fused_rows_kernel<VEC><<<p.grid, p.block, 0, stream>>>(f, L.N * L.S, L.C);
  };
  using scalar_t = typename F::Op::scalar_type;
  if (p.vec > 1) run(std::integral_constant<int, kVec16<scalar_t>>());
  else run(std::integral_constant<int, 1>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the split reduction of `op` over the layout; returns the partials and their count.
// The grid is at most one wave of resident blocks (cudaOccupancy): a second wave that is nearly
// empty would cost as much as the first.
template <int VEC, typename Op>
std::pair<Tensor, int> launch_reduce(const Op& op, const BatchNormLayout& L) {
  using State = typename Op::State;
  const int64_t C = L.C, M = L.per_channel();
  auto stream = at::cuda::getCurrentCUDAStream();
  int64_t splits, gx = C;  // grid: (gx, splits)
  dim3 block;
  if (L.planar) {
    block = planar_block(L.S, VEC);
    const int64_t wave = resident_blocks<planar_reduce_kernel<VEC, Op>>(kThreads);
    const int64_t by_work = std::max<int64_t>(1, M / (8 * kThreads));  // at least 8 values a thread
    splits = std::min({std::max<int64_t>(1, wave / C), ceil_div(L.N, block.y), by_work});
  } else {
    // a block is (bx channel groups of VEC) x (256 / bx rows); bx = 32 unless C is narrower
    block = dim3(unsigned(pow2_at_least(C / VEC, kWarp)));
    block.y = kThreads / block.x;
    const int64_t wave = resident_blocks<rows_reduce_kernel<VEC, Op>>(kThreads);
    const int64_t cblocks = ceil_div(C / VEC, block.x);
    const int64_t by_work = std::max<int64_t>(1, M / (int64_t(block.y) * 4));  // at least 4 rows a thread
    splits = std::min(std::max<int64_t>(1, wave / cblocks), by_work);
    gx = cblocks;
  }
  splits = std::clamp<int64_t>(splits, 1, 65535);
  TORCH_CHECK(gx <= 0x7fffffff, kOp, ": too many channels (", C, ") for the CUDA grid");
  const dim3 grid{unsigned(gx), unsigned(splits)};
  Tensor partial = at::empty({splits * C * int64_t(sizeof(State))}, L.x.options().dtype(at::kByte));
  State* p = reinterpret_cast<State*>(partial.data_ptr());
  if (L.planar)
    planar_reduce_kernel<VEC><<<grid, block, 0, stream>>>(op, L.N, C, L.S, p);
  else
    rows_reduce_kernel<VEC><<<grid, block, 0, stream>>>(op, M, C, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial, int(splits)};
}

template <typename Op>
std::pair<Tensor, int> reduce_partials(const Op& op, const BatchNormLayout& L, int vec) {
  using scalar_t = typename Op::scalar_type;
  if (vec > 1) return launch_reduce<kVec16<scalar_t>>(op, L);
  return launch_reduce<1>(op, L);
}

// ---- elementwise passes ---------------------------------------------------------------------

// How an elementwise pass finds the channel of the k-th value of vector i (S: values per plane).
// Rows: the vector covers channels c0 .. c0+VEC-1 (C % VEC == 0). Planes: a vector never
// straddles two planes (S % VEC == 0). Flat: planes of any length (7x7, 181x181) still read as
// 16-byte vectors, each value finding its own channel.
enum Walk : int { kRowsWalk, kPlanesWalk, kFlatWalk };

template <typename index_t, int VEC, int WALK>
__device__ __forceinline__ index_t channel_of(index_t i, int k, index_t C, index_t S) {
  if (WALK == kRowsWalk) return (i * VEC) % C + k;
  if (WALK == kPlanesWalk) return (i * VEC / S) % C;
  return ((i * VEC + k) / S) % C;
}

template <typename scalar_t, typename acc_t, typename index_t, int VEC, int WALK>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, index_t nvec,
                                 index_t C, index_t S, const acc_t* __restrict__ mean,
                                 const acc_t* __restrict__ invstd, const acc_t* __restrict__ weight,
                                 const acc_t* __restrict__ bias) {
  using V = Vec<scalar_t, VEC>;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += index_t(gridDim.x) * blockDim.x) {
    const V in = reinterpret_cast<const V*>(x)[i];
    V out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const index_t c = channel_of<index_t, VEC, WALK>(i, k, C, S);
      const acc_t scale = invstd[c] * (weight ? weight[c] : acc_t(1));
      out.v[k] = static_cast<scalar_t>((static_cast<acc_t>(in.v[k]) - mean[c]) * scale +
                                       (bias ? bias[c] : acc_t(0)));
    }
    reinterpret_cast<V*>(y)[i] = out;
  }
}

// dx = weight * invstd * (dy - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu/M)   (TRAIN)
// dx = weight * invstd * dy                                                        (eval)
template <typename scalar_t, typename acc_t, typename index_t, int VEC, int WALK, bool TRAIN>
__global__ void grad_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ dx, index_t nvec, index_t C, index_t S,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                  const acc_t* __restrict__ weight, const acc_t* __restrict__ sum_dy,
                                  const acc_t* __restrict__ sum_dy_xmu, acc_t inv_m) {
  using V = Vec<scalar_t, VEC>;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += index_t(gridDim.x) * blockDim.x) {
    const V g = reinterpret_cast<const V*>(dy)[i];
    V xin;
    if (TRAIN) xin = reinterpret_cast<const V*>(x)[i];
    V out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const index_t c = channel_of<index_t, VEC, WALK>(i, k, C, S);
      const acc_t is = invstd[c], a = is * (weight ? weight[c] : acc_t(1));
      acc_t v = static_cast<acc_t>(g.v[k]);
      if (TRAIN)
        v = v - sum_dy[c] * inv_m - (static_cast<acc_t>(xin.v[k]) - mean[c]) * is * is * sum_dy_xmu[c] * inv_m;
      out.v[k] = static_cast<scalar_t>(v * a);
    }
    reinterpret_cast<V*>(dx)[i] = out;
  }
}

// Calls f(index_t tag, VEC, WALK) with the vector width, walk and index type this call can use.
template <typename scalar_t, typename F>
void elementwise_dispatch(const BatchNormLayout& L, std::initializer_list<const void*> ptrs, F&& f) {
  const bool small = L.x.numel() < (int64_t(1) << 30);  // margin: i + grid stride stays in int32
  auto with = [&](auto vec_tag, auto walk_tag) {
    if (small) f(int32_t(0), vec_tag, walk_tag);
    else f(int64_t(0), vec_tag, walk_tag);
  };
  using Vec16 = std::integral_constant<int, kVec16<scalar_t>>;
  using Scalar = std::integral_constant<int, 1>;
  using Rows = std::integral_constant<int, kRowsWalk>;
  using Planes = std::integral_constant<int, kPlanesWalk>;
  using Flat = std::integral_constant<int, kFlatWalk>;
  if (!L.planar) {
    if (can_vectorize<scalar_t>(L.C, ptrs)) with(Vec16(), Rows());
    else with(Scalar(), Rows());
  } else if (can_vectorize<scalar_t>(L.S, ptrs)) {
    with(Vec16(), Planes());
  } else if (can_vectorize<scalar_t>(L.x.numel(), ptrs)) {
    with(Vec16(), Flat());
  } else {
    with(Scalar(), Planes());
  }
}

// ---- ops ------------------------------------------------------------------------------------

// Per-channel tensors (running stats, parameter gradients) come in the input's dtype or its
// accumulation dtype, the checks allow no other: calls f with a value of that C++ type.
template <typename scalar_t, typename F>
void with_channel_type(bool accumulation_dtype, F&& f) {
  if (accumulation_dtype) f(at::opmath_type<scalar_t>(0));
  else f(scalar_t(0));
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_cuda(const Tensor& input, const OptTensor& weight,
                                                   const OptTensor& bias, const OptTensor& running_mean,
                                                   const OptTensor& running_var, bool training,
                                                   double momentum, double eps) {
  check_batch_norm_args(kOp, input, weight, bias, running_mean, running_var, training,
                        /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(input.device());
  const BatchNormLayout L = batch_norm_layout(input);
  const int64_t C = L.C, M = L.per_channel();
  const auto acc = acc_type(input.scalar_type());
  Tensor out = at::empty(L.x.sizes(), L.x.options().memory_format(L.format));
  const bool has_running = running_mean.has_value() && running_mean->defined();
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor w = channel_values_if_given(weight, input), b = channel_values_if_given(bias, input);

  Tensor save_mean, save_invstd;
  bool normalized = false;  // by the fused kernel
  if (training) {
    if (M == 0) {  // empty batch: running stats untouched
      save_mean = at::zeros({C}, input.options().dtype(acc));
      return {out, save_mean, at::zeros_like(save_mean)};
    }
    save_mean = at::empty({C}, input.options().dtype(acc));  // every channel is written below
    save_invstd = at::empty({C}, input.options().dtype(acc));
    // the kernels update dense running stats; others are updated through a dense copy
    Tensor rm, rv;
    if (has_running) {
      rm = running_mean->is_contiguous() ? *running_mean : running_mean->contiguous();
      rv = running_var->is_contiguous() ? *running_var : running_var->contiguous();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_stats_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = L.x.const_data_ptr<scalar_t>();
      scalar_t* y = out.data_ptr<scalar_t>();
      const StatsOp<scalar_t, acc_t> op{x, L.planar ? L.S : 1};
      const BatchNormPlan plan = plan_batch_norm<scalar_t>(L, {x, y});
      auto run = [&](auto running_tag) {
        using running_t = decltype(running_tag);
        const StatsOutputs<acc_t, running_t> stats{
            acc_t(eps), acc_t(momentum), save_mean.data_ptr<acc_t>(), save_invstd.data_ptr<acc_t>(),
            has_running ? rm.data_ptr<running_t>() : nullptr, has_running ? rv.data_ptr<running_t>() : nullptr};
        if (plan.fused) {
          launch_fused(FusedForward<scalar_t, acc_t, running_t>{op, stats, ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b), y},
                       L, plan);
          normalized = true;
          return;
        }
        const auto partials = reduce_partials(op, L, plan.vec);
        const int splits = partials.second;
        const auto* p = reinterpret_cast<const Welford<acc_t>*>(partials.first.const_data_ptr());
        launch_finalize(splits, C, [&](auto tpc_tag, dim3 grid) {
          finalize_stats_kernel<decltype(tpc_tag)::value><<<grid, kThreads, 0, stream>>>(p, splits, C, op, stats);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      with_channel_type<scalar_t>(!has_running || rm.scalar_type() == acc, run);
    });
    if (has_running && !running_mean->is_contiguous()) running_mean->copy_(rm);
    if (has_running && !running_var->is_contiguous()) running_var->copy_(rv);
  } else {
    // fresh tensors: a saved statistic must not alias the running buffer it came from
    save_mean = at::empty({C}, input.options().dtype(acc));
    save_invstd = at::empty({C}, input.options().dtype(acc));
    if (C > 0) {
      const Tensor rm = running_mean->contiguous(), rv = running_var->contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_eval_stats_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto launch = [&](auto running_tag) {
          using running_t = decltype(running_tag);
          eval_stats_kernel<acc_t, running_t><<<unsigned(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
              rm.const_data_ptr<running_t>(), rv.const_data_ptr<running_t>(), C, acc_t(eps),
              save_mean.data_ptr<acc_t>(), save_invstd.data_ptr<acc_t>());
        };
        with_channel_type<scalar_t>(rm.scalar_type() == acc, launch);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (M == 0) return {out, save_mean, save_invstd};
  }
  if (normalized) return {out, save_mean, save_invstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_normalize_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = L.x.const_data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    elementwise_dispatch<scalar_t>(L, {x, y}, [&](auto index_tag, auto vec_tag, auto walk_tag) {
      using index_t = decltype(index_tag);
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr int WALK = decltype(walk_tag)::value;
      const int64_t nvec = L.x.numel() / VEC;
      normalize_kernel<scalar_t, acc_t, index_t, VEC, WALK><<<grid_for(nvec, kThreads), kThreads, 0, stream>>>(
          x, y, index_t(nvec), index_t(C), index_t(L.S), save_mean.const_data_ptr<acc_t>(),
          save_invstd.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_reduce_cuda(const Tensor& grad_output,
                                                                           const Tensor& input, const Tensor& mean,
                                                                           const Tensor& invstd, const OptTensor& weight) {
  const char* op = "fastbn.batch_norm_backward_reduce";
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd, weight);
  const auto pdtype = param_grad_dtype(weight, mean);
  const c10::cuda::CUDAGuard guard(input.device());
  const BatchNormLayout L = batch_norm_layout(input);
  const Tensor dy = grad_output.contiguous(L.format);
  const int64_t C = L.C;
  if (L.per_channel() == 0) {  // empty batch: zero sums and gradients
    const Tensor zero = at::zeros({C}, mean.options());
    return {zero, zero.clone(), at::zeros({C}, mean.options().dtype(pdtype)),
            at::zeros({C}, mean.options().dtype(pdtype))};
  }
  Tensor sum_dy = at::empty({C}, mean.options()), sum_dy_xmu = at::empty({C}, mean.options());
  Tensor grad_weight = at::empty({C}, mean.options().dtype(pdtype)), grad_bias = at::empty_like(grad_weight);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor mu = mean.contiguous(), is = invstd.contiguous();
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    const scalar_t* x = L.x.const_data_ptr<scalar_t>();
    const BatchNormPlan plan = plan_batch_norm<scalar_t>(L, {g, x});
    const auto partials = reduce_partials(GradSumsOp<scalar_t, acc_t>{g, x, mu.const_data_ptr<acc_t>()}, L, plan.vec);
    const int splits = partials.second;
    const auto* p = reinterpret_cast<const GradSums<acc_t>*>(partials.first.const_data_ptr());
    auto finalize = [&](auto param_tag) {
      using param_t = decltype(param_tag);
      launch_finalize(splits, C, [&](auto tpc_tag, dim3 grid) {
        finalize_sums_kernel<decltype(tpc_tag)::value><<<grid, kThreads, 0, stream>>>(
            p, splits, C, is.const_data_ptr<acc_t>(), sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>(),
            grad_weight.data_ptr<param_t>(), grad_bias.data_ptr<param_t>());
      });
    };
    with_channel_type<scalar_t>(pdtype == acc_type(input.scalar_type()), finalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu, grad_weight, grad_bias};
}

Tensor batch_norm_backward_input_cuda(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                      const Tensor& invstd, const OptTensor& weight, const OptTensor& sum_dy,
                                      const OptTensor& sum_dy_xmu) {
  const char* op = "fastbn.batch_norm_backward_input";
  const bool training =
      check_batch_norm_backward_input_args(op, grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu);
  const c10::cuda::CUDAGuard guard(input.device());
  const BatchNormLayout L = batch_norm_layout(input);
  const Tensor dy = grad_output.contiguous(L.format);
  Tensor dx = at::empty(L.x.sizes(), L.x.options().memory_format(L.format));
  const int64_t C = L.C, M = L.per_channel();
  if (M == 0) return dx;
  const Tensor w = channel_values_if_given(weight, input);
  const Tensor mu = mean.contiguous(), is = invstd.contiguous();
  const Tensor s1 = training ? sum_dy->contiguous() : Tensor(), s2 = training ? sum_dy_xmu->contiguous() : Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    const scalar_t* x = L.x.const_data_ptr<scalar_t>();
    scalar_t* d = dx.data_ptr<scalar_t>();
    elementwise_dispatch<scalar_t>(L, {g, x, d}, [&](auto index_tag, auto vec_tag, auto walk_tag) {
      using index_t = decltype(index_tag);
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr int WALK = decltype(walk_tag)::value;
      const int64_t nvec = L.x.numel() / VEC;
      const dim3 grid(grid_for(nvec, kThreads));
      auto launch = [&](auto train_tag) {
        constexpr bool TRAIN = decltype(train_tag)::value;
        grad_input_kernel<scalar_t, acc_t, index_t, VEC, WALK, TRAIN><<<grid, kThreads, 0, stream>>>(
            g, x, d, index_t(nvec), index_t(C), index_t(L.S), mu.const_data_ptr<acc_t>(),
            is.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(w),
            TRAIN ? s1.const_data_ptr<acc_t>() : nullptr, TRAIN ? s2.const_data_ptr<acc_t>() : nullptr,
            acc_t(1) / acc_t(M));
      };
      if (training) launch(std::true_type());
      else launch(std::false_type());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dx;
}

// All three training-mode gradients: one fused kernel where the channels are small, else the
// two ops above, in order.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                                            const Tensor& mean, const Tensor& invstd,
                                                            const OptTensor& weight) {
  const char* op = "fastbn.batch_norm_backward";
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  const BatchNormLayout L = batch_norm_layout(input);
  const int64_t M = L.per_channel();
  const Tensor dy = grad_output.contiguous(L.format);
  std::optional<std::tuple<Tensor, Tensor, Tensor>> result;
  if (M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* g = dy.const_data_ptr<scalar_t>();
      const scalar_t* x = L.x.const_data_ptr<scalar_t>();
      const BatchNormPlan plan = plan_batch_norm<scalar_t>(L, {g, x});  // dx: fresh, so aligned
      if (!plan.fused) return;
      Tensor dx = at::empty(L.x.sizes(), L.x.options().memory_format(L.format));
      scalar_t* d = dx.data_ptr<scalar_t>();
      const auto pdtype = param_grad_dtype(weight, mean);
      const Tensor w = channel_values_if_given(weight, input);
      const Tensor mu = mean.contiguous(), is = invstd.contiguous();
      Tensor grad_weight = at::empty({L.C}, mean.options().dtype(pdtype)), grad_bias = at::empty_like(grad_weight);
      with_channel_type<scalar_t>(pdtype == acc_type(input.scalar_type()), [&](auto param_tag) {
        using param_t = decltype(param_tag);
        launch_fused(FusedBackward<scalar_t, acc_t, param_t>{
                         {g, x, mu.const_data_ptr<acc_t>()}, is.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(w),
                         acc_t(1) / acc_t(M), grad_weight.data_ptr<param_t>(), grad_bias.data_ptr<param_t>(), d},
                     L, plan);
      });
      result.emplace(dx, grad_weight, grad_bias);
    });
  }
  if (result) return *result;
  // the split ops, given the operands already in the layout (no second copy of either)
  auto sums = batch_norm_backward_reduce_cuda(dy, L.x, mean, invstd, weight);
  Tensor dx = batch_norm_backward_input_cuda(dy, L.x, mean, invstd, weight, std::get<0>(sums), std::get<1>(sums));
  return {dx, std::get<2>(sums), std::get<3>(sums)};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastbn, CUDA, m) {
  m.impl("batch_norm", &cuda::batch_norm_cuda);
  m.impl("batch_norm_backward_reduce", &cuda::batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_input", &cuda::batch_norm_backward_input_cuda);
  m.impl("batch_norm_backward", &cuda::batch_norm_backward_cuda);
}

}  // namespace fastbn
