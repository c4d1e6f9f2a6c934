// Entry points for eager calls from Python (fastbn/ops.py): the ops through typed handles, and
// the C++ autograd nodes that eager training steps record.
//
// torch.ops.fastbn.<op>(...) parses its arguments against the schema into a stack of IValues and
// makes a boxed call. These bindings convert the arguments once (pybind11) and call the same
// operator through the dispatcher's typed handle, as torch's own Python bindings do: the same
// dispatch -- every backend, the autograd and ADInplaceOrView fallbacks, fake tensors and
// __torch_dispatch__ modes, the profiler's record -- at ~2-3 us less a call (BatchNorm1d 200x1000,
// EPYC VM: forward op 29.3 -> 26.7 us, backward op 37.0 -> 34.9; module steps 1.02-1.07x as fast at
// 200x1000, 1x512x4x4 and 8x1000: benchmarks/results/cpu-2026-11-28-eager-calls.md).
// fastbn/ops.py keeps torch.ops for what only it handles:
// torch.compile's tracing and __torch_function__ (tensor subclasses, modes such as
// `with torch.device(...)`). The GIL is released during the call, as torch's bindings do.
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

namespace fastbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensors3 batch_norm(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                    double eps) {
  static const auto op = typed_op<decltype(batch_norm)>("fastbn::batch_norm");
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

Tensors3 batch_norm_backward(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                             const Tensor& invstd, const OptTensor& weight) {
  static const auto op = typed_op<decltype(batch_norm_backward)>("fastbn::batch_norm_backward");
  return op.call(grad_output, input, mean, invstd, weight);
}

Tensors4 batch_norm_backward_reduce(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                    const Tensor& invstd, const OptTensor& weight) {
  static const auto op = typed_op<decltype(batch_norm_backward_reduce)>("fastbn::batch_norm_backward_reduce");
  return op.call(grad_output, input, mean, invstd, weight);
}

Tensor batch_norm_backward_input(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                 const Tensor& invstd, const OptTensor& weight, const OptTensor& sum_dy,
                                 const OptTensor& sum_dy_xmu) {
  static const auto op = typed_op<decltype(batch_norm_backward_input)>("fastbn::batch_norm_backward_input");
  return op.call(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu);
}

Tensor linear_leaky_relu(const Tensor& input, const Tensor& weight, const OptTensor& bias, double negative_slope) {
  static const auto op = typed_op<decltype(linear_leaky_relu)>("fastbn::linear_leaky_relu");
  return op.call(input, weight, bias, negative_slope);
}

Tensors2 leaky_relu_backward_bias(const Tensor& grad_output, const Tensor& saved, double negative_slope) {
  static const auto op = typed_op<decltype(leaky_relu_backward_bias)>("fastbn::leaky_relu_backward_bias");
  return op.call(grad_output, saved, negative_slope);
}

Tensors3 linear_leaky_relu_backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                    const Tensor& saved, double negative_slope) {
  static const auto op = typed_op<decltype(linear_leaky_relu_backward)>("fastbn::linear_leaky_relu_backward");
  return op.call(grad_output, input, weight, saved, negative_slope);
}

}  // namespace

// ---- the autograd node of an eager BatchNorm ---------------------------------------------------
// fastbn/ops.py's BatchNormFunction in C++ (its node: torch::autograd::CppNode<fastbn::BatchNormFunction>)
// for eager training steps: neither recording the node nor the engine's call of its backward enters
// Python (`python -m benchmarks.autograd_nodes`; benchmarks/results/cpu-2026-11-28-autograd-nodes.md).
// The maths and the choice of ops are _batch_norm_backward's, which stays the path for torch.compile
// and __torch_function__; tests/test_eager_calls.py checks that the two give the same bits for every
// needs_input_grad, with and without create_graph.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct BatchNormFunction : torch::autograd::Function<BatchNormFunction> {
  // compiled autograd may trace the backward: it reads only the saved tensors and saved_data
  static constexpr bool is_traceable = true;

  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& running_mean, const OptTensor& running_var, bool training,
                        double momentum, double eps) {
    auto [out, mean, invstd] = batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    // the input edges are the tensors given, in order: an absent bias has none (nor an absent
    // weight, which shows as the undefined saved weight)
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &mean = saved[2], &invstd = saved[3];
    const OptTensor weight = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    const bool training = ctx->saved_data["training"].toBool();
    const bool has_weight = weight.has_value();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = has_weight && ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    const Tensor& grad_output = grads[0];

    Tensor grad_input, grad_weight, grad_bias;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph=True: the gradients must be differentiable too, so torch ops, in Python
      pybind11::gil_scoped_acquire gil;
      // a handle that is never released: the module outlives every backward
      static const pybind11::handle differentiable =
          pybind11::object(pybind11::module_::import("fastbn.ops").attr("batch_norm_backward_differentiable"))
              .release();
      const pybind11::object grads_in_torch_ops =
          differentiable(grad_output, input, weight, mean, invstd, training, ctx->saved_data["eps"].toDouble());
      std::tie(grad_input, grad_weight, grad_bias) = grads_in_torch_ops.cast<Tensors3>();
    } else if (training && need_input) {  // the common case: every gradient, in one fused op
      std::tie(grad_input, grad_weight, grad_bias) = batch_norm_backward(grad_output, input, mean, invstd, weight);
    } else {
      OptTensor sum_dy, sum_dy_xmu;
      if (need_weight || need_bias || (need_input && training)) {
        Tensor dy_sum, dy_xmu_sum;
        std::tie(dy_sum, dy_xmu_sum, grad_weight, grad_bias) =
            batch_norm_backward_reduce(grad_output, input, mean, invstd, weight);
        if (training) {
          sum_dy = dy_sum;
          sum_dy_xmu = dy_xmu_sum;
        }
      }
      if (need_input) {
        grad_input = batch_norm_backward_input(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu);
      }
    }
    return {need_input ? grad_input : Tensor(), need_weight ? grad_weight : Tensor(),
            need_bias ? grad_bias : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// num_batches_tracked += 1: a module's count of its training batches, kept in the same call. A
// plain CPU counter is incremented here, with the version bump that add_ makes: an add_ call of its
// own, from Python, cost the module's training step ~10 us at BatchNorm1d 200x1000 (its dispatch and
// TensorIterator run cold after BatchNorm's passes have gone through the caches). Any other counter
// (CUDA, a subclass, an inference tensor, or one a dispatch mode must see) goes through add_.
void count_batch(const Tensor& counter) {
  static const c10::DispatchKeySet plain_cpu_long = at::zeros({}, at::kLong).key_set();
  if (counter.key_set() == plain_cpu_long && counter.scalar_type() == at::kLong && counter.numel() == 1 &&
      !counter.is_inference() && !c10::impl::TorchDispatchModeTLS::any_modes_set()) {
    ++*counter.data_ptr<int64_t>();
    counter.unsafeGetTensorImpl()->bump_version();
  } else {
    counter.add_(1);
  }
}

Tensor batch_norm_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& running_mean, const OptTensor& running_var, bool training,
                           double momentum, double eps, const OptTensor& num_batches_tracked) {
  Tensor out = BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum, eps);
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) count_batch(*num_batches_tracked);
  return out;
}

