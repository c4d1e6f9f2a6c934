// Autograd for fastbn::batch_norm: a torch::autograd::Function (the C++ form of
// torch.autograd.Function) registered as the op's Autograd kernel, for every backend.
//
// Why C++ and not a Python autograd.Function: a Python Function costs ~50 us per training step
// (apply, then the engine taking the GIL to call backward and unpack what was saved), as much as
// the BatchNorm kernels themselves at MLP sizes (200 x 1000: ~70 us forward, ~90 us backward).
// Here the node is C++ end to end, as torch's own BatchNorm is.
//
//   forward:  (y, mean, invstd) = batch_norm(x, weight, bias, running stats, training, momentum, eps)
//             saving x, weight, mean, invstd (mean and invstd are not differentiable)
//   backward: training  dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
//             eval      dx = weight * invstd * dy
//             dweight = sum(dy * x_hat), dbias = sum(dy)
// With create_graph=True the gradients must themselves be differentiable, which the kernels are
// not: batch_norm_backward_differentiable computes the same maths in ATen ops.
#include "batch_norm_autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastbn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops, called through the dispatcher (below the Autograd key) so that each backend's kernel runs.
std::tuple<Tensor, Tensor, Tensor> call_batch_norm(const Tensor& input, const OptTensor& weight,
                                                   const OptTensor& bias, const OptTensor& running_mean,
                                                   const OptTensor& running_var, bool training, double momentum,
                                                   double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::batch_norm", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                                       const OptTensor&, const OptTensor&,
                                                                       const OptTensor&, bool, double, double)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

std::tuple<Tensor, Tensor, Tensor> call_backward(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                                 const Tensor& invstd, const OptTensor& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::batch_norm_backward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                       const Tensor&, const OptTensor&)>();
  return op.call(grad_output, input, mean, invstd, weight);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> call_backward_reduce(const Tensor& grad_output, const Tensor& input,
                                                                const Tensor& mean, const Tensor& invstd,
                                                                const OptTensor& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::batch_norm_backward_reduce", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&)>();
  return op.call(grad_output, input, mean, invstd, weight);
}

Tensor call_backward_input(const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& invstd,
                           const OptTensor& weight, const OptTensor& sum_dy, const OptTensor& sum_dy_xmu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::batch_norm_backward_input", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op.call(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu);
}

OptTensor defined_or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double momentum, double eps) {
    auto [out, mean, invstd] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return call_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps);
    }();
    if (training) {  // the running stats were updated in place: tell autograd, as an in-place op would
      for (const auto& t : {running_mean, running_var})
        if (t.has_value() && t->defined()) torch::autograd::impl::bump_version(*t);
    }
    const bool has_weight = weight.has_value() && weight->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({input, has_weight ? *weight : Tensor(), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    // needs_input_grad counts the Tensor arguments given (None is no edge): where bias's is
    ctx->saved_data["bias_edge"] = has_bias ? int64_t(1 + has_weight) : int64_t(-1);
    ctx->mark_non_differentiable({mean, invstd});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight_t = saved[1], &mean = saved[2], &invstd = saved[3];
    const OptTensor weight = defined_or_none(weight_t);
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = weight.has_value() && ctx->needs_input_grad(1);
    const bool need_bias = bias_edge >= 0 && ctx->needs_input_grad(bias_edge);
    auto [grad_input, grad_weight, grad_bias] =
        batch_norm_grads(grads[0], input, weight, mean, invstd, training, ctx->saved_data["eps"].toDouble(),
                         {need_input, need_weight, need_bias});
    return {grad_input, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_autograd(const Tensor& input, const OptTensor& weight,
                                                       const OptTensor& bias, const OptTensor& running_mean,
                                                       const OptTensor& running_var, bool training, double momentum,
                                                       double eps) {
  for (const auto& t : {running_mean, running_var})
    TORCH_CHECK(!(training && t.has_value() && t->defined() && t->requires_grad()),
                "batch_norm: running_mean and running_var are updated in place in training and must not require "
                "grad (torch's BatchNorm keeps them as buffers)");
  auto outs = BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum, eps);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_differentiable(const Tensor& grad_output, const Tensor& input,
                                                                      const OptTensor& weight, const Tensor& mean,
                                                                      const Tensor& invstd, bool training,
                                                                      double eps) {
  // The batch statistics are recomputed from the input, so that their own dependence on it is
  // differentiated too (the saved mean and invstd are the kernels' outputs, constants to autograd).
  std::vector<int64_t> dims, shape;  // the dims reduced per channel; a (C,) vector's broadcast shape
  for (int64_t d = 0; d < input.dim(); ++d) {
    if (d != 1) dims.push_back(d);
    shape.push_back(d == 1 ? -1 : 1);
  }
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor x = input.to(acc), dy = grad_output.to(acc);
  Tensor mu, inv;
  if (training) {
    mu = x.mean(dims, /*keepdim=*/true);
    inv = at::rsqrt(at::var(x, dims, /*correction=*/at::Scalar(0), /*keepdim=*/true) + eps);
  } else {  // eval: the running statistics, constants
    mu = mean.to(acc).view(shape);
    inv = invstd.to(acc).view(shape);
  }
  const Tensor x_hat = (x - mu) * inv;
  const Tensor scale = weight.has_value() ? weight->to(acc).view(shape) * inv : inv;
  const Tensor grad_input =
      training ? scale * (dy - dy.mean(dims, true) - x_hat * (dy * x_hat).mean(dims, true)) : scale * dy;
  const auto param_dtype = weight.has_value() ? weight->scalar_type() : acc;
  return {grad_input.to(input.scalar_type()), (dy * x_hat).sum(dims).to(param_dtype), dy.sum(dims).to(param_dtype)};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_grads(const Tensor& grad_output, const Tensor& input,
                                                    const OptTensor& weight, const Tensor& mean, const Tensor& invstd,
                                                    bool training, double eps, std::array<bool, 3> needed) {
  const auto [need_input, need_weight, need_bias] = needed;
  Tensor grad_input, grad_weight, grad_bias;
  if (at::GradMode::is_enabled()) {  // create_graph=True, or torch.func: the backward is recorded
    std::tie(grad_input, grad_weight, grad_bias) =
        batch_norm_backward_differentiable(grad_output, input, weight, mean, invstd, training, eps);
  } else if (training && need_input) {  // the common case: every gradient, in one fused op
    std::tie(grad_input, grad_weight, grad_bias) = call_backward(grad_output, input, mean, invstd, weight);
  } else {
    Tensor sum_dy, sum_dy_xmu;
    if (need_weight || need_bias || (need_input && training))
      std::tie(sum_dy, sum_dy_xmu, grad_weight, grad_bias) =
          call_backward_reduce(grad_output, input, mean, invstd, weight);
    if (need_input)
      grad_input = call_backward_input(grad_output, input, mean, invstd, weight,
                                       training ? OptTensor(sum_dy) : std::nullopt,
                                       training ? OptTensor(sum_dy_xmu) : std::nullopt);
  }
  return {need_input ? grad_input : Tensor(), need_weight ? grad_weight : Tensor(),
          need_bias ? grad_bias : Tensor()};
}

}  // namespace fastbn

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) { m.impl("batch_norm", &fastbn::batch_norm_autograd); }
