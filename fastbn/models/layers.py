"""The layer factories behind the backend switch: the same model built from fastbn's ops or from
torch's builtins, so that the two can be cross-checked and benchmarked."""
from torch import nn
from torch.nn import functional as F

import fastbn


def check_backend(backend):
    if backend not in ("fastbn", "torch"):
        raise ValueError(f"backend must be 'fastbn' or 'torch', got {backend!r}")


class TorchLinearLeakyReLU(nn.Linear):
    """nn.Linear + F.leaky_relu with torch's builtin ops, named like fastbn.nn.LinearLeakyReLU
    so that state dicts move between the backends."""

    def __init__(self, in_features, out_features, negative_slope):
        super().__init__(in_features, out_features)
        self.negative_slope = negative_slope

    def forward(self, input):
        return F.leaky_relu(F.linear(input, self.weight, self.bias), self.negative_slope)


def linear_leaky_relu(n_in, n_out, neg_slope, backend):
    if backend == "fastbn":
        return fastbn.nn.LinearLeakyReLU(n_in, n_out, negative_slope=neg_slope)
    return TorchLinearLeakyReLU(n_in, n_out, neg_slope)


def batch_norm(n, dims, backend):
    if backend == "fastbn":
        return fastbn.nn.BatchNorm1d(n) if dims == 1 else fastbn.nn.BatchNorm2d(n)
    return nn.BatchNorm1d(n) if dims == 1 else nn.BatchNorm2d(n)
