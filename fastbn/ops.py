"""torch.library glue for the ops declared in csrc/ops.cpp: the functions that call them (through
the typed handles of csrc/eager_calls.cpp, or torch.ops); fake (meta) kernels, so that
torch.compile and FakeTensor can trace them; vmap rules, so that torch.func.vmap batches them;
and the autograd Functions that pair each forward op with its backward ops (eager training steps
record their C++ twins, csrc/eager_calls.cpp, instead). Users call fastbn.functional / fastbn.nn,
not this module."""
import torch

from fastbn import _C  # loads the schemas

_ops = torch.ops.fastbn


def _eager_first(name, eager, fallback):
    """A function that calls `eager` (a binding of csrc/eager_calls.cpp) where nothing needs the
    Python path, else `fallback`: torch.ops, or an autograd Function's apply, which alone handle
    torch.compile's tracing and __torch_function__ (tensor subclasses; modes such as
    `with torch.device(...)`). Below that choice the dispatch is the same."""

    def call(*args):
        if not torch.compiler.is_compiling() and not torch._C._has_torch_function(args):
            try:
                return eager(*args)
            except TypeError:  # an argument pybind11 cannot convert: the fallback names it in torch's words
                pass
        return fallback(*args)

    call.__name__ = call.__qualname__ = name
    return call


def _eager_or_torch_ops(name):
    # fastbn::<name> through _C.eager's typed handle: ~2-3 us less a call than torch.ops
    return _eager_first(f"{name}_op", getattr(_C.eager, name), getattr(_ops, name).default)


# (what each returns: csrc/ops.cpp's schemas)
batch_norm_op = _eager_or_torch_ops("batch_norm")  # (out, mean, invstd); running stats updated in training
batch_norm_backward_reduce_op = _eager_or_torch_ops("batch_norm_backward_reduce")
batch_norm_backward_input_op = _eager_or_torch_ops("batch_norm_backward_input")
batch_norm_backward_op = _eager_or_torch_ops("batch_norm_backward")  # (grad_input, grad_weight, grad_bias)
linear_leaky_relu_op = _eager_or_torch_ops("linear_leaky_relu")
leaky_relu_backward_bias_op = _eager_or_torch_ops("leaky_relu_backward_bias")
linear_leaky_relu_backward_op = _eager_or_torch_ops("linear_leaky_relu_backward")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batch_norm_format(input):
    # The layout the kernels keep (csrc/checks.h: batch_norm_layout).
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if channels_last is not None and not input.is_contiguous() and input.is_contiguous(memory_format=channels_last):
        return channels_last
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


@torch.library.register_fake("fastbn::linear_leaky_relu_backward")
def _(grad_output, input, weight, saved, negative_slope):
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return input.new_empty(input.shape), grad_weight, saved.new_empty((weight.shape[0],))


# ---- vmap rules -------------------------------------------------------------------------------
# torch.func.vmap runs the op once for the whole batch of calls (in_dims: where each argument's
# batch dimension is, None if it is shared).


def _batch_first(t, dim, batch_size):
    return t.movedim(dim, 0) if dim is not None else t.expand(batch_size, *t.shape)


@torch.library.register_vmap("fastbn::batch_norm")
def _(info, in_dims, input, weight, bias, running_mean, running_var, training, momentum, eps):
    # Each call normalises its own (N, C, *) input: the batch of B calls is one BatchNorm of B * C
    # channels, (N, B * C, *), channel b * C + c being channel c of call b.
    B = info.batch_size
    x = _batch_first(input, in_dims[0], B)
    if x.dim() < 3:
        raise ValueError(f"batch_norm: expected each vmapped input to be (N, C, *), got {tuple(x.shape[1:])}")
    N, C, rest = x.shape[1], x.shape[2], x.shape[3:]
    merged = x.movedim(0, 1).reshape(N, B * C, *rest)

    names = ("weight", "bias", "running_mean", "running_var")
    for t, dim, name in zip((weight, bias, running_mean, running_var), in_dims[1:5], names):
        per_call = None if t is None else tuple(t.shape) if dim is None else tuple(t.shape[:dim] + t.shape[dim + 1:])
        if per_call not in (None, (C,)):
            raise ValueError(f"batch_norm: expected {name} of shape ({C},) in each vmapped call (the input has "
                             f"{C} channels), got {per_call}")

    def per_channel(t, dim):  # (B * C,) in the merged channels' order
        if t is None:
            return None
        return t.repeat(B) if dim is None else t.movedim(dim, 0).reshape(B * C)

    weight, bias = per_channel(weight, in_dims[1]), per_channel(bias, in_dims[2])
    running = (running_mean, running_var)
    if training and running_mean is not None and running_var is not None:
        if in_dims[3] is None or in_dims[4] is None:
            raise RuntimeError(
                "batch_norm: vmap over training-mode BatchNorm with running stats shared by the batch: every "
                "call would update the same running_mean/running_var. Give each call its own (batched) running "
                "stats, or use track_running_stats=False (what torch.func.replace_all_batch_norm_modules_ does)")
        running = tuple(t.movedim(d, 0) for t, d in zip(running, in_dims[3:5]))  # views: updated in place
        flat = [t.contiguous() for t in running]
        out, mean, invstd = _ops.batch_norm(merged, weight, bias, flat[0].view(-1), flat[1].view(-1), True,
                                            momentum, eps)
        for t, f in zip(running, flat):
            if f.data_ptr() != t.data_ptr():
                t.copy_(f)
    else:  # eval reads the running stats; training without them has none
        running = tuple(per_channel(t, d) for t, d in zip(running, in_dims[3:5]))
        out, mean, invstd = _ops.batch_norm(merged, weight, bias, *running, training, momentum, eps)
    out = out.reshape(N, B, C, *rest).movedim(1, 0)
    return (out, mean.view(B, C), invstd.view(B, C)), (0, 0, 0)


