"""torch.library glue for the ops declared in csrc/ops.cpp: fake (meta) kernels, so that
torch.compile and FakeTensor can trace them, and the autograd Functions that pair each forward
op with its backward ops. Users call fastbn.functional / fastbn.nn, not this module."""
import torch

from fastbn import _C  # noqa: F401  (loads the schemas)

_ops = torch.ops.fastbn
batch_norm_op = _ops.batch_norm.default  # (out, mean, invstd); running stats updated in training


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batch_norm_format(input):
    # The layout the kernels keep (csrc/checks.h: batch_norm_layout).
    if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(
        memory_format=torch.channels_last
    ):
        return torch.channels_last
    return torch.contiguous_format


# ---- fake kernels ----------------------------------------------------------------------------


@torch.library.register_fake("fastbn::batch_norm")
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    C = input.shape[1]
    acc = _acc_dtype(input.dtype)
    out = torch.empty_like(input, memory_format=_batch_norm_format(input))
    return out, input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc)


@torch.library.register_fake("fastbn::batch_norm_backward_reduce")
def _(grad_output, input, mean, invstd, weight):
    param = torch.empty_like(mean, dtype=weight.dtype if weight is not None else mean.dtype)
    return torch.empty_like(mean), torch.empty_like(mean), param, torch.empty_like(param)


@torch.library.register_fake("fastbn::batch_norm_backward")
def _(grad_output, input, mean, invstd, weight):
    param = torch.empty_like(mean, dtype=weight.dtype if weight is not None else mean.dtype)
    grad_input = torch.empty_like(input, memory_format=_batch_norm_format(input))
    return grad_input, param, torch.empty_like(param)


@torch.library.register_fake("fastbn::batch_norm_backward_input")
def _(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu):
    return torch.empty_like(input, memory_format=_batch_norm_format(input))


@torch.library.register_fake("fastbn::linear_leaky_relu")
def _(input, weight, bias, negative_slope):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("fastbn::leaky_relu_backward_bias")
def _(grad_output, saved, negative_slope):
    return torch.empty_like(saved, memory_format=torch.contiguous_format), saved.new_empty(
        (saved.shape[-1],)
    )


# ---- autograd --------------------------------------------------------------------------------


class BatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias, with the backward of the study's section 3.2:
    dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))."""

    # forward(ctx, ...) rather than forward + setup_context: apply() then skips binding the
    # arguments with inspect.signature, which costs more than the op at MLP sizes.
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        out, mean, invstd = batch_norm_op(input, weight, bias, running_mean, running_var, training, momentum, eps)
        # mean and invstd are saved, not returned: fewer outputs for autograd to wrap per call
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training = training
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable too
            grads = batch_norm_backward_differentiable(grad_output, input, weight, mean, invstd, ctx.training, ctx.eps)
            return tuple(g if need else None for g, need in zip(grads, (need_input, need_weight, need_bias))) + (
                None, None, None, None, None)
        grad_input = grad_weight = grad_bias = None
        sum_dy = sum_dy_xmu = None
        if ctx.training and need_input:  # the common case: every gradient, in one fused op
            grad_input, grad_weight, grad_bias = _ops.batch_norm_backward(grad_output, input, mean, invstd, weight)
            return (grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None,
                    None, None, None, None, None)
        if need_weight or need_bias or (need_input and ctx.training):
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = _ops.batch_norm_backward_reduce(
                grad_output, input, mean, invstd, weight
            )
        if need_input:
            grad_input = _ops.batch_norm_backward_input(
                grad_output, input, mean, invstd, weight,
                sum_dy if ctx.training else None, sum_dy_xmu if ctx.training else None,
            )
        return (grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None,
                None, None, None, None, None)


def batch_norm_backward_differentiable(grad_output, input, weight, mean, invstd, training, eps):
    """(grad_input, grad_weight, grad_bias) in torch ops, for double backward (create_graph=True),
    which the kernels do not record. The maths of batch_norm_backward, with the batch statistics
    recomputed from the input so that their own dependence on it is differentiated too (the saved
    mean and invstd are the kernels' outputs, constants to autograd)."""
    dims = [d for d in range(input.dim()) if d != 1]
    shape = [-1 if d == 1 else 1 for d in range(input.dim())]
    acc = _acc_dtype(input.dtype)
    x, dy = input.to(acc), grad_output.to(acc)
    if training:
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
    else:  # eval: the running statistics, constants
        mean, invstd = mean.to(acc).view(shape), invstd.to(acc).view(shape)
    x_hat = (x - mean) * invstd
    scale = invstd if weight is None else weight.to(acc).view(shape) * invstd
    if training:
        grad_input = scale * (dy - dy.mean(dims, keepdim=True) - x_hat * (dy * x_hat).mean(dims, keepdim=True))
    else:
        grad_input = scale * dy
    param_dtype = acc if weight is None else weight.dtype
    return (grad_input.to(input.dtype), (dy * x_hat).sum(dims).to(param_dtype), dy.sum(dims).to(param_dtype))


def linear_leaky_relu_forward(input, weight, bias, negative_slope):
    """(out, what the backward keeps): the output itself for slope >= 0, else the pre-activation."""
    if negative_slope >= 0:
        out = _ops.linear_leaky_relu(input, weight, bias, negative_slope)
        return out, out
    pre = _ops.linear_leaky_relu(input, weight, bias, 1.0)  # identity: the pre-activation
    return torch.nn.functional.leaky_relu(pre, negative_slope), pre


class LinearLeakyReLUFunction(torch.autograd.Function):
    """y = leaky_relu(x @ W.T + b). For slope >= 0 the output's sign is the pre-activation's,
    so the output is all the backward keeps; a negative slope keeps the pre-activation."""

    @staticmethod
    def forward(ctx, input, weight, bias, negative_slope):
        out, saved = linear_leaky_relu_forward(input, weight, bias, negative_slope)
        ctx.save_for_backward(input, weight, saved)
        ctx.negative_slope = negative_slope
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, saved = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the same maths in torch ops, so that it is recorded
            grad_pre = torch.where(saved > 0, grad_output, grad_output * ctx.negative_slope)
            grad_pre = grad_pre.reshape(-1, weight.shape[0])
            grad_bias = grad_pre.sum(0)
        else:
            grad_pre, grad_bias = _ops.leaky_relu_backward_bias(grad_output, saved, ctx.negative_slope)
            grad_pre = grad_pre.reshape(-1, weight.shape[0])
        grad_input = grad_weight = None
        if need_input:
            grad_input = (grad_pre @ weight).view(input.shape)
        if need_weight:
            grad_weight = grad_pre.t() @ input.reshape(-1, weight.shape[1])
        return grad_input, grad_weight, grad_bias if need_bias else None, None
