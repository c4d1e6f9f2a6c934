"""Modules with forward and backward, following the study's derivations (section 1.1).

Shapes: x (B, in_features); every backward takes dL/d(output) and returns dL/d(input).
Forward outputs are written into buffers kept between steps (no per-step allocation of large
arrays once the batch size is fixed).
"""
import numpy as np


def _check_2d(name, x, features=None):
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"{name}: expected a 2D array (batch, features), got {getattr(x, 'shape', type(x))}")
    if features is not None and x.shape[1] != features:
        raise ValueError(f"{name}: expected {features} features, got input of shape {x.shape}")


def _buffer(owner, name, shape, dtype):
    buf = owner.__dict__.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.empty(shape, dtype=dtype)
        owner.__dict__[name] = buf
    return buf


class LinearModule:
    """x @ W.T + b. dL/dW = dout.T @ x, dL/db = sum_batch(dout), dL/dx = dout @ W.

    W is (out_features, in_features), held in Fortran order: W.T is then a C-contiguous
    (in_features, out_features) array, the layout in which OpenBLAS runs both x @ W.T and
    dL/dW.T = x.T @ dout fastest (1.2x here against a C-ordered W at the MLP's 200x3072->100)."""

    def __init__(self, in_features, out_features, rng=None, dtype=np.float32, std=1e-4):
        rng = rng if rng is not None else np.random.default_rng(42)
        self.in_features, self.out_features = in_features, out_features
        self.params = {
            "weight": np.asfortranarray(rng.normal(0.0, std, size=(out_features, in_features)).astype(dtype)),
            "bias": np.zeros(out_features, dtype=dtype),
        }
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}  # in the params' memory order

    def forward(self, x):
        _check_2d("LinearModule.forward", x, self.in_features)
        self.x = x
        out = _buffer(self, "_out", (x.shape[0], self.out_features), self.params["weight"].dtype)
        np.matmul(x, self.params["weight"].T, out=out)
        out += self.params["bias"]
        return out

    def backward(self, dout, need_input_grad=True):
        """need_input_grad=False skips dL/dx (the first layer's: a third of the work) and returns None."""
        _check_2d("LinearModule.backward", dout, self.out_features)
        np.matmul(self.x.T, dout, out=self.grads["weight"].T)  # dL/dW.T, straight into W's layout
        np.sum(dout, axis=0, out=self.grads["bias"])
        if not need_input_grad:
            return None
        dx = _buffer(self, "_dx", self.x.shape, dout.dtype)
        np.matmul(dout, self.params["weight"], out=dx)
        return dx


class LeakyReLUModule:
    """max(0, x) + a * min(0, x); derivative 1 where x > 0, a elsewhere. Being positively
    homogeneous, the function is x times its derivative: forward and backward share that array."""

    def __init__(self, neg_slope):
        self.neg_slope = neg_slope

    def forward(self, x):
        _check_2d("LeakyReLUModule.forward", x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"LeakyReLUModule.forward: expected a floating point array, got {x.dtype}")
        # slope = 1 where x > 0, else a, as (not x > 0) * a + (x > 0): exact, and branch-free (a
        # masked copy or fill, np.copyto(where=) / np.putmask, costs ~5-25x as much on a random mask)
        positive = np.greater(x, 0, out=_buffer(self, "_positive", x.shape, np.bool_))
        rest = np.logical_not(positive, out=_buffer(self, "_rest", x.shape, np.bool_))
        self.slope = np.multiply(rest, x.dtype.type(self.neg_slope), out=_buffer(self, "_slope", x.shape, x.dtype))
        self.slope += positive
        return np.multiply(x, self.slope, out=_buffer(self, "_out", x.shape, x.dtype))

    def backward(self, dout):
        return np.multiply(dout, self.slope, out=_buffer(self, "_dx", dout.shape, dout.dtype))


class SoftMaxModule:
    """exp(x - max) / sum(exp(x - max)) per row (the max shift keeps exp finite);
    backward: dx = out * (dout - sum(dout * out)), i.e. dout @ (diag(out) - out out^T)."""

    def forward(self, x):
        _check_2d("SoftMaxModule.forward", x)
        out = _buffer(self, "_out", x.shape, x.dtype)
        np.subtract(x, x.max(axis=1, keepdims=True), out=out)
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        self.out = out
        return out

    def backward(self, dout):
        return self.out * (dout - np.sum(dout * self.out, axis=1, keepdims=True))


class CrossEntropyModule:
    """L = -mean_batch(sum(t * log(x))) for one-hot t; dL/dx = -t / x / B.
    Probabilities are floored at the dtype's smallest normal number, so a probability that
    underflowed to 0 gives a large finite loss instead of inf/NaN."""

    @staticmethod
    def _check(x, y):
        _check_2d("CrossEntropyModule", x)
        if y.shape != x.shape:
            raise ValueError(f"CrossEntropyModule: labels of shape {y.shape} do not match predictions {x.shape}")
        if not (np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)):
            raise ValueError("CrossEntropyModule: labels must be one-hot (one 1 per row, zeros elsewhere)")

    def forward(self, x, y):
        self._check(x, y)
        tiny = np.finfo(x.dtype).tiny
        return float(-np.sum(y * np.log(np.maximum(x, tiny))) / x.shape[0])

    def backward(self, x, y):
        self._check(x, y)
        tiny = np.finfo(x.dtype).tiny
        return -y / np.maximum(x, tiny) / x.shape[0]