@torch.library.register_vmap("fastbn::linear_leaky_relu")
def _(info, in_dims, input, weight, bias, negative_slope):
    B = info.batch_size
    x = _batch_first(input, in_dims[0], B)
    if in_dims[1] is None and in_dims[2] is None:  # one layer, a batch of inputs: the op takes any leading dims
        return _ops.linear_leaky_relu(x, weight, bias, negative_slope), 0
    # a layer per call (ensembles): batched matmuls
    w = _batch_first(weight, in_dims[1], B)
    pre = torch.bmm(x.reshape(B, -1, x.shape[-1]), w.transpose(1, 2))
    if bias is not None:
        pre = pre + _batch_first(bias, in_dims[2], B).unsqueeze(1)
    out = torch.nn.functional.leaky_relu(pre, negative_slope) if negative_slope != 1.0 else pre
    return out.reshape(*x.shape[:-1], w.shape[1]), 0


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
        return _batch_norm_backward(ctx, grad_output)


class BatchNormTransformFunction(torch.autograd.Function):
    """BatchNormFunction in the form torch.func's transforms require (forward without ctx, then
    setup_context; a vmap rule generated from the ops' own), with a forward-mode rule (jvp) for
    jvp/jacfwd/hessian and torch.autograd.forward_ad. Not the default: its apply() costs ~50 us
    more (torch binds the arguments with inspect.signature), and torch.compile cannot trace a
    Function with a jvp. fastbn.functional uses it only while a transform or a dual level is
    active."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, momentum, eps):
        return batch_norm_op(input, weight, bias, running_mean, running_var, training, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _, _, _, training, _, eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight, mean, invstd)
        ctx.training = training
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_output, grad_mean, grad_invstd):
        return _batch_norm_backward(ctx, grad_output)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, *_):
        return _batch_norm_jvp(ctx, input_t, weight_t, bias_t), None, None


def _function_then_count(input, weight, bias, running_mean, running_var, training, momentum, eps,
                         num_batches_tracked):
    out = BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum, eps)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return out


# BatchNormFunction.apply as a C++ autograd node (csrc/eager_calls.cpp: BatchNormFunction) for eager
# steps: neither recording the node nor its backward enters Python (benchmarks/autograd_nodes.py).
# A module's num_batches_tracked, when given, is counted in the same call.
batch_norm_autograd = _eager_first("batch_norm_autograd", _C.eager.batch_norm_autograd, _function_then_count)


def _batch_norm_backward(ctx, grad_output):
    # (csrc/eager_calls.cpp: BatchNormFunction::backward makes the same choices)
    input, weight, mean, invstd = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable too
        grads = batch_norm_backward_differentiable(grad_output, input, weight, mean, invstd, ctx.training, ctx.eps)
        return tuple(g if need else None for g, need in zip(grads, (need_input, need_weight, need_bias))) + (
            None, None, None, None, None)
    grad_input = grad_weight = grad_bias = None
    sum_dy = sum_dy_xmu = None
    if ctx.training and need_input:  # the common case: every gradient, in one fused op
        grad_input, grad_weight, grad_bias = batch_norm_backward_op(grad_output, input, mean, invstd, weight)
        return (grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None,
                None, None, None, None, None)
    if need_weight or need_bias or (need_input and ctx.training):
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = batch_norm_backward_reduce_op(
            grad_output, input, mean, invstd, weight
        )
    if need_input:
        grad_input = batch_norm_backward_input_op(
            grad_output, input, mean, invstd, weight,
            sum_dy if ctx.training else None, sum_dy_xmu if ctx.training else None,
        )
    return (grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None,
            None, None, None, None, None)


def _channel_axes(input):
    """(the dims reduced over per channel, the shape that broadcasts a (C,) vector over input)."""
    return [d for d in range(input.dim()) if d != 1], [-1 if d == 1 else 1 for d in range(input.dim())]


def _batch_norm_jvp(ctx, input_t, weight_t, bias_t):
    # forward mode (jvp, jacfwd, hessian), in torch ops:
    #   dy = weight * invstd * (dx - mean(dx) - x_hat * mean(dx * x_hat)) + dweight * x_hat + dbias
    # (training; in eval the statistics are constants: dy = weight * invstd * dx + ...)
    input, weight, mean, invstd = ctx.saved_tensors
    dims, shape = _channel_axes(input)
    acc = _acc_dtype(input.dtype)
    x_hat = (input.to(acc) - mean.to(acc).view(shape)) * invstd.to(acc).view(shape)
    terms = []  # one per tangent given (torch calls jvp only when there is at least one)
    if input_t is not None:
        dx = input_t.to(acc)
        if ctx.training:
            dx = dx - dx.mean(dims, keepdim=True) - x_hat * (dx * x_hat).mean(dims, keepdim=True)
        scale = invstd.to(acc).view(shape) if weight is None else (weight.to(acc) * invstd.to(acc)).view(shape)
        terms.append(scale * dx)
    if weight_t is not None:
        terms.append(weight_t.to(acc).view(shape) * x_hat)
    if bias_t is not None:
        terms.append(bias_t.to(acc).view(shape).expand_as(x_hat))
    return sum(terms[1:], terms[0]).to(input.dtype)


def batch_norm_backward_differentiable(grad_output, input, weight, mean, invstd, training, eps):
    """(grad_input, grad_weight, grad_bias) in torch ops, for double backward (create_graph=True),
    which the kernels do not record. The maths of batch_norm_backward, with the batch statistics
    recomputed from the input so that their own dependence on it is differentiated too (the saved
    mean and invstd are the kernels' outputs, constants to autograd)."""
    dims, shape = _channel_axes(input)
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
        out = linear_leaky_relu_op(input, weight, bias, negative_slope)
        return out, out
    pre = linear_leaky_relu_op(input, weight, bias, 1.0)  # identity: the pre-activation
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
        return _linear_leaky_relu_backward(ctx, grad_output)


class LinearLeakyReLUTransformFunction(torch.autograd.Function):
    """LinearLeakyReLUFunction in the form torch.func's transforms require (see
    BatchNormTransformFunction). A negative slope returns the pre-activation as a second,
    non-differentiable output: setup_context sees only inputs and outputs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, negative_slope):
        out, saved = linear_leaky_relu_forward(input, weight, bias, negative_slope)
        return (out,) if saved is out else (out, saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _, negative_slope = inputs
        if len(output) > 1:
            ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(input, weight, output[-1])
        ctx.save_for_forward(input, weight, output[-1])
        ctx.negative_slope = negative_slope

    @staticmethod
    def backward(ctx, grad_output, *grad_saved):
        return _linear_leaky_relu_backward(ctx, grad_output)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _):
        out_t = _linear_leaky_relu_jvp(ctx, input_t, weight_t, bias_t)
        return (out_t,) if ctx.negative_slope >= 0 else (out_t, None)


# LinearLeakyReLUFunction.apply as a C++ autograd node (csrc/eager_calls.cpp) for eager steps
linear_leaky_relu_autograd = _eager_first("linear_leaky_relu_autograd", _C.eager.linear_leaky_relu_autograd,
                                          LinearLeakyReLUFunction.apply)


def _linear_leaky_relu_backward(ctx, grad_output):
    # (csrc/eager_calls.cpp: LinearLeakyReLUFunction::backward makes the same choices)
    input, weight, saved = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: the same maths in torch ops, so that it is recorded
        grad_pre = _through_activation(grad_output, saved, ctx.negative_slope)
        grad_bias = grad_pre.reshape(-1, weight.shape[0]).sum(0)
    elif need_input and need_weight:  # the common case: one op
        grad_input, grad_weight, grad_bias = linear_leaky_relu_backward_op(
            grad_output, input, weight, saved, ctx.negative_slope)
        return grad_input, grad_weight, grad_bias if need_bias else None, None
    else:
        grad_pre, grad_bias = leaky_relu_backward_bias_op(grad_output, saved, ctx.negative_slope)
    # torch.mm, not `@`: Tensor.__matmul__ is a Python wrapper (~2 us a call at the MLP's last layers);
    # 2D inputs, the usual case, need no reshape
    if grad_pre.dim() != 2:
        grad_pre = grad_pre.reshape(-1, weight.shape[0])
    grad_input = grad_weight = None
    if need_input:
        grad_input = torch.mm(grad_pre, weight).view(input.shape)
    if need_weight:
        grad_weight = torch.mm(grad_pre.t(), input if input.dim() == 2 else input.reshape(-1, weight.shape[1]))
    return grad_input, grad_weight, grad_bias if need_bias else None, None


def _linear_leaky_relu_jvp(ctx, input_t, weight_t, bias_t):
    # forward mode: d(pre) = dx @ W.T + x @ dW.T + db, through the activation's slope
    input, weight, saved = ctx.saved_tensors
    terms = []  # one per tangent given
    if input_t is not None:
        terms.append(input_t @ weight.t())
    if weight_t is not None:
        terms.append(input @ weight_t.t())
    if bias_t is not None:
        terms.append(bias_t.expand_as(saved))
    return _through_activation(sum(terms[1:], terms[0]), saved, ctx.negative_slope)


def _through_activation(t, saved, negative_slope):
    # t times LeakyReLU's derivative at the pre-activation, whose sign `saved` has
    return torch.where(saved > 0, t, t * negative_slope)
