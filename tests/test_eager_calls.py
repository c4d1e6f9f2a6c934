"""The typed entry points (fastbn._C.eager, csrc/eager_calls.cpp) that fastbn/ops.py calls instead of
torch.ops where nothing needs torch.ops: the same results and the same dispatch, and torch.ops
wherever __torch_function__ must see the call."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastbn
from fastbn import _C
from conftest import DEVICES

OPS = ("batch_norm", "batch_norm_backward_reduce", "batch_norm_backward_input", "batch_norm_backward",
       "linear_leaky_relu", "leaky_relu_backward_bias", "linear_leaky_relu_backward")


def _args(name, device):
    """Arguments for op `name`: a training-mode BatchNorm (its running stats updated in place) or a
    Linear + LeakyReLU, every optional argument given."""
    x = torch.randn(6, 5, 3, device=device)
    c = torch.ones(5, device=device)
    if name == "batch_norm":
        return (x, c * 1.5, c * 0.2, c * 0.0, c * 1.0, True, 0.1, 1e-5)
    if name.startswith("batch_norm_backward"):
        _, mean, invstd = torch.ops.fastbn.batch_norm(x, c, c, None, None, True, 0.1, 1e-5)
        args = (torch.randn_like(x), x, mean, invstd, c * 1.5)
        if name == "batch_norm_backward_input":  # training: with the per-channel sums
            args += tuple(torch.ops.fastbn.batch_norm_backward_reduce(*args)[:2])
        return args
    a, w, b = torch.randn(6, 4, device=device), torch.randn(3, 4, device=device), torch.randn(3, device=device)
    if name == "linear_leaky_relu":
        return (a, w, b, 0.02)
    out = torch.ops.fastbn.linear_leaky_relu(a, w, b, 0.02)
    if name == "leaky_relu_backward_bias":
        return (torch.randn_like(out), out, 0.02)
    return (torch.randn_like(out), a, w, out, 0.02)


def test_every_op_has_an_eager_call_and_a_test():
    ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastbn::")}
    assert ops == set(OPS)
    assert all(callable(getattr(_C.eager, name)) for name in OPS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_eager_call_gives_the_bits_of_torch_ops(name, device):
    args = _args(name, device)
    copies = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    got = getattr(_C.eager, name)(*args)
    want = getattr(torch.ops.fastbn, name).default(*copies)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)
    for a, c in zip(args, copies):  # in-place updates (the running stats) alike
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, c)


class _Recording:
    """A mode that notes the name of every function it sees, then runs it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def _run(self, func, args, kwargs):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _RecordDispatch(_Recording, TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._run(func, args, kwargs)


class _RecordFunction(_Recording, TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self._run(func, args, kwargs)


def _bn_step(x):
    m = fastbn.nn.BatchNorm1d(x.shape[1], device=x.device)
    return torch.autograd.grad(m(x).sum(), [x, m.weight])


def test_dispatch_modes_and_the_profiler_see_the_eager_calls():
    x = torch.randn(8, 5, requires_grad=True)
    with _RecordDispatch() as mode:
        _bn_step(x)
    assert "fastbn.batch_norm.default" in mode.seen and "fastbn.batch_norm_backward.default" in mode.seen
    with torch.profiler.profile() as prof:
        _bn_step(x)
    names = {e.key for e in prof.key_averages()}
    assert {"fastbn::batch_norm", "fastbn::batch_norm_backward"} <= names


def test_torch_function_modes_and_subclasses_see_the_ops():
    # __torch_function__ is handled by torch.ops alone: with a mode active or a subclass among the
    # arguments, fastbn must call the op through torch.ops, else the mode or subclass never sees it.
    x = torch.randn(8, 5, requires_grad=True)
    with _RecordFunction() as mode:
        grads = _bn_step(x)
    assert "fastbn.batch_norm.default" in mode.seen
    torch.testing.assert_close(grads, _bn_step(x))

    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    w, b = torch.ones(5), torch.zeros(5)
    out = fastbn.functional.batch_norm(x.detach().as_subclass(Logged), None, None, w, b, training=True)
    assert "fastbn.batch_norm.default" in seen and type(out) is Logged


def test_an_argument_of_the_wrong_type_gets_torch_ops_message():
    with pytest.raises(RuntimeError, match=r"Expected a value of type 'Optional\[Tensor\]' for argument 'weight'"):
        fastbn.functional.batch_norm(torch.randn(4, 3), None, None, [1.0, 2.0, 3.0], None, training=True)
