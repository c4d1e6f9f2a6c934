"""What users call: the signatures and semantics of torch.nn.functional, on fastbn's kernels."""
import torch
from torch.autograd import forward_ad

from fastbn.ops import (BatchNormTransformFunction, LinearLeakyReLUTransformFunction, batch_norm_autograd,
                        batch_norm_op, linear_leaky_relu_autograd, linear_leaky_relu_forward)


def _in_transform():
    # Inside torch.func transforms (grad, vmap, jacrev, jvp, ...) or a forward-mode dual level
    # the autograd Functions must take the form those require (ops.BatchNormTransformFunction).
    # Never while torch.compile traces.
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def _records_graph(input, weight, bias):
    # Without a graph to record (inference, no_grad) the ops are called directly: an
    # autograd.Function would build a node that nothing uses, which costs more than the op at
    # small sizes.
    return torch.is_grad_enabled() and (_requires_grad(input) or _requires_grad(weight) or _requires_grad(bias))


def _requires_grad(t):
    return isinstance(t, torch.Tensor) and t.requires_grad


def _as_float(op, name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        hint = (" (momentum=None, the cumulative moving average, is an option of the modules: "
                "fastbn.nn.BatchNorm1d/2d/3d(momentum=None))" if name == "momentum" and value is None else "")
        raise TypeError(f"{op}: expected {name} to be a float, got {type(value).__name__}{hint}") from None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Drop-in for torch.nn.functional.batch_norm.

    input (N, C, *); training normalises with the batch's biased variance and, when running
    stats are given, updates them in place with `momentum` (unbiased variance); eval uses the
    running stats. Accumulates in float32 for bfloat16/float16 inputs.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked=None):
    # batch_norm, and num_batches_tracked += 1 when a module gives its counter: within the C++ call
    # where the step records a graph (fastbn.ops.batch_norm_autograd), else after the op
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: expected input to be a Tensor, got {type(input).__name__}")
    momentum, eps = _as_float("batch_norm", "momentum", momentum), _as_float("batch_norm", "eps", eps)
    if torch.is_grad_enabled() and (_requires_grad(running_mean) or _requires_grad(running_var)):
        # as torch: autograd would otherwise see a leaf that requires grad updated in place
        raise RuntimeError("batch_norm: running_mean and running_var must not require grad (they are buffers, "
                           "updated in place in training, not differentiated); got requires_grad="
                           f"{_requires_grad(running_mean)} and {_requires_grad(running_var)}")
    args = (input, weight, bias, running_mean, running_var, bool(training), momentum, eps)
    in_transform = _in_transform()
    if not in_transform and _records_graph(input, weight, bias):
        return batch_norm_autograd(*args, num_batches_tracked)
    out = BatchNormTransformFunction.apply(*args)[0] if in_transform else batch_norm_op(*args)[0]
    if num_batches_tracked is not None:  # (every path counts a batch once it is normalised)
        num_batches_tracked.add_(1)
    return out


def linear_leaky_relu(input, weight, bias=None, negative_slope=0.01):
    """leaky_relu(input @ weight.T + bias, negative_slope) in one fused op.

    input (*, in_features), weight (out_features, in_features), bias (out_features,).
    Under autocast the operands are cast to the autocast dtype, as torch does for linear.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"linear_leaky_relu: expected input to be a Tensor, got {type(input).__name__}")
    negative_slope = _as_float("linear_leaky_relu", "negative_slope", negative_slope)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if _in_transform():
        return LinearLeakyReLUTransformFunction.apply(input, weight, bias, negative_slope)[0]
    if _records_graph(input, weight, bias):
        return linear_leaky_relu_autograd(input, weight, bias, negative_slope)
    return linear_leaky_relu_forward(input, weight, bias, negative_slope)[0]
