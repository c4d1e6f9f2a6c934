"""Fused Linear + LeakyReLU against F.leaky_relu(F.linear(...)) in float64, gradcheck, opcheck,
compile, errors, and the nn module's compatibility with nn.Linear."""
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import fastbn
from fastbn import functional as F
from conftest import CUDA, DEVICES, RANDOM_SHAPES, dtypes_for

REL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

SHAPES = [  # (input shape, out_features)
    ((200, 3072), 100),   # the MLP's first layer
    ((200, 100), 10),
    ((1, 7), 5),          # batch 1
    ((9, 1), 4),          # one input feature
    ((6, 5), 1),          # one output feature
    ((2, 3, 4, 13), 11),  # extra leading dims
    ((0, 4), 3),          # empty batch
]
SLOPES = [0.0, 0.01, 0.2, 1.0, -0.3]


def reference(x, w, b, slope):
    return TF.leaky_relu(TF.linear(x, w, b), slope)


def assert_rel(actual, expected, dtype, what, scale):
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= REL[dtype] * max(scale, 1e-6), f"{what}: error {err:.3g}, scale {scale:.3g} ({dtype})"


CASES = [(shape, n_out, slope, bias, dtype, device)
         for device in ("cpu", "cuda")
         for dtype in dtypes_for(device)
         for shape, n_out in SHAPES
         for slope in SLOPES
         for bias in (True, False)]


def make_case(shape, n_out, bias, dtype, device):
    n_in = shape[-1]
    x = torch.randn(shape, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(n_out, n_in, dtype=torch.float64) / n_in ** 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(n_out, dtype=torch.float64).to(device, dtype).requires_grad_() if bias else None
    return x, w, b


def check_against_torch(x, w, b, slope):
    """The fused op's output and gradients against leaky_relu(linear(...)) in float64, from the same
    (rounded) inputs."""
    dtype, n_out, n_in, bias = x.dtype, w.shape[0], w.shape[1], b is not None
    y = F.linear_leaky_relu(x, w, b, slope)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if bias else None
    y_ref = reference(xr, wr, br, slope)
    assert y.dtype == dtype and y.shape == y_ref.shape

    # Rounding grows with the reduction length: scale each check by the size of its terms.
    scale_out = (xr.abs() @ wr.abs().t()).max().item() + (br.abs().max().item() if bias else 0) if y.numel() else 1
    assert_rel(y, y_ref, dtype, "output", scale_out)
    # Where the pre-activation is within rounding of 0 its sign (and so the slope applied) is a
    # coin toss in low precision: no gradient flows from those elements in this comparison.
    z64 = TF.linear(xr, wr, br).detach()
    g = torch.randn_like(y_ref).masked_fill(z64.abs() <= 2 * REL[dtype] * scale_out, 0).to(dtype)
    inputs, ref_inputs = (x, w) + ((b,) if bias else ()), (xr, wr) + ((br,) if bias else ())
    grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, g.double(), allow_unused=True)
    gabs = g.double().abs()
    scales = [(gabs.reshape(-1, n_out) @ wr.abs()).max().item() if g.numel() else 1,
              (gabs.reshape(-1, n_out).t() @ xr.abs().reshape(-1, n_in)).max().item() if g.numel() else 1,
              gabs.reshape(-1, n_out).sum(0).max().item() if g.numel() else 1]
    for name, a, e, s in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads_ref, scales):
        assert a.shape == e.shape and a.dtype == dtype
        assert_rel(a, e, dtype, name, s)


@pytest.mark.parametrize(
    "shape,n_out,slope,bias,dtype,device",
    [pytest.param(*c, marks=pytest.mark.skipif(c[-1] == "cuda" and not CUDA, reason="needs CUDA")) for c in CASES],
)
def test_matches_torch_float64(shape, n_out, slope, bias, dtype, device):
    check_against_torch(*make_case(shape, n_out, bias, dtype, device), slope)


# ---- random shapes (hypothesis): leading dims, feature counts, slopes, bias or none, every dtype


@st.composite
def linear_cases(draw, device):
    lead = draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))
    n_in, n_out = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    slope = draw(st.one_of(st.sampled_from(SLOPES), st.floats(-2, 2, allow_nan=False, width=32)))
    return (*lead, n_in), n_out, slope, draw(st.booleans()), draw(st.sampled_from(dtypes_for(device))), \
        draw(st.integers(0, 2 ** 31 - 1))


