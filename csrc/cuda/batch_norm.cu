// BatchNorm on CUDA. The same maths as the CPU loops (cpu/kernels_impl.inc) and the Python
// reference (fastbn/reference/):
//   forward:  per-channel Welford (mean, m2) -> y = (x - mean) * invstd * weight + bias
//   backward: per-channel sum(dy), sum(dy * (x - mean)) -> dx (see batch_norm_backward_input)
//
// Reductions run in two steps so that large N*H*W fills the GPU: a grid of (channel, split)
// blocks each merges its values with warp shuffles and shared memory into one partial, then a
// finalize kernel (a warp per channel) merges the partials in a fixed order (deterministic).
// Statistics run on values shifted by the channel's first value (accuracy for large means);
// reductions and elementwise passes read 16-byte vectors where the layout allows. The
// elementwise passes are grid-stride loops over 16-byte vectors. Everything runs on the current
// stream; partial offsets are 64-bit, elementwise indices 32-bit only where the size allows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const acc_t delta = b.mean - a.mean, frac = acc_t(b.n) / acc_t(n);
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

// What is accumulated, VEC values at a time (one 16-byte load, or VEC = 1), by index into the
// dense tensors. `channel(c)` is loaded once per channel by each thread and handed to `add`.
template <typename scalar_t, typename acc_t>
struct StatsOp {
  using State = Welford<acc_t>;
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  const scalar_t* __restrict__ x;
  int64_t pivot_stride;  // channel c's first value is x[c * pivot_stride]
  __device__ State init() const { return {acc_t(0), acc_t(0), 0}; }
  // Welford runs on x - (the channel's first value): the shifted mean is small, so float32 keeps
  // its low bits when a channel's mean is large against its spread (x = 1e4 + randn).
  __device__ acc_t channel(int64_t c) const { return static_cast<acc_t>(x[c * pivot_stride]); }
  template <int VEC>
  __device__ void add(State& s, int64_t i, acc_t pivot) const {
    const Vec<scalar_t, VEC> in = *reinterpret_cast<const Vec<scalar_t, VEC>*>(x + i);
    acc_t v[VEC], sum = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += (v[k] = static_cast<acc_t>(in.v[k]) - pivot);
    const acc_t m = sum / acc_t(VEC);
    acc_t m2 = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) m2 += (v[k] - m) * (v[k] - m);
    s = merge(s, State{m, m2, VEC});  // Chan's merge of the VEC values into the running state
  }
  // Rows layout: the VEC values are VEC consecutive channels, each with its own state.
  template <int VEC>
  __device__ void add_row(State (&s)[VEC], int64_t i, const acc_t (&pivot)[VEC]) const {
    const Vec<scalar_t, VEC> in = *reinterpret_cast<const Vec<scalar_t, VEC>*>(x + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {  // Welford's update
      const acc_t v = static_cast<acc_t>(in.v[k]) - pivot[k];
      s[k].n += 1;
      const acc_t d = v - s[k].mean;
      s[k].mean += d / acc_t(s[k].n);
      s[k].m2 += d * (v - s[k].mean);
    }
  }
};

template <typename scalar_t, typename acc_t>
struct GradSumsOp {
  using State = GradSums<acc_t>;
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ mean;
  __device__ State init() const { return {acc_t(0), acc_t(0)}; }
  __device__ acc_t channel(int64_t c) const { return mean[c]; }
  template <int VEC>
  __device__ void add(State& s, int64_t i, acc_t mu) const {
    const Vec<scalar_t, VEC> g = *reinterpret_cast<const Vec<scalar_t, VEC>*>(dy + i);
    const Vec<scalar_t, VEC> xin = *reinterpret_cast<const Vec<scalar_t, VEC>*>(x + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t gv = static_cast<acc_t>(g.v[k]);
      s.sdy += gv;
      s.sdyxmu += gv * (static_cast<acc_t>(xin.v[k]) - mu);
    }
  }
  template <int VEC>
  __device__ void add_row(State (&s)[VEC], int64_t i, const acc_t (&mu)[VEC]) const {
    const Vec<scalar_t, VEC> g = *reinterpret_cast<const Vec<scalar_t, VEC>*>(dy + i);
    const Vec<scalar_t, VEC> xin = *reinterpret_cast<const Vec<scalar_t, VEC>*>(x + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t gv = static_cast<acc_t>(g.v[k]);
      s[k].sdy += gv;
      s[k].sdyxmu += gv * (static_cast<acc_t>(xin.v[k]) - mu[k]);
    }
  }
};

