// Autograd for fastbn::linear_leaky_relu: a torch::autograd::Function registered as the op's
// Autograd kernel, for every backend (C++ for the reason given in batch_norm_autograd.cpp).
//
//   forward:  y = leaky_relu(x @ W.T + b). For slope >= 0 the output's sign is the
//             pre-activation's, so the output is all the backward keeps; a negative slope keeps
//             the pre-activation (the fused op at slope 1, then the activation).
//   backward: dpre = dy * (saved > 0 ? 1 : slope);  dx = dpre @ W, dW = dpre.T @ x, db = sum(dpre)
#include "linear_leaky_relu_autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastbn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor call_linear_leaky_relu(const Tensor& input, const Tensor& weight, const OptTensor& bias, double slope) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::linear_leaky_relu", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, double)>();
  return op.call(input, weight, bias, slope);
}

std::tuple<Tensor, Tensor> call_leaky_relu_backward_bias(const Tensor& grad_output, const Tensor& saved,
                                                         double slope) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::leaky_relu_backward_bias", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double)>();
  return op.call(grad_output, saved, slope);
}

class LinearLeakyReLUFunction : public torch::autograd::Function<LinearLeakyReLUFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const OptTensor& bias, double negative_slope) {
    Tensor out, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (negative_slope >= 0) {
        out = saved = call_linear_leaky_relu(input, weight, bias, negative_slope);
      } else {
        saved = call_linear_leaky_relu(input, weight, bias, 1.0);  // identity: the pre-activation
        out = at::leaky_relu(saved, negative_slope);
      }
    }
    ctx->save_for_backward({input, weight, saved});
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [grad_input, grad_weight, grad_bias] = linear_leaky_relu_grads(
        grads[0], saved[0], saved[1], saved[2], ctx->saved_data["negative_slope"].toDouble(),
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)});
    return {grad_input, grad_weight, grad_bias, Tensor()};
  }
};

Tensor linear_leaky_relu_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                  double negative_slope) {
  return LinearLeakyReLUFunction::apply(input, weight, bias, negative_slope)[0];
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> linear_leaky_relu_grads(const Tensor& grad_output, const Tensor& input,
                                                           const Tensor& weight, const Tensor& saved,
                                                           double negative_slope, std::array<bool, 3> needed) {
  const auto [need_input, need_weight, need_bias] = needed;
  Tensor grad_pre, grad_bias;
  if (at::GradMode::is_enabled()) {  // create_graph=True, or torch.func: in ATen ops, recorded
    grad_pre = at::where(saved > 0, grad_output, grad_output * negative_slope).reshape({-1, weight.size(0)});
    grad_bias = grad_pre.sum(0);
  } else {  // the activation's derivative and the bias gradient in one pass
    std::tie(grad_pre, grad_bias) = call_leaky_relu_backward_bias(grad_output, saved, negative_slope);
    grad_pre = grad_pre.reshape({-1, weight.size(0)});
  }
  Tensor grad_input, grad_weight;
  if (need_input) grad_input = at::mm(grad_pre, weight).view(input.sizes());
  if (need_weight) grad_weight = at::mm(grad_pre.t(), input.reshape({-1, weight.size(1)}));
  return {grad_input, grad_weight, need_bias ? grad_bias : Tensor()};
}

}  // namespace fastbn

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) { m.impl("linear_leaky_relu", &fastbn::linear_leaky_relu_autograd); }
