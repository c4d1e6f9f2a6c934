"""The study's models, on fastbn layers or, with backend="torch", on the torch builtins."""
from fastbn.models.convnet import ConvNet
from fastbn.models.mlp import MLP

BACKENDS = ("fastbn", "torch")

__all__ = ["MLP", "ConvNet", "BACKENDS"]
