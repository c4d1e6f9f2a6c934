"""The study's BatchNorm on (B, C) input: batch statistics with the biased variance, no running
stats. Put beside csrc/cpu/kernels_impl.inc, the maths is line for line the same:

    mean  = x.mean(0)                      var = ((x - mean)^2).mean(0)
    x_hat = (x - mean) / sqrt(var + eps)   y   = gamma * x_hat + beta
    dgamma = sum(dy * x_hat)               dbeta = sum(dy)
    dx = gamma / sqrt(var + eps) * (dy - mean(dy) - x_hat * mean(dy * x_hat))
"""
import torch
from torch import nn
from torch.autograd.function import once_differentiable


def _check_input(x, n_neurons):
    if x.dim() != 2 or x.shape[1] != n_neurons:
        raise ValueError(f"expected input of shape (batch, {n_neurons}), got {tuple(x.shape)}")


class _BatchNormParams(nn.Module):
    """gamma = 1 and beta = 0 per neuron, as in the study."""

    def __init__(self, n_neurons, eps=1e-5):
        super().__init__()
        self.n_neurons = n_neurons
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(n_neurons))
        self.beta = nn.Parameter(torch.zeros(n_neurons))


class CustomBatchNormAutograd(_BatchNormParams):
    """BatchNorm whose backward is left to autograd (study, section 3.1)."""

    def forward(self, input):
        _check_input(input, self.n_neurons)
        mean = input.mean(0)
        var = input.var(0, unbiased=False)
        return self.gamma * (input - mean) / torch.sqrt(var + self.eps) + self.beta


class CustomBatchNormManualFunction(torch.autograd.Function):
    """BatchNorm with the hand-derived backward of the study's section 3.2. Use through
    `CustomBatchNormManualFunction.apply(input, gamma, beta, eps)`."""

    @staticmethod
    def forward(ctx, input, gamma, beta, eps=1e-5):
        mean = input.mean(0)
        invstd = 1.0 / torch.sqrt(input.var(0, unbiased=False) + eps)
        x_hat = (input - mean) * invstd
        ctx.save_for_backward(x_hat, gamma, invstd)
        return gamma * x_hat + beta

    @staticmethod
    @once_differentiable  # saved x_hat/invstd carry no graph: a second derivative would be silently wrong
    def backward(ctx, grad_output):
        x_hat, gamma, invstd = ctx.saved_tensors
        grad_input = grad_gamma = grad_beta = None
        if ctx.needs_input_grad[0]:
            grad_input = gamma * invstd * (
                grad_output - grad_output.mean(0) - x_hat * (grad_output * x_hat).mean(0)
            )
        if ctx.needs_input_grad[1]:
            grad_gamma = (grad_output * x_hat).sum(0)
        if ctx.needs_input_grad[2]:
            grad_beta = grad_output.sum(0)
        return grad_input, grad_gamma, grad_beta, None


class CustomBatchNormManualModule(_BatchNormParams):
    """The module around CustomBatchNormManualFunction (study, section 3.2c)."""

    def forward(self, input):
        _check_input(input, self.n_neurons)
        return CustomBatchNormManualFunction.apply(input, self.gamma, self.beta, self.eps)
