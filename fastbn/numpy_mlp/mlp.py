import numpy as np

from fastbn.numpy_mlp.modules import LeakyReLUModule, LinearModule, SoftMaxModule


class MLP:
    """Linear -> LeakyReLU for each hidden layer, then Linear -> SoftMax (outputs probabilities)."""

    def __init__(self, n_inputs, n_hidden, n_classes, neg_slope, seed=42, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.layers = []
        n_in = n_inputs
        for n_out in n_hidden:
            self.layers += [LinearModule(n_in, n_out, rng, dtype), LeakyReLUModule(neg_slope)]
            n_in = n_out
        self.layers += [LinearModule(n_in, n_classes, rng, dtype), SoftMaxModule()]

    @property
    def linear_layers(self):
        return [m for m in self.layers if isinstance(m, LinearModule)]

    def forward(self, x):
        for m in self.layers:
            x = m.forward(x)
        return x

    def backward(self, dout, need_input_grad=False):
        """Backpropagates dL/d(probabilities), filling every LinearModule's grads. The gradient
        with respect to the input is computed (and returned) only if asked for."""
        for i in range(len(self.layers) - 1, 0, -1):
            dout = self.layers[i].backward(dout)
        return self.layers[0].backward(dout, need_input_grad=need_input_grad)


class SGD:
    """Plain SGD, p <- p - lr * dL/dp, in place, through preallocated scratch buffers."""

    def __init__(self, model, learning_rate):
        self.model, self.learning_rate = model, learning_rate
        self._scratch = {}

    def step(self):
        for m in self.model.linear_layers:
            for k, p in m.params.items():
                tmp = self._scratch.get((id(m), k))
                if tmp is None:
                    tmp = self._scratch[(id(m), k)] = np.empty_like(p)
                np.multiply(m.grads[k], self.learning_rate, out=tmp)
                p -= tmp


def sgd_step(model, learning_rate):
    """One plain SGD step without scratch buffers (for one-off use; SGD for a training loop)."""
    for m in model.linear_layers:
        for k, p in m.params.items():
            p -= learning_rate * m.grads[k]
