// The fused Linear + LeakyReLU's backward as the autograd node runs it
// (csrc/linear_leaky_relu_autograd.cpp); also bound to Python for the torch.func form of the
// autograd Function (fastbn/ops.py).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace fastbn {

// (grad_input, grad_weight, grad_bias), each undefined where `needed` says it is not. `saved` is
// what the forward kept: the output for negative_slope >= 0, else the pre-activation. With grad
// mode on (create_graph=True, torch.func) in ATen ops, so that autograd records them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_leaky_relu_grads(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& saved,
    double negative_slope, std::array<bool, 3> needed);

}  // namespace fastbn