// ---- the autograd node of an eager Linear + LeakyReLU -----------------------------------------
// fastbn/ops.py's LinearLeakyReLUFunction in C++, as BatchNormFunction above; the choices are
// _linear_leaky_relu_backward's. For slopes >= 0 the output is all the backward keeps (its sign is
// the pre-activation's); a negative slope keeps the pre-activation.
struct LinearLeakyReLUFunction : torch::autograd::Function<LinearLeakyReLUFunction> {
  static constexpr bool is_traceable = true;

  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                        double negative_slope) {
    Tensor out, saved;
    if (negative_slope >= 0) {
      out = saved = linear_leaky_relu(input, weight, bias, negative_slope);
    } else {
      saved = linear_leaky_relu(input, weight, bias, 1.0);  // identity: the pre-activation
      out = at::leaky_relu(saved, negative_slope);
    }
    ctx->save_for_backward({input, weight, saved});
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved_vars = ctx->get_saved_variables();
    const Tensor &input = saved_vars[0], &weight = saved_vars[1], &saved = saved_vars[2];
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    const bool need_input = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    const Tensor& grad_output = grads[0];

    Tensor grad_input, grad_weight, grad_pre, grad_bias;
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True: ATen ops, which autograd records
      grad_pre = at::where(saved > 0, grad_output, grad_output * negative_slope);
      grad_bias = grad_pre.reshape({-1, weight.size(0)}).sum(0);
    } else if (need_input && need_weight) {  // the common case: one op
      std::tie(grad_input, grad_weight, grad_bias) =
          linear_leaky_relu_backward(grad_output, input, weight, saved, negative_slope);
      return {grad_input, grad_weight, need_bias ? grad_bias : Tensor(), Tensor()};
    } else {
      std::tie(grad_pre, grad_bias) = leaky_relu_backward_bias(grad_output, saved, negative_slope);
    }
    if (grad_pre.dim() != 2) grad_pre = grad_pre.reshape({-1, weight.size(0)});
    if (need_input) grad_input = at::mm(grad_pre, weight).view(input.sizes());
    if (need_weight) grad_weight = at::mm(grad_pre.t(), input.dim() == 2 ? input : input.reshape({-1, weight.size(1)}));
    return {grad_input, grad_weight, need_bias ? grad_bias : Tensor(), Tensor()};
  }
};

Tensor linear_leaky_relu_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                  double negative_slope) {
  return LinearLeakyReLUFunction::apply(input, weight, bias, negative_slope);
}

#define FASTBN_EAGER(name) \
  m.def(#name, &name, pybind11::call_guard<pybind11::gil_scoped_release>(), \
        "torch.ops.fastbn." #name ", called through its typed handle")

void register_eager_calls(pybind11::module_& m) {
  FASTBN_EAGER(batch_norm);
  FASTBN_EAGER(batch_norm_backward_reduce);
  FASTBN_EAGER(batch_norm_backward_input);
  FASTBN_EAGER(batch_norm_backward);
  FASTBN_EAGER(linear_leaky_relu);
  FASTBN_EAGER(leaky_relu_backward_bias);
  FASTBN_EAGER(linear_leaky_relu_backward);
  using pybind11::arg;
  m.def("batch_norm_autograd", &batch_norm_autograd, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "fastbn.ops.BatchNormFunction.apply as a C++ autograd node: the output of fastbn::batch_norm, with a "
        "node that calls its backward ops; then num_batches_tracked += 1 if given",
        arg("input"), arg("weight"), arg("bias"), arg("running_mean"), arg("running_var"), arg("training"),
        arg("momentum"), arg("eps"), arg("num_batches_tracked") = pybind11::none());
  m.def("linear_leaky_relu_autograd", &linear_leaky_relu_autograd,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "fastbn.ops.LinearLeakyReLUFunction.apply as a C++ autograd node");
}

#undef FASTBN_EAGER

}  // namespace fastbn
