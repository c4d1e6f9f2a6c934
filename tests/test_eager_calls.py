"""The typed entry points (fastbn._C.eager, csrc/eager_calls.cpp) that fastbn/ops.py calls instead of
torch.ops where nothing needs torch.ops: the same results and the same dispatch, and torch.ops
wherever __torch_function__ must see the call. Likewise the C++ autograd nodes that eager training
steps record instead of the Python autograd Functions: the same bits, and the Functions wherever
torch.compile or __torch_function__ needs them."""
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


# ---- the C++ autograd nodes (csrc/eager_calls.cpp) that eager training steps record -----------

BN_NODE = "torch::autograd::CppNode<fastbn::BatchNormFunction>"
LINEAR_NODE = "torch::autograd::CppNode<fastbn::LinearLeakyReLUFunction>"


def _subsets(names):
    return [[n for i, n in enumerate(names) if mask >> i & 1] for mask in range(1, 2 ** len(names))]


def _node_against_function(node, function, make_args, create_graph):
    """Run `node` and `function` (the autograd Function it stands for) on the same arguments, for
    every subset of the differentiable ones asking for gradients: the same output, gradients and
    in-place updates, to the bit; with create_graph, the same second derivatives too."""
    tensors = make_args()
    names = [i for i, t in enumerate(tensors[:3]) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for wanted in _subsets(names):
        results = []
        for apply in (node, function):
            args = [t.detach().clone().requires_grad_(i in wanted) if isinstance(t, torch.Tensor) else t
                    for i, t in enumerate(make_args())]
            out = apply(*args)
            leaves = [args[i] for i in wanted]
            dy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
            grads = torch.autograd.grad(out, leaves, dy, create_graph=create_graph)
            recorded = [g.requires_grad for g in grads]
            if create_graph and any(recorded):  # (a weight's gradient alone does not depend on it)
                grads += torch.autograd.grad(sum(g.square().sum() for g in grads), leaves, allow_unused=True)
            results.append((out, grads, recorded, [a for a in args if isinstance(a, torch.Tensor)]))
        (out, grads, recorded, args), (out_f, grads_f, recorded_f, args_f) = results
        assert torch.equal(out, out_f) and recorded == recorded_f, wanted
        assert create_graph or not any(recorded), wanted
        if create_graph and {0, 1} <= set(wanted):  # the input's gradient depends on the weight
            assert recorded[0], wanted
        for g, g_f in zip(grads, grads_f):
            assert (g is None) == (g_f is None) and (g is None or torch.equal(g, g_f)), wanted
        for a, a_f in zip(args, args_f):  # the running stats, updated in place alike
            assert torch.equal(a.detach(), a_f.detach()), wanted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("given", ["weight+bias", "weight", "bias", "none"])
def test_batch_norm_node_gives_the_bits_of_the_python_function(device, given, training, create_graph):
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(6, 4, 3, generator=gen), torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)

    def make_args():
        return (x.to(device), w.to(device) if "weight" in given else None, b.to(device) if "bias" in given else None,
                torch.zeros(4, device=device), torch.ones(4, device=device), training, 0.1, 1e-5)

    _node_against_function(_C.eager.batch_norm_autograd, fastbn.ops.BatchNormFunction.apply, make_args, create_graph)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("slope", [0.02, 0.0, 1.0, -0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_linear_leaky_relu_node_gives_the_bits_of_the_python_function(device, shape, bias, slope, create_graph):
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(shape, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)

    def make_args():
        return (x.to(device), w.to(device), b.to(device) if bias else None, slope)

    _node_against_function(_C.eager.linear_leaky_relu_autograd, fastbn.ops.LinearLeakyReLUFunction.apply,
                           make_args, create_graph)


def test_eager_steps_record_the_cpp_nodes_and_the_python_path_stays_where_needed():
    x = torch.randn(6, 5, requires_grad=True)
    bn, linear = fastbn.nn.BatchNorm1d(5), fastbn.nn.LinearLeakyReLU(5, 3)
    assert bn(x).grad_fn.name() == BN_NODE and linear(x).grad_fn.name() == LINEAR_NODE
    with _RecordFunction():  # __torch_function__ must see the call: the Python Functions
        assert type(bn(x).grad_fn).__name__ == "BatchNormFunctionBackward"
        assert type(linear(x).grad_fn).__name__ == "LinearLeakyReLUFunctionBackward"
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    # torch.compile traces the Python Functions (a pybind11 call would break the graph)
    backend = AotEagerAndRecordGraphs()
    y = torch.compile(torch.nn.Sequential(linear, fastbn.nn.BatchNorm1d(3)), fullgraph=True, backend=backend)(x)
    code = "\n".join(g.code for g in backend.fw_graphs)
    assert "torch.ops.fastbn.linear_leaky_relu.default" in code and "torch.ops.fastbn.batch_norm.default" in code
    assert y.grad_fn.name() not in (BN_NODE, LINEAR_NODE)


def test_compiled_autograd_traces_the_cpp_nodes():
    # The nodes declare is_traceable: compiled autograd (torch.compile of the backward) calls them
    # from one graph (fullgraph) and gets eager's gradients.
    from torch._dynamo import compiled_autograd

    x = torch.randn(6, 5, requires_grad=True)
    model = torch.nn.Sequential(fastbn.nn.LinearLeakyReLU(5, 4), fastbn.nn.BatchNorm1d(4))
    eager = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    y = model(x)
    assert y.grad_fn.name() == BN_NODE
    with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True)):
        y.square().sum().backward()
    assert len(graphs) == 1 and "BatchNormFunction" in graphs[0] and "LinearLeakyReLUFunction" in graphs[0]
    for p, g in zip([x, *model.parameters()], eager):
        assert torch.equal(p.grad, g)


