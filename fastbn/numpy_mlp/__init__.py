"""The study's NumPy MLP with hand-written backprop (seed report, sections 1.1-1.2).
NumPy only: no torch anywhere in this package."""
from fastbn.numpy_mlp.mlp import MLP, SGD, sgd_step
from fastbn.numpy_mlp.modules import CrossEntropyModule, LeakyReLUModule, LinearModule, SoftMaxModule

__all__ = ["LinearModule", "LeakyReLUModule", "SoftMaxModule", "CrossEntropyModule", "MLP", "SGD", "sgd_step"]
