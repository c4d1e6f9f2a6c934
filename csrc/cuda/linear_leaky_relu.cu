// Fused Linear + LeakyReLU on CUDA. The GEMMs are cuBLAS (through ATen); the epilogues are ours:
//   forward:  z <- leaky_relu(z + bias) in place on the GEMM result, one vectorised pass
//   backward: gz = g * (saved > 0 ? 1 : slope) fused with the bias-gradient column sums
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"

namespace fastbn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kColsX = 32, kRowsY = 8;

template <typename scalar_t, typename acc_t, typename index_t, int VEC>
__global__ void bias_leaky_relu_kernel(scalar_t* __restrict__ z, index_t nvec, index_t N,
                                       const scalar_t* __restrict__ bias, acc_t slope) {
  using V = Vec<scalar_t, VEC>;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += index_t(gridDim.x) * blockDim.x) {
    V v = reinterpret_cast<V*>(z)[i];
    const index_t j0 = (i * VEC) % N;  // N % VEC == 0: a vector stays in one row
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t a = static_cast<acc_t>(v.v[k]) + (bias ? static_cast<acc_t>(bias[j0 + k]) : acc_t(0));
      v.v[k] = static_cast<scalar_t>(a > acc_t(0) ? a : a * slope);
    }
    reinterpret_cast<V*>(z)[i] = v;
  }
}

// Block (bx, split): 32 columns x 8 row-lanes; each thread walks its column over the split's
// rows, writes gz, and the 8 lanes' sums are merged into one partial per (split, column).
template <typename scalar_t, typename acc_t>
__global__ void leaky_relu_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ saved,
                                       scalar_t* __restrict__ gz, int64_t M, int64_t N, acc_t slope,
                                       acc_t* __restrict__ partial) {
  __shared__ acc_t sums[kRowsY][kColsX];
  const int64_t j = int64_t(blockIdx.x) * kColsX + threadIdx.x;
  acc_t s = 0;
  if (j < N) {
    for (int64_t r = int64_t(blockIdx.y) * kRowsY + threadIdx.y; r < M; r += int64_t(gridDim.y) * kRowsY) {
      const int64_t i = r * N + j;
      const acc_t gv = static_cast<acc_t>(g[i]);
      const scalar_t out = static_cast<scalar_t>(static_cast<acc_t>(saved[i]) > acc_t(0) ? gv : gv * slope);
      gz[i] = out;
      s += static_cast<acc_t>(out);
    }
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < N) {
    for (int k = 1; k < kRowsY; ++k) s += sums[k][threadIdx.x];
    partial[int64_t(blockIdx.y) * N + j] = s;
  }
}

Tensor linear_leaky_relu_cuda(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                              double negative_slope) {
  check_linear_args("fastbn.linear_leaky_relu", input, weight, bias, /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t K = weight.size(1), N = weight.size(0);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = N;
  Tensor z = at::mm(input.reshape({-1, K}), weight.t());
  if (z.numel() == 0) return z.view(out_shape);
  const Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_lin_lrelu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const bool small = z.numel() < (int64_t(1) << 30);  // margin: i + grid stride stays in int32
    auto launch = [&](auto index_tag, auto vec_tag) {
      using index_t = decltype(index_tag);
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t nvec = z.numel() / VEC;
      bias_leaky_relu_kernel<scalar_t, acc_t, index_t, VEC><<<grid_for(nvec, kThreads), kThreads, 0, stream>>>(
          zp, index_t(nvec), index_t(N), bp, acc_t(negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int V = kVec16<scalar_t>;
    const bool vec = can_vectorize<scalar_t>(N, {zp});
    if (small && vec) launch(int32_t(0), std::integral_constant<int, V>());
    else if (small) launch(int32_t(0), std::integral_constant<int, 1>());
    else if (vec) launch(int64_t(0), std::integral_constant<int, V>());
    else launch(int64_t(0), std::integral_constant<int, 1>());
  });
  return z.view(out_shape);
}

std::tuple<Tensor, Tensor> leaky_relu_backward_bias_cuda(const Tensor& grad_output, const Tensor& saved,
                                                         double negative_slope) {
  const char* op = "fastbn.leaky_relu_backward_bias";
  // not a structured binding: lambdas below capture these, which C++17 (torch < 2.12) forbids
  const auto operands = leaky_relu_grad_operands(op, grad_output, saved, /*allow_half=*/true);
  const Tensor& g = operands.first;
  const Tensor& s = operands.second;
  const c10::cuda::CUDAGuard guard(saved.device());
  const int64_t M = g.size(0), N = g.size(1);
  Tensor gz = at::empty_like(g);
  const auto acc = acc_type(saved.scalar_type());
  if (M == 0 || N == 0)
    return {gz.view(saved.sizes()), at::zeros({N}, saved.options())};
  const int64_t cblocks = ceil_div(N, kColsX);
  const int64_t splits = std::clamp<int64_t>(
      std::min(ceil_div(int64_t(num_sms()) * 4, cblocks), std::max<int64_t>(1, M / (kRowsY * 8))), 1, 65535);
  Tensor partial = at::empty({splits, N}, saved.options().dtype(acc));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "fastbn_lrelu_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    leaky_relu_grad_kernel<scalar_t, acc_t><<<dim3(unsigned(cblocks), unsigned(splits)), dim3(kColsX, kRowsY), 0, stream>>>(
        g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), gz.data_ptr<scalar_t>(), M, N,
        acc_t(negative_slope), partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // fixed-order sum of the partials (deterministic)
  return {gz.view(saved.sizes()), partial.sum(0).to(saved.scalar_type())};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastbn, CUDA, m) {
  m.impl("linear_leaky_relu", &cuda::linear_leaky_relu_cuda);
  m.impl("leaky_relu_backward_bias", &cuda::leaky_relu_backward_bias_cuda);
}

}  // namespace fastbn
