"""The layer factories behind the backend switch: the same model built from fastbn's ops or from
torch's builtins, so that the two can be cross-checked and benchmarked."""
from torch import nn

import fastbn


def check_backend(backend):
    if backend not in ("fastbn", "torch"):
        raise ValueError(f"backend must be 'fastbn' or 'torch', got {backend!r}")


def linear_leaky_relu(n_in, n_out, neg_slope, backend):
    if backend == "fastbn":
        return fastbn.nn.LinearLeakyReLU(n_in, n_out, negative_slope=neg_slope)
    return nn.Sequential(nn.Linear(n_in, n_out), nn.LeakyReLU(neg_slope))


def batch_norm(n, dims, backend):
    if backend == "fastbn":
        return fastbn.nn.BatchNorm1d(n) if dims == 1 else fastbn.nn.BatchNorm2d(n)
    return nn.BatchNorm1d(n) if dims == 1 else nn.BatchNorm2d(n)
