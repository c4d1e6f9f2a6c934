// Typed entry points for fastbn's ops, for eager calls from Python (fastbn/ops.py).
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
}

#undef FASTBN_EAGER

}  // namespace fastbn
