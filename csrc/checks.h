// Input checks and layout shared by the CPU and CUDA implementations: one place that decides
// what a valid call is, so both backends reject the same inputs with the same words.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace fastbn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool is_low_precision(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}
// float32 for float/half/bfloat16 inputs, float64 for float64
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-channel tensors (weight, bias, running stats): shape [C], same device, and the input's
// dtype or, for half/bfloat16 inputs, float32 -- the mixed precision torch allows.
inline void check_channel_tensor(const char* op, const char* name, const OptTensor& t,
                                 const Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t C = input.size(1);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": expected ", name, " of shape [", C,
              "] (one value per channel of input of shape ", input.sizes(), "), got ", t->sizes());
  TORCH_CHECK(t->device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like input, got ", t->device());
  const auto it = input.scalar_type(), tt = t->scalar_type();
  TORCH_CHECK(tt == it || (is_low_precision(it) && tt == at::kFloat), op, ": expected ", name,
              " of dtype ", it, is_low_precision(it) ? " or Float" : "", " (input is ", it,
              "), got ", tt);
}

inline void check_float_input(const char* op, const Tensor& input, bool allow_half) {
  const auto t = input.scalar_type();
  const bool ok = t == at::kFloat || t == at::kDouble || t == at::kBFloat16 ||
                  (allow_half && t == at::kHalf);
  TORCH_CHECK(ok, op, ": expected a floating point input (Float, Double, BFloat16",
              allow_half ? ", Half" : "", " on ", input.device().type(), "), got ", t);
}

inline void check_batch_norm_args(const char* op, const Tensor& input, const OptTensor& weight,
                                  const OptTensor& bias, const OptTensor& running_mean,
                                  const OptTensor& running_var, bool training, bool allow_half) {
  TORCH_CHECK(input.dim() >= 2, op, ": expected input of shape (N, C, *) with at least 2 dims, got ",
              input.dim(), "D input of shape ", input.sizes());
  check_float_input(op, input, allow_half);
  check_channel_tensor(op, "weight", weight, input);
  check_channel_tensor(op, "bias", bias, input);
  check_channel_tensor(op, "running_mean", running_mean, input);
  check_channel_tensor(op, "running_var", running_var, input);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv, op, ": running_mean and running_var must both be given or both be None");
  TORCH_CHECK(training || has_rm, op,
              ": running_mean and running_var must be defined in evaluation mode (training=False)");
  if (training && input.numel() > 0) {
    TORCH_CHECK(input.numel() / input.size(1) > 1, op,
                ": expected more than 1 value per channel when training, got input size ",
                input.sizes());
  }
}

// How a BatchNorm input is walked. `planar`: (N, C, S) contiguous, each (n, c) a run of S
// values. Otherwise `rows`: (M, C) with channels innermost (2D input, or channels_last 4D / 5D).
struct BatchNormLayout {
  Tensor x;  // dense in the chosen layout (a copy only if the input was neither)
  bool planar;
  at::MemoryFormat format;
  int64_t N, C, S;  // rows layout: M = N * S rows
  int64_t per_channel() const { return N * S; }
};

inline BatchNormLayout batch_norm_layout(const Tensor& input) {
  const int64_t N = input.size(0), C = input.size(1);
  const int64_t S = (N * C == 0) ? 0 : input.numel() / (N * C);
  if ((input.dim() == 4 || input.dim() == 5) && !input.is_contiguous()) {
    const auto channels_last =
        input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    if (input.is_contiguous(channels_last)) return {input, false, channels_last, N, C, S};
  }
  return {input.contiguous(), S != 1, at::MemoryFormat::Contiguous, N, C, S};
}

// weight / bias as a dense vector of the accumulation dtype, or undefined when not given (the
// kernels then read 1 / 0: no fill kernel).
inline Tensor channel_values_if_given(const OptTensor& t, const Tensor& input) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return t->to(acc_type(input.scalar_type())).contiguous();
}

inline void check_same_device(const char* op, const Tensor& a, const char* an, const Tensor& b,
                              const char* bn) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", an, " and ", bn,
              " on the same device, got ", a.device(), " and ", b.device());
}