template <typename State>
__device__ __forceinline__ State warp_merge(State s) {
  for (int off = kWarp / 2; off > 0; off >>= 1) s = merge(s, shfl_down(s, off));
  return s;
}

// ---- reduction kernels: one partial per (split, channel) ------------------------------------

// Planar (N, C, S): block (c, split) walks n = split, split + splits, ... and s by thread, VEC
// values per load (S % VEC == 0 and 16-byte aligned data when VEC > 1).
template <int VEC, typename Op>
__global__ void planar_reduce_kernel(Op op, int64_t N, int64_t C, int64_t S,
                                     typename Op::State* __restrict__ partial) {
  using State = typename Op::State;
  __shared__ State warp_states[kThreads / kWarp];
  const int64_t c = blockIdx.x;
  const auto k = op.channel(c);
  State s = op.init();
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t base = (n * C + c) * S;
#pragma unroll 4
    for (int64_t j = int64_t(threadIdx.x) * VEC; j < S; j += int64_t(blockDim.x) * VEC)
      op.template add<VEC>(s, base + j, k);
  }
  s = warp_merge(s);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < int(blockDim.x / kWarp) ? warp_states[lane] : op.init();
    s = warp_merge(s);
    if (lane == 0) partial[blockIdx.y * C + c] = s;
  }
}

// Rows (M, C), channels innermost: thread (tx, ty) of block (bx, split) owns the VEC channels
// from (bx * blockDim.x + tx) * VEC (C % VEC == 0) and walks rows ty + blockDim.y * split, ...:
// a warp reads blockDim.x * VEC consecutive channels of blockDim.x < 32 ? several : one row.
template <int VEC, typename Op>
__global__ void rows_reduce_kernel(Op op, int64_t M, int64_t C,
                                   typename Op::State* __restrict__ partial) {
  using State = typename Op::State;
  using acc_t = typename Op::acc_type;
  __shared__ State states[kThreads * VEC];
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  State s[VEC];
  acc_t k[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[j] = op.init();
  if (c0 < C) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) k[j] = op.channel(c0 + j);
    const int64_t step = int64_t(gridDim.y) * blockDim.y;
#pragma unroll 4
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += step)
      op.template add_row<VEC>(s, r * C + c0, k);
  }
  State* mine = states + (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) mine[j] = s[j];
  __syncthreads();
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      for (unsigned y = 1; y < blockDim.y; ++y) s[j] = merge(s[j], states[(y * blockDim.x + threadIdx.x) * VEC + j]);
      partial[blockIdx.y * C + c0 + j] = s[j];
    }
  }
}

// ---- finalize: merge the partials of each channel in a fixed order -------------------------
// One warp per channel: lane l merges partials l, l + 32, ... in order, then the lanes are merged
// by the same shuffle tree every time (deterministic, and 32 loads in flight instead of one).

constexpr int kChannelsPerBlock = kThreads / kWarp;

template <typename State>
__device__ __forceinline__ State merge_partials(const State* __restrict__ partial, int splits, int64_t C,
                                                int64_t c, int lane, State s) {
  for (int k = lane; k < splits; k += kWarp) s = merge(s, partial[int64_t(k) * C + c]);
  return warp_merge(s);
}

template <typename scalar_t, typename acc_t, typename running_t>
__global__ void finalize_stats_kernel(const Welford<acc_t>* __restrict__ partial, int splits, int64_t C,
                                      StatsOp<scalar_t, acc_t> op, acc_t eps, acc_t momentum,
                                      acc_t* __restrict__ save_mean, acc_t* __restrict__ save_invstd,
                                      running_t* __restrict__ running_mean, running_t* __restrict__ running_var) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;  // the same in a warp
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;
  const Welford<acc_t> w = merge_partials(partial, splits, C, c, lane, Welford<acc_t>{acc_t(0), acc_t(0), 0});
  if (lane != 0) return;
  const acc_t mean = op.channel(c) + w.mean, var = w.m2 / acc_t(w.n);
  save_mean[c] = mean;
  save_invstd[c] = acc_t(1) / sqrt(var + eps);
  if (running_mean != nullptr) {
    const acc_t unbiased = w.n > 1 ? w.m2 / acc_t(w.n - 1) : acc_t(NAN);
    running_mean[c] = static_cast<running_t>((acc_t(1) - momentum) * static_cast<acc_t>(running_mean[c]) +
                                             momentum * mean);
    running_var[c] = static_cast<running_t>((acc_t(1) - momentum) * static_cast<acc_t>(running_var[c]) +
                                            momentum * unbiased);
  }
}

