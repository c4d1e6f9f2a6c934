import torch
from torch import nn

from fastbn.models.layers import batch_norm, check_backend, linear_leaky_relu


class MLP(nn.Module):
    """The study's MLP: hidden layers of Linear + LeakyReLU (fused into one fastbn op), optional
    BatchNorm1d after each, and a final Linear to the class scores (softmax is in the loss).

    Weights N(0, weight_std^2) and zero biases when weight_std is given (the study's NumPy MLP
    used 1e-4); otherwise torch's default initialisation.
    """

    def __init__(self, n_inputs, n_hidden, n_classes, neg_slope, batch_norm_layers=False,
                 backend="fastbn", weight_std=None):
        super().__init__()
        check_backend(backend)
        self.n_inputs = n_inputs
        layers, n_in = [], n_inputs
        for n_out in n_hidden:
            layers.append(linear_leaky_relu(n_in, n_out, neg_slope, backend))
            if batch_norm_layers:
                layers.append(batch_norm(n_out, 1, backend))
            n_in = n_out
        layers.append(nn.Linear(n_in, n_classes))
        self.layers = nn.Sequential(*layers)
        if weight_std is not None:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, weight_std)
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        if x.dim() != 2 or x.shape[1] != self.n_inputs:
            x = x.reshape(x.shape[0], -1)
            if x.shape[1] != self.n_inputs:
                raise ValueError(f"MLP expects {self.n_inputs} input features per sample, got {x.shape[1]}")
        return self.layers(x)
