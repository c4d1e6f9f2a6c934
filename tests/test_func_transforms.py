"""torch.func transforms (grad, vjp, vmap, jacrev, per-sample gradients, jvp, jacfwd, hessian)
and forward-mode AD over fastbn's modules give what they give over torch's: the drop-ins must not
break functional training code."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import fastbn
import fastbn.functional as F
from conftest import DEVICES

D = torch.float64


def assert_trees_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def torch_twin(module):
    """The torch module fastbn's subclasses, with the same parameters and buffers."""
    twin = copy.deepcopy(module)
    twin.__class__ = type(module).__mro__[2]  # fastbn.nn.BatchNorm1d -> (_BatchNormForward, torch.nn.BatchNorm1d)
    assert twin.__class__.__module__.startswith("torch.nn")
    return twin


@pytest.mark.parametrize("argnums", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_grad_of_batch_norm_matches_torch(argnums, device):
    bn = fastbn.nn.BatchNorm1d(5, track_running_stats=False, dtype=D, device=device)
    ref = torch_twin(bn)
    x = torch.randn(7, 5, dtype=D, device=device)

    def loss(module):
        return lambda p, x: functional_call(module, p, (x,)).pow(3).sum()

    ours = grad(loss(bn), argnums=argnums)(dict(bn.named_parameters()), x)
    theirs = grad(loss(ref), argnums=argnums)(dict(ref.named_parameters()), x)
    if argnums == 0:
        assert_trees_close(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_with_buffers_updates_running_stats_as_torch(device):
    bn = fastbn.nn.BatchNorm2d(3, momentum=None, dtype=D, device=device)
    ref = torch_twin(bn)
    x = torch.randn(5, 3, 4, 4, dtype=D, device=device)
    grads, buffers = [], []
    for module in (bn, ref):
        bufs = {k: v.clone() for k, v in module.named_buffers()}
        grads.append(grad(lambda p, b: functional_call(module, (p, b), (x,)).pow(2).sum())(
            dict(module.named_parameters()), bufs))
        buffers.append(bufs)
    assert_trees_close(*grads)
    assert_trees_close(*buffers)
    assert buffers[0]["num_batches_tracked"].item() == 1


@pytest.mark.parametrize("in_dim", [0, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_training_batch_norm_is_one_batch_norm_per_call(in_dim, channels_last, device):
    B, shape = 3, (6, 4, 5, 5)
    xs = torch.randn(B, *shape, dtype=D, device=device)
    calls = [x.contiguous(memory_format=torch.channels_last) if channels_last else x for x in xs]
    w, b = torch.rand(4, dtype=D, device=device) + 0.5, torch.randn(4, dtype=D, device=device)
    out = vmap(lambda x: F.batch_norm(x, None, None, w, b, training=True), in_dims=in_dim)(xs.movedim(0, in_dim))
    expected = torch.stack([torch.nn.functional.batch_norm(x, None, None, w, b, training=True) for x in calls])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("in_dim", [0, 1])  # 1: running stats (C, B), not contiguous per call
@pytest.mark.parametrize("device", DEVICES)
def test_vmap_updates_each_calls_own_running_stats(in_dim, device):
    B, C = 3, 4
    xs = torch.randn(B, 8, C, dtype=D, device=device)
    rm, rv = torch.randn(B, C, dtype=D, device=device), torch.rand(B, C, dtype=D, device=device) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    rm_in, rv_in = (rm, rv) if in_dim == 0 else (rm.t().clone(), rv.t().clone())
    out = vmap(lambda x, m, v: F.batch_norm(x, m, v, training=True, momentum=0.3), in_dims=(0, in_dim, in_dim))(
        xs, rm_in, rv_in)
    expected = torch.stack([torch.nn.functional.batch_norm(xs[i], rm_ref[i], rv_ref[i], training=True, momentum=0.3)
                            for i in range(B)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(rm_in if in_dim == 0 else rm_in.t(), rm_ref)
    torch.testing.assert_close(rv_in if in_dim == 0 else rv_in.t(), rv_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_eval_batch_norm_and_per_call_weights(device):
    bn = fastbn.nn.BatchNorm1d(4, dtype=D, device=device).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    xs = torch.randn(5, 6, 4, 3, dtype=D, device=device)
    torch.testing.assert_close(vmap(bn)(xs), torch.stack([torch_twin(bn)(x) for x in xs]))
    ws = torch.rand(5, 4, dtype=D, device=device) + 0.5  # a weight per call, the input shared
    out = vmap(lambda w: F.batch_norm(xs[0], None, None, w, None, training=True))(ws)
    torch.testing.assert_close(out, torch.stack([torch.nn.functional.batch_norm(xs[0], None, None, w, None, True)
                                                 for w in ws]))


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_errors_name_the_problem(device):
    x = torch.randn(3, 8, 4, device=device)
    with pytest.raises(RuntimeError, match="running stats shared by the batch"):
        vmap(fastbn.nn.BatchNorm1d(4, device=device))(x)
    with pytest.raises(ValueError, match=r"weight of shape \(4,\) in each vmapped call .* got \(5,\)"):
        vmap(lambda w: F.batch_norm(x[0], None, None, w, None, training=True))(torch.ones(3, 5, device=device))
    with pytest.raises(ValueError, match=r"running_mean of shape \(4,\) in each vmapped call .* got \(3,\)"):
        vmap(lambda m, v: F.batch_norm(x[0], m, v, training=True))(torch.zeros(3, 3, device=device),
                                                                   torch.ones(3, 3, device=device))
    with pytest.raises(ValueError, match=r"each vmapped input to be \(N, C, \*\)"):
        vmap(lambda v: F.batch_norm(v, None, None, training=True))(torch.randn(3, 4, device=device))


@pytest.mark.parametrize("slope", [0.1, 0.0, -0.3])
@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients_of_linear_leaky_relu(slope, device):
    layer = fastbn.nn.LinearLeakyReLU(5, 3, negative_slope=slope, dtype=D, device=device)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 3, dtype=D, device=device), torch.nn.LeakyReLU(slope))
    ref[0].load_state_dict(layer.state_dict())
    xs = torch.randn(7, 5, dtype=D, device=device)

    def per_sample(module, params):
        loss = lambda p, x: functional_call(module, p, (x.unsqueeze(0),)).pow(2).sum()
        return vmap(grad(loss), in_dims=(None, 0))(params, xs)

    ours = per_sample(layer, dict(layer.named_parameters()))
    theirs = per_sample(ref, dict(ref.named_parameters()))
    assert_trees_close(ours, {k.removeprefix("0."): v for k, v in theirs.items()})


@pytest.mark.parametrize("device", DEVICES)
def test_jacrev_matches_torch_first_and_second_order(device):
    layer = fastbn.nn.LinearLeakyReLU(5, 3, negative_slope=-0.3, dtype=D, device=device)
    x = torch.randn(2, 5, dtype=D, device=device)
    ref = lambda x: torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, layer.weight, layer.bias), -0.3)
    torch.testing.assert_close(jacrev(layer)(x), jacrev(ref)(x))
    bn = fastbn.nn.BatchNorm1d(3, track_running_stats=False, dtype=D, device=device)
    twin = torch_twin(bn)
    x = torch.randn(4, 3, dtype=D, device=device)
    torch.testing.assert_close(jacrev(bn)(x), jacrev(twin)(x))
    cube = lambda m: (lambda x: m(x).pow(3).sum())
    torch.testing.assert_close(jacrev(jacrev(cube(bn)))(x), jacrev(jacrev(cube(twin)))(x))


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_over_an_ensemble_of_layers(device):
    W, b = torch.randn(4, 3, 5, dtype=D, device=device), torch.randn(4, 3, dtype=D, device=device)
    x = torch.randn(7, 5, dtype=D, device=device)
    out = vmap(lambda w, b: F.linear_leaky_relu(x, w, b, 0.2))(W, b)
    torch.testing.assert_close(out, torch.stack([torch.nn.functional.leaky_relu(x @ w.T + c, 0.2) for w, c in zip(W, b)]))


def assert_forward_mode_matches(module, reference, reference_params, x):
    """jacfwd and hessian in the input and jvp in the parameters, of module and of
    reference(x, params)."""
    theirs = lambda x: reference(x, reference_params)
    torch.testing.assert_close(jacfwd(module)(x), jacfwd(theirs)(x))
    cube = lambda f: (lambda x: f(x).pow(3).sum())
    torch.testing.assert_close(hessian(cube(module))(x), hessian(cube(theirs))(x))
    params = dict(module.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    torch.testing.assert_close(jvp(lambda p: functional_call(module, p, (x,)), (params,), (tangents,))[1],
                               jvp(lambda p: reference(x, p), (reference_params,), (tangents,))[1])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_batch_norm_matches_torch(training, device):
    bn = fastbn.nn.BatchNorm1d(3, track_running_stats=not training, dtype=D, device=device).train(training)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    if not training:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    twin = torch_twin(bn)
    assert_forward_mode_matches(bn, lambda x, p: functional_call(twin, p, (x,)), dict(twin.named_parameters()),
                                torch.randn(4, 3, dtype=D, device=device))


@pytest.mark.parametrize("slope", [0.1, 0.0, -0.3])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_linear_leaky_relu_matches_torch(slope, device):
    layer = fastbn.nn.LinearLeakyReLU(5, 3, negative_slope=slope, dtype=D, device=device)
    reference = lambda x, p: torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, p["weight"], p["bias"]), slope)
    assert_forward_mode_matches(layer, reference, dict(layer.named_parameters()),
                                torch.randn(2, 5, dtype=D, device=device))


@pytest.mark.parametrize("no_grad", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_dual_tensors_carry_their_tangent(no_grad, device):
    # torch.autograd.forward_ad: the tangent must come through even when nothing requires grad
    # (no affine parameters, or under no_grad), where the ops would otherwise be called directly
    x = torch.randn(6, 3, 2, dtype=D, device=device)
    t = torch.randn_like(x)
    bn = fastbn.nn.BatchNorm1d(3, affine=False, track_running_stats=False, dtype=D, device=device)
    layer = fastbn.nn.LinearLeakyReLU(2, 4, negative_slope=0.2, dtype=D, device=device).requires_grad_(False)
    twin_layer = lambda x: torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, layer.weight, layer.bias), 0.2)
    for ours, theirs in ((bn, torch_twin(bn)), (layer, twin_layer)):
        tangents = []
        for module in (ours, theirs):
            with fwAD.dual_level(), torch.set_grad_enabled(not no_grad):
                tangents.append(fwAD.unpack_dual(module(fwAD.make_dual(x, t))).tangent)
        assert tangents[0] is not None
        torch.testing.assert_close(*tangents)
