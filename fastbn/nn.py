"""Modules: drop-ins for torch.nn.BatchNorm1d/2d/3d and a fused nn.Linear + nn.LeakyReLU.

They subclass the torch modules they replace, so parameters, buffers, state_dict keys,
initialisation and isinstance checks are torch's; only forward runs fastbn's kernels."""
import torch

from fastbn import functional as F


def _lookup(module, store, name):
    # What nn.Module.__getattr__ finds, read from its dict directly: that lookup costs ~1.5 us an
    # attribute, and a small BatchNorm's kernel ~15 us. An attribute that is not there (e.g. a
    # parametrized weight, which becomes a property) goes through getattr as usual.
    return store[name] if name in store else getattr(module, name)


class _BatchNormForward:
    # torch's _BatchNorm.forward, calling fastbn.functional.batch_norm.
    def forward(self, input):
        self._check_input_dim(input)
        params, buffers = self._parameters, self._buffers
        running_mean, running_var = _lookup(self, buffers, "running_mean"), _lookup(self, buffers, "running_var")
        factor = 0.0 if self.momentum is None else self.momentum
        counter = None  # counted by the functional, in the op's own call where it can
        if self.training and self.track_running_stats:
            counter = _lookup(self, buffers, "num_batches_tracked")
            if counter is not None and self.momentum is None:  # cumulative moving average: needs the new count
                counter.add_(1)
                factor = 1.0 / float(counter)
                counter = None
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        keep_running = not self.training or self.track_running_stats
        return F._batch_norm(
            input,
            running_mean if keep_running else None,
            running_var if keep_running else None,
            _lookup(self, params, "weight"), _lookup(self, params, "bias"), use_batch_stats, factor, self.eps,
            counter,
        )


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn kernels: input (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn kernels: input (N, C, D, H, W), contiguous or channels_last_3d."""


class LinearLeakyReLU(torch.nn.Linear):
    """nn.Linear followed by nn.LeakyReLU(negative_slope), fused. Same weight/bias (shape,
    initialisation, state_dict keys) as nn.Linear, so a trained nn.Linear loads into it."""

    def __init__(self, in_features, out_features, bias=True, negative_slope=0.01, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.negative_slope = negative_slope

    def forward(self, input):
        params = self._parameters
        return F.linear_leaky_relu(input, _lookup(self, params, "weight"), _lookup(self, params, "bias"),
                                   self.negative_slope)

    def extra_repr(self):
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}"


_SWAPS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d}
_LAZY = (torch.nn.LazyBatchNorm1d, torch.nn.LazyBatchNorm2d, torch.nn.LazyBatchNorm3d)


def _swap(module):
    new_cls = _SWAPS.get(type(module))
    if new_cls is None:
        return module
    p = module.weight if module.weight is not None else module.running_mean
    new = new_cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats,
                  device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
    new.load_state_dict(module.state_dict())
    new.train(module.training)
    if module.affine:  # keep requires_grad choices (e.g. frozen BN)
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    return new


def _swap_all(model):
    swapped = _swap(model)
    if swapped is not model:
        return swapped
    for name, child in model.named_children():
        setattr(model, name, _swap_all(child))
    return model


def convert(model):
    """Replace every torch.nn.BatchNorm1d/2d/3d in `model` (in place, and returned) by fastbn's,
    carrying parameters, buffers and train/eval mode over. Returns the new module when `model`
    itself is a BatchNorm. A LazyBatchNorm1d/2d/3d is converted once a forward has initialised it;
    before, convert raises (and changes nothing) rather than leave it torch's."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastbn.convert: expected a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, _LAZY):  # it becomes a torch.nn.BatchNorm*d at its first forward
            where = f" at {name!r}" if name else ""
            raise ValueError(f"fastbn.convert: the {type(m).__name__}{where} has not been initialised "
                             "(its number of features is set by the first forward); run one forward through the "
                             "model, then convert")
    return _swap_all(model)
