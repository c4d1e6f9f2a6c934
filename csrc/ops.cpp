// The fastbn operator schemas (declared once, for every backend) and the Python module that
// reports what this build contains. Kernels: batch_norm_cpu.cpp, linear_leaky_relu_cpu.cpp,
// cuda/*.cu; autograd and fake (meta) kernels: fastbn/ops.py; typed entry points for eager calls
// (the module's `eager` submodule): eager_calls.cpp.
#include <torch/extension.h>

#include "cpu/kernels.h"
#include "cpu/output_allocator.h"

TORCH_LIBRARY(fastbn, m) {
  // Forward of BatchNorm. Returns (output, save_mean, save_invstd); in training the batch
  // statistics (and, when given, the running stats are updated in place with `momentum`),
  // in eval the running statistics.
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // Per-channel sums over the batch: (sum_dy, sum_dy_xmu, grad_weight, grad_bias), with
  // sum_dy_xmu = sum(dy * (x - mean)); the first two are what the training-mode input gradient
  // needs, the last two come in weight's dtype (the accumulation dtype without weight).
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight) -> (Tensor, Tensor, Tensor, Tensor)");
  // Input gradient. With sum_dy/sum_dy_xmu (training) the statistics' dependence on the input
  // is included; without them (eval) the statistics are constants.
  m.def(
      "batch_norm_backward_input(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? sum_dy, Tensor? sum_dy_xmu) -> Tensor");
  // Training mode, all gradients at once: (grad_input, grad_weight, grad_bias); the same as
  // batch_norm_backward_reduce followed by batch_norm_backward_input, fused where it pays.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight) "
      "-> (Tensor, Tensor, Tensor)");
  // leaky_relu(input @ weight.T + bias, negative_slope)
  m.def("linear_leaky_relu(Tensor input, Tensor weight, Tensor? bias, float negative_slope) -> Tensor");
  // (grad_preactivation, grad_bias) from the output gradient and `saved`, a tensor whose sign is
  // the pre-activation's (the output itself when negative_slope >= 0).
  m.def("leaky_relu_backward_bias(Tensor grad_output, Tensor saved, float negative_slope) -> (Tensor, Tensor)");
  // (grad_input, grad_weight, grad_bias) of linear_leaky_relu from the output gradient, the input,
  // the weight and `saved` (as above): leaky_relu_backward_bias, then the two GEMMs.
  m.def(
      "linear_leaky_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor saved, "
      "float negative_slope) -> (Tensor, Tensor, Tensor)");
}

#ifndef FASTBN_WITH_CUDA
// A build without CUDA kernels: say so, and how to get them, instead of the dispatcher's
// generic "could not run ... with arguments from the 'CUDA' backend".
namespace {
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false,
              "fastbn was built without CUDA kernels (no CUDA toolkit found at build time, or "
              "FASTBN_CUDA=0), so it cannot run on CUDA tensors. Rebuild with a CUDA toolkit: "
              "CUDA_HOME=/usr/local/cuda FASTBN_CUDA=1 pip install --no-build-isolation -e .");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_cuda(const at::Tensor&, const std::optional<at::Tensor>&,
                                                       const std::optional<at::Tensor>&,
                                                       const std::optional<at::Tensor>&,
                                                       const std::optional<at::Tensor>&, bool, double, double) {
  no_cuda();
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_reduce_cuda(const at::Tensor&, const at::Tensor&,
                                                                          const at::Tensor&, const at::Tensor&,
                                                                          const std::optional<at::Tensor>&) {
  no_cuda();
}
at::Tensor bn_input_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&) {
  no_cuda();
}
at::Tensor lin_cuda(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double) {
  no_cuda();
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward_cuda(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const std::optional<at::Tensor>&) {
  no_cuda();
}
std::tuple<at::Tensor, at::Tensor> lrelu_cuda(const at::Tensor&, const at::Tensor&, double) {
  no_cuda();
}
}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CUDA, m) {
  m.impl("batch_norm", &bn_cuda);
  m.impl("batch_norm_backward_reduce", &bn_reduce_cuda);
  m.impl("batch_norm_backward_input", &bn_input_cuda);
  m.impl("batch_norm_backward", &bn_backward_cuda);
  m.impl("linear_leaky_relu", &lin_cuda);
  m.impl("leaky_relu_backward_bias", &lrelu_cuda);
}
#endif

namespace fastbn {
void register_eager_calls(pybind11::module_& m);  // eager_calls.cpp
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fastbn compiled kernels (ops are registered under torch.ops.fastbn)";
  mod.attr("version") = FASTBN_VERSION;
  mod.attr("torch_version") = FASTBN_TORCH_VERSION;
#ifdef FASTBN_WITH_CUDA
  mod.attr("with_cuda") = true;
  mod.attr("cuda_archs") = FASTBN_CUDA_ARCHS;
#else
  mod.attr("with_cuda") = false;
  mod.attr("cuda_archs") = "";
#endif
  mod.def("cpu_isa", [] { return std::string(fastbn::cpu::kernels().isa); },
          "The instruction set of the CPU loops in use (chosen at load time)");
  mod.def("num_threads", [] { return at::get_num_threads(); });
  mod.def("cpu_cache_stats", [] {
    const auto s = fastbn::cpu::cache_stats();
    return std::make_tuple(s.cached_bytes, s.hits, s.misses);
  }, "(cached bytes, hits, misses) of the cache of large CPU outputs");
  mod.def("empty_cpu_cache", &fastbn::cpu::empty_cache, "Return the cached CPU output blocks to the system");
  auto eager = mod.def_submodule("eager", "fastbn's ops called through the dispatcher's typed handles");
  fastbn::register_eager_calls(eager);
}