inline void check_linear_args(const char* op, const Tensor& input, const Tensor& weight,
                              const OptTensor& bias, bool allow_half) {
  TORCH_CHECK(input.dim() >= 1, op, ": expected input of shape (*, in_features), got a 0-dim tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": expected weight of shape (out_features, in_features), got ",
              weight.sizes());
  TORCH_CHECK(input.size(-1) == weight.size(1), op, ": input of shape ", input.sizes(),
              " has in_features=", input.size(-1), " but weight of shape ", weight.sizes(),
              " expects in_features=", weight.size(1));
  check_float_input(op, input, allow_half);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": expected weight of dtype ",
              input.scalar_type(), " like input, got ", weight.scalar_type());
  check_same_device(op, input, "input", weight, "weight");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": expected bias of shape [", weight.size(0), "] (out_features), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": expected bias of dtype ",
                input.scalar_type(), " like input, got ", bias->scalar_type());
    check_same_device(op, input, "input", *bias, "bias");
  }
}

// (grad_output, saved) as dense (M, N) matrices, after the checks below.
inline std::pair<Tensor, Tensor> leaky_relu_grad_operands(const char* op, const Tensor& grad_output,
                                                          const Tensor& saved, bool allow_half);

inline void check_leaky_relu_grad_args(const char* op, const Tensor& grad_output,
                                       const Tensor& saved, bool allow_half) {
  check_float_input(op, saved, allow_half);
  TORCH_CHECK(grad_output.sizes() == saved.sizes(), op, ": grad_output of shape ",
              grad_output.sizes(), " does not match the saved activation of shape ", saved.sizes());
  TORCH_CHECK(grad_output.scalar_type() == saved.scalar_type(), op, ": grad_output dtype ",
              grad_output.scalar_type(), " does not match the saved activation dtype ",
              saved.scalar_type());
  TORCH_CHECK(saved.dim() >= 1, op, ": expected tensors of shape (*, out_features)");
  check_same_device(op, grad_output, "grad_output", saved, "saved");
}

inline void check_batch_norm_backward_args(const char* op, const Tensor& grad_output,
                                           const Tensor& input, const Tensor& mean,
                                           const Tensor& invstd, const OptTensor& weight) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output of shape ",
              grad_output.sizes(), " does not match input of shape ", input.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 2, op, ": expected input of shape (N, C, *)");
  const int64_t C = input.size(1);
  const auto acc = acc_type(input.scalar_type());
  for (const Tensor* t : {&mean, &invstd}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == acc, op,
                ": expected saved mean/invstd of shape [", C, "] and dtype ", acc, ", got ",
                t->sizes(), " ", t->scalar_type());
    check_same_device(op, input, "input", *t, "saved statistics");
  }
  check_same_device(op, input, "input", grad_output, "grad_output");
  check_channel_tensor(op, "weight", weight, input);
}

// dtype of grad_weight / grad_bias: the weight's, or the statistics' (accumulation) dtype without one.
inline at::ScalarType param_grad_dtype(const OptTensor& weight, const Tensor& mean) {
  return weight.has_value() && weight->defined() ? weight->scalar_type() : mean.scalar_type();
}

// Returns whether this is the training-mode input gradient (the per-channel sums are given).
inline bool check_batch_norm_backward_input_args(const char* op, const Tensor& grad_output, const Tensor& input,
                                                 const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                                                 const OptTensor& sum_dy, const OptTensor& sum_dy_xmu) {
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd, weight);
  const bool training = sum_dy.has_value() && sum_dy->defined();
  TORCH_CHECK(training == (sum_dy_xmu.has_value() && sum_dy_xmu->defined()), op,
              ": sum_dy and sum_dy_xmu must both be given (training) or both be None (eval)");
  return training;
}

inline std::pair<Tensor, Tensor> leaky_relu_grad_operands(const char* op, const Tensor& grad_output,
                                                          const Tensor& saved, bool allow_half) {
  check_leaky_relu_grad_args(op, grad_output, saved, allow_half);
  const int64_t N = saved.size(-1);
  return {grad_output.reshape({-1, N}).contiguous(), saved.reshape({-1, N}).contiguous()};
}

}  // namespace fastbn
