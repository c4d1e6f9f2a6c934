// BatchNorm's backward as the autograd node runs it (csrc/batch_norm_autograd.cpp); also bound to
// Python for the torch.func form of the autograd Function (fastbn/ops.py).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastbn {

// (grad_input, grad_weight, grad_bias), each undefined where `needed` says it is not. With grad
// mode on (create_graph=True, torch.func) in ATen ops, so that autograd records them; otherwise
// in fastbn's kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_grads(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, double eps, std::array<bool, 3> needed);

// The same gradients in ATen ops, all three: the maths of the kernels, differentiable.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_differentiable(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, double eps);

}  // namespace fastbn