def test_the_cpp_nodes_honour_saved_tensor_hooks_and_checkpointing():
    # torch.autograd.graph.saved_tensors_hooks (offloading, non-reentrant checkpointing) sees what
    # the nodes save, as it sees what the Python Functions save.
    x = torch.randn(6, 5, requires_grad=True)
    model = torch.nn.Sequential(fastbn.nn.LinearLeakyReLU(5, 4), fastbn.nn.BatchNorm1d(4))
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    # Linear: input, weight, output; BatchNorm: input, weight, mean, invstd
    assert packed == [(6, 5), (4, 5), (6, 4), (6, 4), (4,), (4,), (4,)]
    want = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])

    from torch.utils.checkpoint import checkpoint

    y = checkpoint(model, x, use_reentrant=False)
    assert y.grad_fn.name() == BN_NODE
    for got, w in zip(torch.autograd.grad(y.square().sum(), [x, *model.parameters()]), want):
        assert torch.equal(got, w)


def test_modules_count_each_training_batch_once_on_every_path():
    # num_batches_tracked counts every training forward once, as torch's modules do, whether the
    # eager step counts it inside the C++ call (csrc/eager_calls.cpp: count_batch) or beside the op,
    # and with the version bump of torch's add_.
    x = torch.randn(6, 4, requires_grad=True)

    def no_grad(m):
        with torch.no_grad():
            return m(x)

    def function_mode(m):  # the Python Function's path
        with _RecordFunction():
            return m(x)

    def dispatch_mode(m):  # the counter through add_, which the mode sees
        with _RecordDispatch() as mode:
            out = m(x)
        assert any(name.startswith("aten.add_") for name in mode.seen)
        return out

    compiled = {}

    def compile_(m):
        if id(m) not in compiled:
            compiled[id(m)] = torch.compile(m, backend="eager", fullgraph=True)
        return compiled[id(m)](x)

    for momentum in (0.1, None):
        # (momentum=None reads the count as a float: fullgraph cannot trace that, for torch's module either)
        steps = [lambda m: m(x), no_grad, function_mode, dispatch_mode, compile_ if momentum else no_grad,
                 lambda m: m.eval()(x), lambda m: m.train()(x)]
        ours, ref = fastbn.nn.BatchNorm1d(4, momentum=momentum), torch.nn.BatchNorm1d(4, momentum=momentum)
        for i, step in enumerate(steps):
            before = ours.num_batches_tracked._version, ref.num_batches_tracked._version
            step(ours), step(ref)
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item(), (momentum, i)
            assert ours.num_batches_tracked._version - before[0] == ref.num_batches_tracked._version - before[1]
            torch.testing.assert_close(ours.running_mean, ref.running_mean)
            torch.testing.assert_close(ours.running_var, ref.running_var)
        assert ours.num_batches_tracked.item() == 6  # every step but eval


@pytest.mark.parametrize("vectorize", [False, True])
def test_jacobian_and_hessian_through_the_cpp_nodes_match_torch(vectorize):
    # torch.autograd.functional differentiates the recorded nodes again (create_graph), batched
    # over the outputs with vectorize=True; float64, against torch's BatchNorm.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    w, b = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5, torch.randn(3, dtype=torch.float64, generator=gen)

    def ours(x):
        return fastbn.functional.batch_norm(x, None, None, w, b, training=True)

    def ref(x):
        return torch.nn.functional.batch_norm(x, None, None, w, b, training=True)

    assert ours(x.requires_grad_()).grad_fn.name() == BN_NODE
    jac, hess = torch.autograd.functional.jacobian, torch.autograd.functional.hessian
    torch.testing.assert_close(jac(ours, x, vectorize=vectorize), jac(ref, x))
    torch.testing.assert_close(hess(lambda x: ours(x).pow(3).sum(), x, vectorize=vectorize),
                               hess(lambda x: ref(x).pow(3).sum(), x))