@pytest.mark.parametrize("device", DEVICES)
@RANDOM_SHAPES
@given(data=st.data())
def test_random_shapes_match_torch(device, data):
    shape, n_out, slope, bias, dtype, seed = data.draw(linear_cases(device))
    torch.manual_seed(seed)
    check_against_torch(*make_case(shape, n_out, bias, dtype, device), slope)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slope", [0.02, 0.0, -0.5])
def test_gradcheck_and_double_backward_float64(device, slope):
    # create_graph=True records the backward in torch ops, so that it can be differentiated again
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: F.linear_leaky_relu(x, w, b, slope), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: F.linear_leaky_relu(x, w, b, slope), (x, w, b))

    def second_order(fn):
        grads = torch.autograd.grad(fn(x, w, b, slope).pow(3).sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (x, w, b))

    for ours, ref in zip(second_order(F.linear_leaky_relu), second_order(reference)):
        assert_rel(ours, ref, torch.float64, "second derivative", ref.abs().max().item())


def test_compiled_backward_runs_the_kernels():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    model = fastbn.nn.LinearLeakyReLU(12, 8, negative_slope=0.02)
    torch.compile(model, fullgraph=True, backend=backend)(torch.randn(6, 12)).square().sum().backward()
    assert "torch.ops.fastbn.leaky_relu_backward_bias.default" in "\n".join(g.code for g in backend.bw_graphs)


@pytest.mark.parametrize("device", DEVICES)
def test_skips_unrequested_gradients(device):
    x = torch.randn(8, 5, device=device)  # no grad: the input gradient is not computed
    lin = fastbn.nn.LinearLeakyReLU(5, 3, device=device)
    lin.bias.requires_grad_(False)
    lin(x).sum().backward()
    assert x.grad is None and lin.bias.grad is None and lin.weight.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slope", [0.02, -0.5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "x+bias", "weight+bias", "x+weight+bias"])
def test_only_the_gradients_asked_for(device, slope, bias, wanted):
    # Each combination of gradients asked for, with and without bias, against torch in float64
    x = torch.randn(3, 7, 5, dtype=torch.float64, device=device)
    w, b = torch.randn(4, 5, dtype=torch.float64, device=device), torch.randn(4, dtype=torch.float64, device=device)

    def run(fn):
        args = {name: None if t is None else t.clone().requires_grad_(name in wanted.split("+"))
                for name, t in (("x", x), ("weight", w), ("bias", b if bias else None))}
        y = fn(args["x"], args["weight"], args["bias"], slope)
        if not y.requires_grad:
            return None
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y))
        return {name: None if t is None else t.grad for name, t in args.items()}

    ours, ref = run(F.linear_leaky_relu), run(reference)
    assert (ours is None) == (ref is None)
    for name in ours or {}:
        assert (ours[name] is None) == (ref[name] is None), name
        if ref[name] is not None:
            assert_rel(ours[name], ref[name], torch.float64, name, ref[name].abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slope", [0.02, -0.5])
def test_no_grad_path_matches_autograd_path(device, slope):
    # Without a graph to record the op is called directly (no autograd node): same output.
    x = torch.randn(9, 5, device=device)
    w, b = torch.randn(4, 5, device=device), torch.randn(4, device=device)
    with torch.no_grad():
        y_plain = F.linear_leaky_relu(x, w.requires_grad_(), b, slope)
    assert y_plain.grad_fn is None
    y_graph = F.linear_leaky_relu(x, w, b, slope)
    assert y_graph.grad_fn is not None
    assert torch.equal(y_plain, y_graph.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(7, 6, device=device, dtype=dtype)
        w = torch.randn(4, 6, device=device, dtype=dtype)
        b = torch.randn(4, device=device, dtype=dtype)
        for args in [(x, w, b, 0.01), (x.reshape(7, 2, 3).transpose(1, 2).reshape(7, 6), w, None, 0.2)]:
            torch.library.opcheck(torch.ops.fastbn.linear_leaky_relu.default, args)
        y = torch.ops.fastbn.linear_leaky_relu(x, w, b, 0.01)
        torch.library.opcheck(torch.ops.fastbn.leaky_relu_backward_bias.default, (torch.randn_like(y), y, 0.01))
        x3 = torch.randn(2, 7, 6, device=device, dtype=dtype)
        y3 = torch.ops.fastbn.linear_leaky_relu(x3, w, b, 0.01)
        torch.library.opcheck(torch.ops.fastbn.linear_leaky_relu_backward.default,
                              (torch.randn_like(y3), x3, w, y3, 0.01))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,out_features,slope", [((7, 6), 4, 0.01), ((2, 7, 6), 4, -0.3), ((200, 100), 10, 0.01),
                                                      ((64, 300), 129, 0.2)])