// The two sums, and from them grad_weight = sum(dy * (x - mean)) * invstd and grad_bias = sum(dy)
// in the parameters' dtype (one launch instead of four small ops).
template <typename acc_t, typename param_t>
__global__ void finalize_sums_kernel(const GradSums<acc_t>* __restrict__ partial, int splits, int64_t C,
                                     const acc_t* __restrict__ invstd, acc_t* __restrict__ sum_dy,
                                     acc_t* __restrict__ sum_dy_xmu, param_t* __restrict__ grad_weight,
                                     param_t* __restrict__ grad_bias) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;
  const GradSums<acc_t> s = merge_partials(partial, splits, C, c, lane, GradSums<acc_t>{acc_t(0), acc_t(0)});
  if (lane != 0) return;
  sum_dy[c] = s.sdy;
  sum_dy_xmu[c] = s.sdyxmu;
  grad_weight[c] = static_cast<param_t>(s.sdyxmu * invstd[c]);
  grad_bias[c] = static_cast<param_t>(s.sdy);
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

// Launches the reduction of `op` over the layout; returns the partials and their count.
// `data`: the tensors' pointers, for the 16-byte vector test of the planar layout.
template <typename Op>
std::pair<Tensor, int> reduce_partials(const Op& op, const BatchNormLayout& L,
                                       std::initializer_list<const void*> data) {
  using State = typename Op::State;
  using scalar_t = typename Op::scalar_type;
  // 8 blocks of 256 threads per SM: enough 16-byte loads in flight to cover memory latency
  const int64_t C = L.C, target_blocks = int64_t(num_sms()) * 8;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int rows_vec = !L.planar && can_vectorize<scalar_t>(C, data) ? kVec16<scalar_t> : 1;
  int splits;
  dim3 grid, block;
  if (L.planar) {
    const int64_t by_work = std::max<int64_t>(1, L.N * L.S / 2048);
    splits = int(std::clamp<int64_t>(std::min({ceil_div(target_blocks, C), L.N, by_work}), 1, 65535));
    grid = dim3(unsigned(C), unsigned(splits));
    block = dim3(kThreads);
  } else {
    // a block is (x channel groups of VEC) x (256 / x rows); x = 32 unless C is narrower
    const int vec = rows_vec;
    const int64_t groups = C / vec;
    int bx = 1;
    while (bx < 32 && bx < groups) bx *= 2;
    const int by = kThreads / bx;
    const int64_t M = L.N * L.S, cblocks = ceil_div(groups, bx);
    const int64_t by_work = std::max<int64_t>(1, M / (by * 16));
    splits = int(std::clamp<int64_t>(std::min(ceil_div(target_blocks, cblocks), by_work), 1, 65535));
    grid = dim3(unsigned(cblocks), unsigned(splits));
    block = dim3(unsigned(bx), unsigned(by));
  }
  TORCH_CHECK(C <= 0x7fffffff, kOp, ": too many channels (", C, ") for the CUDA grid");
  Tensor partial = at::empty({int64_t(splits) * C * int64_t(sizeof(State))},
                             L.x.options().dtype(at::kByte));
  State* p = reinterpret_cast<State*>(partial.data_ptr());
  if (L.planar && can_vectorize<scalar_t>(L.S, data))
    planar_reduce_kernel<kVec16<scalar_t>><<<grid, block, 0, stream>>>(op, L.N, C, L.S, p);
  else if (L.planar)
    planar_reduce_kernel<1><<<grid, block, 0, stream>>>(op, L.N, C, L.S, p);
  else if (rows_vec > 1)
    rows_reduce_kernel<kVec16<scalar_t>><<<grid, block, 0, stream>>>(op, L.N * L.S, C, p);
  else
    rows_reduce_kernel<1><<<grid, block, 0, stream>>>(op, L.N * L.S, C, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial, splits};
}

