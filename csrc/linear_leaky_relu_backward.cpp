// The backward of Linear + LeakyReLU in one call, for every backend: the activation derivative
// fused with the bias-gradient sum (fastbn::leaky_relu_backward_bias, per backend), then the two
// GEMMs. From Python these were seven op calls (~9 us of the backward at the MLP's 200x100->10).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "checks.h"

namespace fastbn {
namespace {

// The two GEMMs always have the same arithmetic (2 * M * N * K each). On two CPU threads, below
// this much each, they run side by side, each on one thread (BLAS called inside a parallel region
// runs serially), instead of one after the other on both: a 2-thread GEMM of this size spends
// more in its synchronisation than it gains (200x10 @ 10x100: 24.6 us on 2 threads, 7.7 on one).
// Backward GEMMs paired on the EPYC VM: 200x100->10 17.9 -> 11.1 us, 200x3072->100 1.50 -> 1.35 ms,
// 200x1000->500 2.16 -> 2.05 ms, 200x3072->1000 14.5 -> 13.8 ms; 1024x1024->1024 at parity and
// 4096x4096->1024 0.98x, hence the limit (benchmarks/results/cpu-2026-11-28-linear-small-gemm.md).
constexpr double kSideBySideMaxFlops = 2.0 * 1024 * 1024 * 1024;

bool gemms_side_by_side(const Tensor& input, int64_t M, int64_t N, int64_t K) {
  return input.is_cpu() && at::get_num_threads() == 2 && !at::in_parallel_region() &&
         2.0 * double(M) * double(N) * double(K) < kSideBySideMaxFlops;
}

std::tuple<Tensor, Tensor, Tensor> linear_leaky_relu_backward(const Tensor& grad_output, const Tensor& input,
                                                              const Tensor& weight, const Tensor& saved,
                                                              double negative_slope) {
  const char* op = "fastbn.linear_leaky_relu_backward";
  check_linear_args(op, input, weight, OptTensor(), /*allow_half=*/!input.is_cpu());
  TORCH_CHECK(saved.dim() == input.dim() && saved.size(-1) == weight.size(0) &&
                  saved.sizes().slice(0, saved.dim() - 1) == input.sizes().slice(0, input.dim() - 1),
              op, ": expected the saved activation of shape (*, out_features) = input's leading dims and ",
              weight.size(0), ", got ", saved.sizes(), " for input of shape ", input.sizes());
  static const auto activation_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastbn::leaky_relu_backward_bias", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double)>();
  // not a structured binding: the lambda below captures grad_pre
  const auto pre_and_bias = activation_backward.call(grad_output, saved, negative_slope);
  const int64_t N = weight.size(0), K = weight.size(1);
  const Tensor grad_pre = std::get<0>(pre_and_bias).reshape({-1, N});
  const Tensor x = input.reshape({-1, K});
  Tensor grad_input, grad_weight;
  if (gemms_side_by_side(input, grad_pre.size(0), N, K)) {
    // The worker thread calls at::mm through the dispatcher from the top, with its own thread-local
    // state: it must take this thread's (grad mode off, the dispatch keys already passed, modes),
    // else a backward under no_grad returned a grad_weight recording an MmBackward0 node.
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard as_caller(caller_state);
      for (int64_t i = begin; i < end; ++i) {
        if (i == 0)
          grad_input = at::mm(grad_pre, weight);
        else
          grad_weight = at::mm(grad_pre.t(), x);
      }
    });
  } else {
    grad_input = at::mm(grad_pre, weight);
    grad_weight = at::mm(grad_pre.t(), x);
  }
  return {grad_input.view(input.sizes()), grad_weight, std::get<1>(pre_and_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CompositeExplicitAutograd, m) {
  m.impl("linear_leaky_relu_backward", &linear_leaky_relu_backward);
}

}  // namespace fastbn