def test_backward_op_matches_torch(threads, shape, out_features, slope):
    """fastbn::linear_leaky_relu_backward (activation gradient with the bias sum, then both GEMMs;
    on 2 CPU threads the small GEMMs run side by side, one a thread) against the same maths in
    torch ops, float64."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(out_features, shape[-1], dtype=torch.float64)
    b = torch.randn(out_features, dtype=torch.float64)
    pre = TF.linear(x, w, b)
    saved = TF.leaky_relu(pre, slope) if slope >= 0 else pre  # what the Function keeps
    g = torch.randn_like(pre)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        # as the autograd engine calls it: grad mode off, inputs that require grad; the side-by-side
        # GEMMs' worker thread must record nothing either
        with torch.no_grad():
            gi, gw, gb = torch.ops.fastbn.linear_leaky_relu_backward(g, x.requires_grad_(), w.requires_grad_(),
                                                                     saved, slope)
    finally:
        torch.set_num_threads(old)
    assert not any(t.requires_grad or t.grad_fn is not None for t in (gi, gw, gb))
    x, w = x.detach(), w.detach()
    grad_pre = torch.where(pre > 0, g, g * slope).reshape(-1, out_features)
    torch.testing.assert_close(gi, (grad_pre @ w).view(shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, grad_pre.t() @ x.reshape(-1, shape[-1]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, grad_pre.sum(0), rtol=1e-12, atol=1e-12)
    assert gi.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape


def test_backward_op_rejects_mismatched_saved():
    x, w = torch.randn(5, 6), torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="expected the saved activation of shape"):
        torch.ops.fastbn.linear_leaky_relu_backward(torch.randn(5, 3), x, w, torch.randn(5, 3), 0.01)
    with pytest.raises(RuntimeError, match="has in_features=6 but weight"):
        torch.ops.fastbn.linear_leaky_relu_backward(torch.randn(5, 4), x, torch.randn(4, 7), torch.randn(5, 4), 0.01)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastbn.nn.LinearLeakyReLU(12, 8, negative_slope=0.02), torch.nn.Linear(8, 3))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(5, 12)
    torch.testing.assert_close(compiled(x), model(x))
    ga = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    gb = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_module_loads_nn_linear_state_both_ways():
    lin = torch.nn.Linear(10, 4)
    ours = fastbn.nn.LinearLeakyReLU(10, 4, negative_slope=0.1)
    assert set(ours.state_dict()) == set(lin.state_dict())
    ours.load_state_dict(lin.state_dict())
    x = torch.randn(3, 10)
    torch.testing.assert_close(ours(x), TF.leaky_relu(lin(x), 0.1))
    back = torch.nn.Linear(10, 4)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.weight, lin.weight)
    assert "negative_slope=0.1" in repr(ours)


def test_module_initialisation_matches_nn_linear():
    torch.manual_seed(3)
    a = torch.nn.Linear(30, 20)
    torch.manual_seed(3)
    b = fastbn.nn.LinearLeakyReLU(30, 20)
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(4, 5), torch.randn(3, 6), None), "in_features=5"),
        (lambda: (torch.randn(4, 5), torch.randn(3, 5, 1), None), "weight of shape \\(out_features, in_features\\)"),
        (lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(4)), "bias of shape \\[3\\]"),
        (lambda: (torch.randn(4, 5), torch.randn(3, 5, dtype=torch.float64), None), "weight of dtype Float"),
        (lambda: (torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, dtype=torch.float64)), "bias of dtype Float"),
        (lambda: (torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (3, 5)), None), "floating point input"),
        (lambda: (torch.tensor(1.0), torch.randn(3, 1), None), "0-dim"),
    ],
)
def test_bad_input_raises_clear_error(make, match):
    x, w, b = make()
    with pytest.raises(RuntimeError, match=match):
        F.linear_leaky_relu(x, w, b)


def test_non_float_slope_raises_clear_error():
    with pytest.raises(TypeError, match="linear_leaky_relu: expected negative_slope to be a float, got NoneType"):
        F.linear_leaky_relu(torch.randn(4, 5), torch.randn(3, 5), None, negative_slope=None)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_wrong_device():
    with pytest.raises(RuntimeError, match="same device"):
        F.linear_leaky_relu(torch.randn(4, 5, device="cuda"), torch.randn(3, 5), None)