// ---- elementwise passes ---------------------------------------------------------------------

// Channel of the k-th value of vector i. Planar: a vector never straddles two planes (S % VEC
// == 0). Rows: the vector covers channels c0 .. c0+VEC-1 (C % VEC == 0).
template <typename index_t, int VEC, bool ROWS>
__device__ __forceinline__ index_t channel_of(index_t i, int k, index_t C, index_t Sv) {
  if (ROWS) return (i * VEC) % C + k;
  return (i / Sv) % C;
}

template <typename scalar_t, typename acc_t, typename index_t, int VEC, bool ROWS>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, index_t nvec,
                                 index_t C, index_t Sv, const acc_t* __restrict__ mean,
                                 const acc_t* __restrict__ invstd, const acc_t* __restrict__ weight,
                                 const acc_t* __restrict__ bias) {
  using V = Vec<scalar_t, VEC>;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += index_t(gridDim.x) * blockDim.x) {
    const V in = reinterpret_cast<const V*>(x)[i];
    V out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const index_t c = channel_of<index_t, VEC, ROWS>(i, k, C, Sv);
      const acc_t scale = invstd[c] * (weight ? weight[c] : acc_t(1));
      out.v[k] = static_cast<scalar_t>((static_cast<acc_t>(in.v[k]) - mean[c]) * scale +
                                       (bias ? bias[c] : acc_t(0)));
    }
    reinterpret_cast<V*>(y)[i] = out;
  }
}

// dx = weight * invstd * (dy - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu/M)   (TRAIN)
// dx = weight * invstd * dy                                                        (eval)
template <typename scalar_t, typename acc_t, typename index_t, int VEC, bool ROWS, bool TRAIN>
__global__ void grad_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ dx, index_t nvec, index_t C, index_t Sv,
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
      const index_t c = channel_of<index_t, VEC, ROWS>(i, k, C, Sv);
      const acc_t is = invstd[c], a = is * (weight ? weight[c] : acc_t(1));
      acc_t v = static_cast<acc_t>(g.v[k]);
      if (TRAIN)
        v = v - sum_dy[c] * inv_m - (static_cast<acc_t>(xin.v[k]) - mean[c]) * is * is * sum_dy_xmu[c] * inv_m;
      out.v[k] = static_cast<scalar_t>(v * a);
    }
    reinterpret_cast<V*>(dx)[i] = out;
  }
}

// Calls f(index_t tag, VEC, ROWS) with the vector width and index type this call can use.
template <typename scalar_t, typename F>
void elementwise_dispatch(const BatchNormLayout& L, std::initializer_list<const void*> ptrs, F&& f) {
  const bool vectorize = can_vectorize<scalar_t>(L.planar ? L.S : L.C, ptrs);
  const bool small = L.x.numel() < (int64_t(1) << 30);  // margin: i + grid stride stays in int32
  auto with_vec = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    if (L.planar) {
      if (small) f(int32_t(0), std::integral_constant<int, VEC>(), std::false_type());
      else f(int64_t(0), std::integral_constant<int, VEC>(), std::false_type());
    } else {
      if (small) f(int32_t(0), std::integral_constant<int, VEC>(), std::true_type());
      else f(int64_t(0), std::integral_constant<int, VEC>(), std::true_type());
    }
  };
  if (vectorize) with_vec(std::integral_constant<int, kVec16<scalar_t>>());
  else with_vec(std::integral_constant<int, 1>());
}

