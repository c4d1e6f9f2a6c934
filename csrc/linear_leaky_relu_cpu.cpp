// Fused Linear + LeakyReLU on the CPU: the GEMMs are ATen's (BLAS); everything around them --
// bias, activation, and in the backward the activation derivative with the bias-gradient
// reduction -- is one parallel, vectorised pass over the GEMM result while it is in cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/kernel_type.h"

namespace fastbn {
namespace {

int64_t rows_per_chunk(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

Tensor linear_leaky_relu_cpu(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                             double negative_slope) {
  check_linear_args("fastbn.linear_leaky_relu", input, weight, bias, /*allow_half=*/false);
  const int64_t K = weight.size(1), N = weight.size(0);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = N;
  const Tensor x2 = input.reshape({-1, K});
  Tensor z = at::mm(x2, weight.t());  // (M, N), dense
  const int64_t M = z.size(0);
  if (M == 0 || N == 0) return z.view(out_shape);
  const Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_linear_leaky_relu", [&] {
    using T = cpu::kernel_type<scalar_t>;
    const auto& k = cpu::kernels_for<T>();
    T* zp = reinterpret_cast<T*>(z.data_ptr<scalar_t>());
    const T* bp = b.defined() ? reinterpret_cast<const T*>(b.const_data_ptr<scalar_t>()) : nullptr;
    const int64_t rows = rows_per_chunk(N);
    at::parallel_for(0, (M + rows - 1) / rows, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r0 = q * rows;
        k.bias_leaky_relu(zp + r0 * N, std::min(rows, M - r0), N, bp, cpu::acc_t<T>(negative_slope));
      }
    });
  });
  return z.view(out_shape);
}

std::tuple<Tensor, Tensor> leaky_relu_backward_bias_cpu(const Tensor& grad_output,
                                                        const Tensor& saved, double negative_slope) {
  // not a structured binding: lambdas below capture these, which C++17 (torch < 2.12) forbids
  const auto operands = leaky_relu_grad_operands("fastbn.leaky_relu_backward_bias", grad_output, saved,
                                                 /*allow_half=*/false);
  const Tensor& g = operands.first;
  const Tensor& s = operands.second;
  const int64_t M = g.size(0), N = g.size(1);
  Tensor gz = at::empty_like(g);
  const auto acc = acc_type(saved.scalar_type());
  Tensor gbias = at::zeros({N}, saved.options().dtype(acc));
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, saved.scalar_type(), "fastbn_leaky_relu_grad", [&] {
      using T = cpu::kernel_type<scalar_t>;
      using A = cpu::acc_t<T>;
      const auto& k = cpu::kernels_for<T>();
      const int64_t rows = rows_per_chunk(N), chunks = (M + rows - 1) / rows;
      std::vector<A> partial(chunks * N);
      const T* gp = reinterpret_cast<const T*>(g.const_data_ptr<scalar_t>());
      const T* sp = reinterpret_cast<const T*>(s.const_data_ptr<scalar_t>());
      T* zp = reinterpret_cast<T*>(gz.data_ptr<scalar_t>());
      at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t r0 = q * rows;
          k.leaky_relu_grad(gp + r0 * N, sp + r0 * N, zp + r0 * N, std::min(rows, M - r0), N,
                            A(negative_slope), &partial[q * N]);
        }
      });
      // fixed-order merge of the chunk sums: deterministic for any thread count
      A* out = gbias.data_ptr<A>();
      for (int64_t q = 0; q < chunks; ++q)
        for (int64_t j = 0; j < N; ++j) out[j] += partial[q * N + j];
    });
  }
  return {gz.view(saved.sizes()), gbias.to(saved.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("linear_leaky_relu", &linear_leaky_relu_cpu);
  m.impl("leaky_relu_backward_bias", &leaky_relu_backward_bias_cpu);
}

}  // namespace fastbn