// ---- ops ------------------------------------------------------------------------------------

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

  Tensor save_mean, save_invstd;
  if (training) {
    if (M == 0) {  // empty batch: running stats untouched
      save_mean = at::zeros({C}, input.options().dtype(acc));
      return {out, save_mean, at::zeros_like(save_mean)};
    }
    save_mean = at::empty({C}, input.options().dtype(acc));  // every channel is written below
    save_invstd = at::empty({C}, input.options().dtype(acc));
    // the kernel updates dense running stats; others are updated through a dense copy
    Tensor rm, rv;
    if (has_running) {
      rm = running_mean->is_contiguous() ? *running_mean : running_mean->contiguous();
      rv = running_var->is_contiguous() ? *running_var : running_var->contiguous();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_stats_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = L.x.const_data_ptr<scalar_t>();
      const StatsOp<scalar_t, acc_t> op{x, L.planar ? L.S : 1};
      const auto res = reduce_partials(op, L, {x});
      const int splits = res.second;
      const auto* p = reinterpret_cast<const Welford<acc_t>*>(res.first.const_data_ptr());
      const unsigned blocks = unsigned(ceil_div(C, kChannelsPerBlock));
      auto finalize = [&](auto running_tag) {
        using running_t = decltype(running_tag);
        finalize_stats_kernel<scalar_t, acc_t, running_t><<<blocks, kThreads, 0, stream>>>(
            p, splits, C, op, acc_t(eps), acc_t(momentum), save_mean.data_ptr<acc_t>(),
            save_invstd.data_ptr<acc_t>(), has_running ? rm.data_ptr<running_t>() : nullptr,
            has_running ? rv.data_ptr<running_t>() : nullptr);
      };
      if (!has_running || rm.scalar_type() == acc) finalize(acc_t(0));
      else finalize(scalar_t(0));  // the checks allow only the input dtype or its acc dtype
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
        if (rm.scalar_type() == acc) launch(acc_t(0));
        else launch(scalar_t(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (M == 0) return {out, save_mean, save_invstd};
  }

  const Tensor w = channel_values(weight, input, 1.0), b = channel_values(bias, input, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_normalize_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = L.x.const_data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    elementwise_dispatch<scalar_t>(L, {x, y}, [&](auto index_tag, auto vec_tag, auto rows_tag) {
      using index_t = decltype(index_tag);
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr bool ROWS = decltype(rows_tag)::value;
      const int64_t nvec = L.x.numel() / VEC;
      normalize_kernel<scalar_t, acc_t, index_t, VEC, ROWS><<<grid_for(nvec, kThreads), kThreads, 0, stream>>>(
          x, y, index_t(nvec), index_t(C), index_t(L.S / VEC), save_mean.const_data_ptr<acc_t>(),
          save_invstd.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>());
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
    const auto res = reduce_partials(GradSumsOp<scalar_t, acc_t>{g, x, mu.const_data_ptr<acc_t>()}, L, {g, x});
    auto finalize = [&](auto param_tag) {
      using param_t = decltype(param_tag);
      finalize_sums_kernel<acc_t, param_t><<<unsigned(ceil_div(C, kChannelsPerBlock)), kThreads, 0, stream>>>(
          reinterpret_cast<const GradSums<acc_t>*>(res.first.const_data_ptr()), res.second, C,
          is.const_data_ptr<acc_t>(), sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>(),
          grad_weight.data_ptr<param_t>(), grad_bias.data_ptr<param_t>());
    };
    if (pdtype == acc_type(input.scalar_type())) finalize(acc_t(0));
    else finalize(scalar_t(0));  // the checks allow only the input dtype or its acc dtype
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
  const Tensor w = channel_values(weight, input, 1.0);
  const Tensor mu = mean.contiguous(), is = invstd.contiguous();
  const Tensor s1 = training ? sum_dy->contiguous() : Tensor(), s2 = training ? sum_dy_xmu->contiguous() : Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    const scalar_t* x = L.x.const_data_ptr<scalar_t>();
    scalar_t* d = dx.data_ptr<scalar_t>();
    elementwise_dispatch<scalar_t>(L, {g, x, d}, [&](auto index_tag, auto vec_tag, auto rows_tag) {
      using index_t = decltype(index_tag);
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr bool ROWS = decltype(rows_tag)::value;
      const int64_t nvec = L.x.numel() / VEC;
      const dim3 grid(grid_for(nvec, kThreads));
      auto launch = [&](auto train_tag) {
        constexpr bool TRAIN = decltype(train_tag)::value;
        grad_input_kernel<scalar_t, acc_t, index_t, VEC, ROWS, TRAIN><<<grid, kThreads, 0, stream>>>(
            g, x, d, index_t(nvec), index_t(C), index_t(L.S / VEC), mu.const_data_ptr<acc_t>(),
            is.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
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

// All three training-mode gradients: the two kernels above, in order.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                                            const Tensor& mean, const Tensor& invstd,
                                                            const OptTensor& weight) {
  auto sums = batch_norm_backward_reduce_cuda(grad_output, input, mean, invstd, weight);
  Tensor dx = batch_norm_backward_input_cuda(grad_output, input, mean, invstd, weight, std::get<0>(sums),
                                             std::get<1>(sums));
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
