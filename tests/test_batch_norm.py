"""fastbn BatchNorm against torch (float64 reference), gradcheck, opcheck, compile, numerics, errors."""
import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given
from hypothesis import strategies as st

import fastbn
from fastbn import functional as F
from conftest import CUDA, DEVICES, RANDOM_SHAPES, dtypes_for

# Max error relative to the reference's largest magnitude, per dtype.
REL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

SHAPES = [
    (2, 3),            # N = 2
    (5, 1),            # C = 1
    (200, 1000),       # the MLP's BatchNorm1d
    (3, 7, 9),         # (N, C, L)
    (2, 7, 1, 1),      # H*W = 1
    (4, 3, 5, 5),      # odd sizes
    (2, 1, 96, 96),    # one channel, large H*W (several blocks per plane)
    (8, 16, 8, 8),
    (6, 41, 8, 8),     # 8x8 planes in groups of channels on the CPU (5 a group at 2 threads, the last alone)
    (3, 1000, 2, 3),   # many channels, tiny planes
    (40, 16, 12, 12),  # short planes: several runs per block, several blocks per channel
    (4, 64, 12, 12),   # channels_last: rows of whole cache lines, the minimum of 4 row chunks
    (40, 64, 15, 15),  # channels_last: 9 row chunks of an L2 block each, more than the threads
    (64, 3, 40, 40),   # few channels, large N*H*W: CUDA merges over 32 partials per channel
    (128, 40, 3, 3),   # short planes, threaded: walked as rows of C*S columns on the CPU
    (3, 24, 4, 4),     # 4x4 planes (one AVX-512 vector) at a small batch: walked as planes
    (32, 24, 4, 4),    # the same from N = 32: walked as rows
    (3, 6, 4, 5, 3),   # (N, C, D, H, W): BatchNorm3d, planar and channels_last_3d
    (17, 64, 32, 32),  # over 4 MiB of float32: planes in blocks, not whole-channel tasks (bfloat16: whole);
                       # channels_last rows walked one after the other, not in blocks of rows
]
# CUDA only: channels too large for the fused one-launch kernels, so the split reduction runs
# (short planes over several planes per block; rows merged from over 64 partials per channel;
# 11x11 planes, which the elementwise passes read as 16-byte vectors across plane boundaries).
CUDA_SPLIT_SHAPES = [(512, 8, 6, 6), (256, 32, 16, 16), (160, 4, 11, 11)]


def assert_rel_close(actual, expected, dtype, what, scale=None):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(scale or 0.0, expected.double().abs().max().item(), 1e-6)
    assert err / scale <= REL[dtype], f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def channels_last_format(ndim):
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def make_case(shape, dtype, device, channels_last=False, affine=True):
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=channels_last_format(len(shape)))
    pdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    w = b = None
    if affine:
        w = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, pdtype)
        b = torch.randn(C, dtype=torch.float64).to(device, pdtype)
    rm = torch.randn(C, dtype=torch.float64).to(device, pdtype)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, pdtype)
    return x, w, b, rm, rv


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def f64(t):
    return None if t is None else t.detach().double().requires_grad_(True)


CASES = [
    (shape, dtype, device, training, cl)
    for device in ["cpu", "cuda"]
    for dtype in (dtypes_for("cuda") if device == "cuda" else dtypes_for("cpu"))
    for shape in SHAPES + (CUDA_SPLIT_SHAPES if device == "cuda" else [])
    for training in (True, False)
    for cl in ((False, True) if len(shape) >= 4 else (False,))
]


def check_against_torch(x, w, b, rm, rv, training):
    """F.batch_norm's output, running stats and every gradient against torch's in float64, from the
    same (rounded) inputs; x in any layout, w and b None for affine=False."""
    dtype = x.dtype
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    xs, ws, bs = leaf(x), leaf(w), leaf(b)
    y = F.batch_norm(xs, rm, rv, ws, bs, training=training, momentum=0.1, eps=1e-5)
    xr, wr, br = f64(x), f64(w), f64(b)
    y_ref = TF.batch_norm(xr, rm_ref, rv_ref, wr, br, training=training, momentum=0.1, eps=1e-5)

    assert y.dtype == dtype and y.shape == x.shape
    if x.dim() >= 4 and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last_format(x.dim())):
        assert y.is_contiguous(memory_format=channels_last_format(x.dim()))
    assert torch.isfinite(y).all()
    assert_rel_close(y, y_ref, dtype, "output")
    assert_rel_close(rm, rm_ref, dtype, "running_mean")
    assert_rel_close(rv, rv_ref, dtype, "running_var")

    g = torch.randn_like(y_ref).to(dtype)
    mine = [t for t in (xs, ws, bs) if t is not None]
    refs = [t for t in (xr, wr, br) if t is not None]
    grads = torch.autograd.grad(y, mine, g)
    grads_ref = torch.autograd.grad(y_ref, refs, g.double())
    # Gradients are sums that can cancel to ~0 (N = 2, C = 1): measure each against the size of
    # its terms -- dy * weight * invstd for the input, sum |dy| (x_hat is O(1)) for the parameters.
    dims = [0] + list(range(2, x.dim()))
    var = xr.var(dims, unbiased=False) if training else rv.double()
    gain = (var + 1e-5).rsqrt() * (wr.abs() if wr is not None else 1)
    term_input = (g.double().abs().max() * gain.max()).item()
    term_params = g.double().abs().sum(dims).max().item()
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads_ref):
        assert a.dtype == (x.dtype if name == "grad_input" else w.dtype)
        assert_rel_close(a, e, dtype, name, scale=term_input if name == "grad_input" else term_params)


@pytest.mark.parametrize(
    "shape,dtype,device,training,channels_last",
    [pytest.param(*c, marks=pytest.mark.skipif(c[2] == "cuda" and not CUDA, reason="needs CUDA")) for c in CASES],
)
def test_functional_matches_torch_float64(shape, dtype, device, training, channels_last):
    check_against_torch(*make_case(shape, dtype, device, channels_last), training)


# ---- random shapes (hypothesis) -----------------------------------------------------------------
# The fixed shapes above name the paths we know of; these draw shapes at random on both sides of
# the kernels' switch points (rows or planes, short planes, line-aligned rows or not, calls past
# the CPU's 32768-value threading grain, planes longer than a 4096-value block, channels over the
# CUDA fused limit of 8192 values) in every layout: contiguous, channels_last, and strided views.

MAX_VALUES = 1 << 18  # per case: past the threading grain, and quick


@st.composite
def batch_norm_cases(draw, device):
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    # few samples or channels as often as many, so that long planes (several blocks each) come up
    N, C = (draw(st.one_of(st.integers(1, 8), st.integers(1, 300))) for _ in range(2))
    spatial = []
    for k in range(ndim - 2, 0, -1):  # k spatial sizes still to draw: keep the case under MAX_VALUES
        hi = max(1, min(100, int((MAX_VALUES // (N * C * math.prod(spatial))) ** (1 / k))))
        # the largest size allowed half the time, so that planes of several 4096-value blocks come up
        spatial.append(draw(st.one_of(st.integers(1, hi), st.just(hi))))
    shape = (N, C, *spatial)
    assume(math.prod(shape) <= MAX_VALUES)
    layout = draw(st.sampled_from(["contiguous", "strided"] + (["channels_last"] if ndim >= 4 else [])))
    dtype = draw(st.sampled_from(dtypes_for(device)))
    per_channel = N * math.prod(spatial)
    training = draw(st.booleans()) and per_channel > 1  # one value per channel is an error in training
    affine = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return shape, layout, dtype, training, affine, seed


def random_case(case, device):
    shape, layout, dtype, training, affine, seed = case
    torch.manual_seed(seed)
    x, w, b, rm, rv = make_case(shape, dtype, device, layout == "channels_last", affine)
    if layout == "strided":  # every other element of a tensor twice as long in its last dim
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64).to(device, dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
        assert not x.is_contiguous() or shape[-1] == 1
    return x, w, b, rm, rv, training


@pytest.mark.parametrize("device", DEVICES)
@RANDOM_SHAPES
@given(data=st.data())
def test_random_shapes_match_torch(device, data):
    check_against_torch(*random_case(data.draw(batch_norm_cases(device)), device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("spatial", [(4, 3), (3, 2, 3)])  # BatchNorm2d, BatchNorm3d
def test_module_matches_torch_over_steps(device, momentum, affine, track, channels_last, spatial):
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, device=device, dtype=torch.float64)
    kind = "BatchNorm2d" if len(spatial) == 2 else "BatchNorm3d"
    ours, ref = getattr(fastbn.nn, kind)(6, **kw), getattr(torch.nn, kind)(6, **kw)
    ref.load_state_dict(ours.state_dict())
    fmt = channels_last_format(2 + len(spatial)) if channels_last else torch.contiguous_format
    for step in range(4):
        ours.train(step < 3)
        ref.train(step < 3)
        x = (torch.randn(5, 6, *spatial, dtype=torch.float64, device=device) * (step + 1) + step)
        x = x.contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
        if affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)
    for (ka, va), (kb, vb) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_no_grad_path_matches_autograd_path(device, training):
    # Without a graph to record, functional.batch_norm calls the op directly (no autograd node):
    # the output and the running stats must be those of the autograd path, to the bit.
    x, w, b, rm, rv = make_case((16, 5, 3, 3), torch.float32, device)
    rm2, rv2 = rm.clone(), rv.clone()
    with torch.no_grad():
        y_plain = F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3)
    assert y_plain.grad_fn is None
    y_graph = F.batch_norm(x, rm2, rv2, leaf(w), leaf(b), training=training, momentum=0.3)
    assert y_graph.grad_fn is not None
    assert torch.equal(y_plain, y_graph.detach())
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("given", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "x+weight", "weight+bias", "x+weight+bias"])
def test_only_the_gradients_asked_for(device, training, given, wanted):
    # Each combination of parameters given and gradients asked for, against torch in float64; no
    # gradient where none was asked for (the backward honours ctx.needs_input_grad).
    x, w, b, rm, rv = make_case((6, 4, 3), torch.float64, device)
    w, b = (w if "weight" in given else None), (b if "bias" in given else None)

    def run(batch_norm, on):
        args = {name: None if t is None else t.detach().to(on, copy=True).requires_grad_(name in wanted.split("+"))
                for name, t in (("x", x), ("weight", w), ("bias", b))}
        stats = rm.to(on, copy=True), rv.to(on, copy=True)
        y = batch_norm(args["x"], *stats, args["weight"], args["bias"], training=training)
        if not y.requires_grad:
            return None
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=on).view_as(y))
        return {name: None if t is None else t.grad for name, t in args.items()}

    # the reference runs on the CPU: torch 2.11's CUDA batch_norm raises "tensor does not have a
    # device" when a bias but no weight is given and the bias needs a gradient
    ours, ref = run(F.batch_norm, device), run(TF.batch_norm, "cpu")
    assert (ours is None) == (ref is None)
    for name in ours or {}:
        assert (ours[name] is None) == (ref[name] is None), name
        if ref[name] is not None:
            assert_rel_close(ours[name].cpu(), ref[name], torch.float64, name)


def test_parametrized_weight_is_used():
    # The modules read parameters and buffers from nn.Module's dicts (cheaper than its
    # __getattr__); a parametrized weight is a property instead, and must still be the one used.
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    x = torch.randn(6, 3, dtype=torch.float64)
    outs = []
    for cls in (torch.nn.BatchNorm1d, fastbn.nn.BatchNorm1d):
        m = cls(3, dtype=torch.float64)
        torch.nn.init.uniform_(m.weight, 0.5, 1.5, generator=torch.Generator().manual_seed(0))
        parametrize.register_parametrization(m, "weight", Double())
        outs.append(m(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)


def test_batchnorm1d_on_3d_input_and_state_dict_both_ways():
    ref = torch.nn.BatchNorm1d(7)
    ref(torch.randn(4, 7, 5))  # some running stats
    ours = fastbn.nn.BatchNorm1d(7)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm1d(7)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.running_mean, ref.running_mean)
    x = torch.randn(4, 7, 5)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_convert_swaps_and_keeps_state():
    model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 3)), torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2), torch.nn.Flatten(1, 2),
        torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5)),
    )
    model(torch.randn(8, 3, 8, 8))  # move the running stats away from their init
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    expected = model(x)
    converted = fastbn.convert(model)
    assert isinstance(converted[2], fastbn.nn.BatchNorm3d)
    assert isinstance(converted[5], fastbn.nn.BatchNorm2d)
    assert isinstance(converted[6][2], fastbn.nn.BatchNorm1d)
    assert not converted[5].training
    torch.testing.assert_close(converted(x), expected)
    assert isinstance(fastbn.convert(torch.nn.BatchNorm2d(3)), fastbn.nn.BatchNorm2d)


def test_convert_lazy_batch_norm_only_once_initialised():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 1), torch.nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="LazyBatchNorm2d at '2' has not been initialised.*run one forward"):
        fastbn.convert(model)
    assert type(model[0]) is torch.nn.BatchNorm2d  # nothing converted halfway
    x = torch.randn(2, 3, 5, 5)
    model(x)  # now a torch.nn.BatchNorm2d of 4 features
    model.eval()
    expected = model(x)
    converted = fastbn.convert(model)
    assert isinstance(converted[0], fastbn.nn.BatchNorm2d)
    assert isinstance(converted[2], fastbn.nn.BatchNorm2d) and converted[2].num_features == 4
    torch.testing.assert_close(converted(x), expected)
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got OrderedDict"):
        fastbn.convert(model.state_dict())


# ---- gradcheck / opcheck / compile ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,training,channels_last,affine",
    [((6, 3), True, False, True), ((3, 4, 5), True, False, True), ((2, 3, 4, 5), True, True, True),
     ((2, 3, 4, 5), False, False, True), ((4, 3), True, False, False), ((2, 3, 2, 2), False, True, False),
     ((2, 3, 2, 3, 2), True, True, True)],
)
def test_gradcheck_and_double_backward_float64(device, shape, training, channels_last, affine):
    # Double backward (create_graph=True: gradient penalties, Hessian-vector products) records the
    # gradients too, so that differentiating them gives torch's second derivatives, not zeros.
    x, w, b, rm, rv = make_case(shape, torch.float64, device, channels_last, affine)
    x, w, b = leaf(x), leaf(w), leaf(b)
    inputs = (x, w, b) if affine else (x,)

    def fn(x, w=None, b=None):
        return F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)

    def second_order(batch_norm):
        y = batch_norm(x, rm.clone(), rv.clone(), *inputs[1:], training=training)
        grads = torch.autograd.grad(y.pow(3).sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)

    for ours, ref in zip(second_order(F.batch_norm), second_order(TF.batch_norm)):
        assert_rel_close(ours, ref, torch.float64, "second derivative")


def test_compiled_backward_runs_the_kernels():
    # The differentiable backward is for create_graph only: a compiled training step keeps the
    # fused kernel in its backward graph.
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), fastbn.nn.BatchNorm1d(8))
    torch.compile(model, fullgraph=True, backend=backend)(torch.randn(6, 12)).square().sum().backward()
    code = "\n".join(g.code for g in backend.bw_graphs)
    assert "torch.ops.fastbn.batch_norm_backward.default" in code and "rsqrt" not in code


def _sample_calls(device):
    x, w, b, rm, rv = make_case((4, 3, 5, 5), torch.float32, device)
    xc, *_ = make_case((4, 3, 5, 5), torch.float32, device, channels_last=True)
    x5, *_ = make_case((2, 3, 3, 2, 4), torch.float32, device, channels_last=True)
    x1, w1, b1, rm1, rv1 = make_case((8, 5), torch.float64, device)
    out = []
    for args in [(x, w, b, rm, rv, True, 0.1, 1e-5), (xc, w, b, rm, rv, False, 0.1, 1e-5),
                 (x5, w, b, rm, rv, True, 0.1, 1e-5),
                 (x1, None, None, None, None, True, 0.1, 1e-5), (x1, w1, b1, rm1, rv1, True, 0.3, 1e-3)]:
        out.append((torch.ops.fastbn.batch_norm.default, args))
        _, mean, invstd = torch.ops.fastbn.batch_norm(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        inp, weight = args[0], args[1]
        g = torch.randn_like(inp)
        out.append((torch.ops.fastbn.batch_norm_backward_reduce.default, (g, inp, mean, invstd, weight)))
        sdy, sdyxmu, _, _ = torch.ops.fastbn.batch_norm_backward_reduce(g, inp, mean, invstd, weight)
        out.append((torch.ops.fastbn.batch_norm_backward_input.default, (g, inp, mean, invstd, weight, sdy, sdyxmu)))
        out.append((torch.ops.fastbn.batch_norm_backward_input.default, (g, inp, mean, invstd, weight, None, None)))
        out.append((torch.ops.fastbn.batch_norm_backward.default, (g, inp, mean, invstd, weight)))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _sample_calls(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), fastbn.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10), fastbn.nn.BatchNorm1d(10),
        )

    eager, compiled_model = make(), make()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(4, 3, 6, 6)
    ya, yb = eager(x), compiled(x)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4, msg=n)
    torch.testing.assert_close(compiled_model[1].running_mean, eager[1].running_mean)
    torch.testing.assert_close(compiled_model[5].running_var, eager[5].running_var)


# ---- numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(256, 4), (8, 4, 16, 16)])
def test_large_mean_small_spread_float32(device, shape):
    x = (1e4 + torch.randn(shape, dtype=torch.float64)).float().to(device)
    y = F.batch_norm(x, None, None, training=True)
    y_ref = TF.batch_norm(x.double(), None, None, training=True)
    # float32 resolves ~1e-3 at 1e4, so storing the mean costs up to ~5e-4; a naive float sum
    # would be off by ~1e-2 here (torch's own float32 kernel: 1.3e-3 and 5e-4 on these cases)
    assert (y.double() - y_ref).abs().max().item() < 7e-4
    per_channel = y.double().transpose(0, 1).reshape(shape[1], -1)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(shape[1], dtype=torch.float64, device=device), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_channel_gives_bias_and_finite_grads(device):
    x = torch.randn(6, 3, 4, 4, device=device)
    x[:, 1] = 7.0
    x.requires_grad_()
    w = torch.ones(3, device=device, requires_grad=True)
    b = torch.tensor([0.0, 2.5, 0.0], device=device, requires_grad=True)
    y = F.batch_norm(x, None, None, w, b, training=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], 2.5))
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channels_last", [((8, 5), False), ((4, 3, 2, 2), False), ((4, 3, 2, 2), True),
                                                 ((3, 6, 7, 7), False)])
def test_eval_input_gradient_does_not_read_the_input(device, shape, channels_last):
    """In eval dx = dy * weight * invstd: an infinite input value leaves it finite, as in torch."""
    x = torch.randn(shape, device=device)
    x.view(-1)[3] = float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kind = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
    bn, ref = getattr(fastbn.nn, kind)(shape[1], device=device), getattr(torch.nn, kind)(shape[1], device=device)
    with torch.no_grad():
        for m in (bn, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
            m.running_var.copy_(torch.linspace(0.25, 4.0, shape[1]))
    bn.eval(), ref.eval()
    g = torch.randn_like(x)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    dx, = torch.autograd.grad(bn(xs), [xs], g)
    dx_ref, = torch.autograd.grad(ref(xr), [xr], g)
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channels_last", [((0, 3, 4, 4), False), ((0, 64, 4, 4), True), ((0, 1000), False)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(device, shape, channels_last, training):
    kind = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
    bn, ref = getattr(fastbn.nn, kind)(shape[1], device=device), getattr(torch.nn, kind)(shape[1], device=device)
    bn.train(training), ref.train(training)
    x = torch.randn(shape, device=device)
    if channels_last:  # rows: the three phases over no row chunks
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = bn(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.all(bn.weight.grad == 0)
    ref(x.detach())
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == int(training)


@pytest.mark.parametrize("shape,channels_last", [
    ((16, 8, 33, 17), False), ((40, 16, 12, 12), False), ((64, 3, 40, 40), False), ((4, 64, 12, 12), True),
    ((200, 1000), False), ((300, 64), False), ((128, 64, 2, 2), False), ((512, 7, 3, 3), False),
    ((64, 32, 5, 5), False), ((16, 512, 4, 4), False), ((40, 64, 15, 15), True), ((4096, 128), False),
    ((17, 64, 32, 32), False), ((17, 64, 32, 32), True), ((32, 64, 8, 8), False),
])
@pytest.mark.parametrize("training", [True, False])
def test_deterministic_across_thread_counts(shape, channels_last, training):
    """The same bits whatever the thread count (which also picks between the per-channel and the
    shared-blocks paths): outputs, updated running stats and every gradient; in eval too, where
    each task of the rows layout makes its own per-channel constants."""
    x, w, b, rm, rv = make_case(shape, torch.float32, "cpu", channels_last)
    g = torch.randn_like(x)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            xs, ws, bs, rms, rvs = leaf(x), leaf(w), leaf(b), rm.clone(), rv.clone()
            y = F.batch_norm(xs, rms, rvs, ws, bs, training=training)
            results.append((y, rms, rvs, *torch.autograd.grad(y, (xs, ws, bs), g)))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("shape,channels_last", [
    ((200, 1000), False), ((64, 37), False), ((4, 64, 12, 12), True), ((6, 41, 8, 8), False), ((8, 16, 33, 17), False),
])
def test_strided_per_channel_tensors(shape, channels_last, threads):
    """weight, bias and running stats given as every-other-element views: each thread reads and
    updates only its own channels' (the rows' merge phase), through the stride, and the results
    are those of contiguous copies to the bit, with the elements between untouched."""
    x, w, b, rm, rv = make_case(shape, torch.float32, "cpu", channels_last)
    g = torch.randn_like(x)

    def strided(t):  # t's values at the even elements of a buffer twice as long, the odd ones NaN
        wide = torch.full((2 * t.numel(),), float("nan"), dtype=t.dtype)
        wide[::2] = t
        return wide, wide[::2]

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for training in (True, False):
            wides, views = zip(*(strided(t) for t in (w, b, rm, rv)))
            ws, bs = (v.requires_grad_() for v in views[:2])
            xs, wc, bc, rmc, rvc = leaf(x), leaf(w), leaf(b), rm.clone(), rv.clone()
            y = F.batch_norm(xs, views[2], views[3], ws, bs, training=training)
            y_ref = F.batch_norm(xs, rmc, rvc, wc, bc, training=training)
            assert torch.equal(y, y_ref)
            assert torch.equal(views[2], rmc) and torch.equal(views[3], rvc)
            for wide in wides:
                assert torch.isnan(wide[1::2]).all()  # nothing written between the view's elements
            for a, e in zip(torch.autograd.grad(y, (xs, ws, bs), g), torch.autograd.grad(y_ref, (xs, wc, bc), g)):
                assert torch.equal(a, e)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 19, 4, 4), (3, 37, 4, 4), (31, 21, 4, 4), (5, 37, 8, 8), (40, 64, 8, 8)])
def test_planes_side_by_side_channels_independent(shape, dtype):
    """4x4 planes at batches under 32, and whole-channel tasks over planes of up to 512 bytes, are
    walked several channels at a time in memory order (cpu/kernels_impl.inc: planes_stats,
    planes_grad_sums; csrc/batch_norm_cpu.cpp: planes_side_by_side), each channel's sums as if
    alone: any run of channels, wherever it starts (a single channel takes the per-channel path),
    gives the bits of the same channels in the whole input (statistics, output, every gradient,
    eval's output)."""
    ops = torch.ops.fastbn
    x, w, b, rm, rv = make_case(shape, dtype, "cpu")
    g = torch.randn_like(x)

    def run(sl):
        xs, gs = x[:, sl].contiguous(), g[:, sl].contiguous()
        y, mean, invstd = ops.batch_norm(xs, w[sl], b[sl], None, None, True, 0.1, 1e-5)
        y_eval, _, _ = ops.batch_norm(xs, w[sl], b[sl], rm[sl], rv[sl], False, 0.1, 1e-5)
        return (y, mean, invstd, *ops.batch_norm_backward(gs, xs, mean, invstd, w[sl]), y_eval)

    whole = run(slice(None))
    for sl in (slice(0, 1), slice(5, 6), slice(3, 14), slice(shape[1] - 9, shape[1])):
        part = run(sl)
        for name, a, p in zip(("y", "mean", "invstd", "dx", "dweight", "dbias", "eval"), whole, part):
            assert torch.equal(a[:, sl] if a.dim() > 1 else a[sl], p), (name, sl)


@pytest.mark.parametrize("shape,dtype,n_small", [
    ((32, 64, 32, 32), torch.float32, 2),   # channels_last, rows of 256 bytes
    ((16, 64, 32, 32), torch.float64, 2),
    ((4096, 512), torch.float32, 256),      # BatchNorm1d, rows of 2 KB
])
def test_rows_from_memory_match_rows_in_cache(shape, dtype, n_small):
    """Float rows of inputs over 4 MiB are walked one after the other, smaller inputs' in blocks of
    rows (csrc/batch_norm_cpu.cpp: kFromMemoryBytes): the same bits. Given the statistics both
    passes are elementwise, so the first rows alone (in cache) must give the bits of the same rows
    of the whole (from memory): eval, and backward_input with its sums scaled by the ratio of the
    counts (a power of 2: exact)."""
    x, w, b, rm, rv = make_case(shape, dtype, "cpu", channels_last=len(shape) == 4)
    assert x.numel() * x.element_size() > 4 << 20 and x[:n_small].numel() * x.element_size() < 4 << 20
    y = F.batch_norm(x, rm, rv, w, b, training=False)
    assert torch.equal(y[:n_small], F.batch_norm(x[:n_small], rm, rv, w, b, training=False))

    ops = torch.ops.fastbn
    g = torch.randn_like(x)
    _, mean, invstd = ops.batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(g, x, mean, invstd, w)
    ratio = shape[0] // n_small
    dx = ops.batch_norm_backward_input(g, x, mean, invstd, w, sum_dy, sum_dy_xmu)
    dx_small = ops.batch_norm_backward_input(g[:n_small], x[:n_small], mean, invstd, w, sum_dy / ratio,
                                             sum_dy_xmu / ratio)
    assert torch.equal(dx[:n_small], dx_small)


def test_arbitrary_strides_are_accepted():
    base = torch.randn(4, 10, 6, 6)
    x = base[:, ::2, 1:, ::2]  # neither contiguous nor channels_last
    torch.testing.assert_close(F.batch_norm(x, None, None, training=True), TF.batch_norm(x, None, None, training=True))


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda: (torch.randn(5), None, None, None, None, True), "at least 2 dims"),
        (lambda: (torch.randn(4, 3), None, None, torch.randn(4), None, True), "weight of shape \\[3\\]"),
        (lambda: (torch.randn(4, 3), torch.zeros(4), torch.ones(3), None, None, True), "running_mean of shape"),
        (lambda: (torch.randn(4, 3), torch.zeros(3), torch.ones(3, 1), None, None, True), "running_var of shape"),
        (lambda: (torch.randn(4, 3), torch.zeros(3, dtype=torch.float64), torch.ones(3), None, None, True),
         "running_mean of dtype Float"),
        (lambda: (torch.randint(0, 5, (4, 3)), None, None, None, None, True), "floating point input"),
        (lambda: (torch.randn(1, 3), None, None, None, None, True), "more than 1 value per channel"),
        (lambda: (torch.randn(4, 3), None, None, None, None, False), "evaluation mode"),
        (lambda: (torch.randn(4, 3), torch.zeros(3), None, None, None, True), "both be given"),
        (lambda: (torch.randn(4, 3), torch.zeros(3, requires_grad=True), torch.ones(3), None, None, True),
         "must not require grad"),
        (lambda: (torch.randn(4, 3), torch.zeros(3), torch.ones(3, requires_grad=True), None, None, False),
         "must not require grad"),
    ],
)
def test_bad_input_raises_clear_error(make_args, match):
    x, rm, rv, w, b, training = make_args()
    with pytest.raises(RuntimeError, match=match):
        F.batch_norm(x, rm, rv, w, b, training=training)


@pytest.mark.parametrize("kw,match", [(dict(momentum=None), "momentum to be a float, got NoneType.*momentum=None"),
                                      (dict(eps="small"), "eps to be a float, got str")])
def test_functional_rejects_non_float_momentum_and_eps(kw, match):
    with pytest.raises(TypeError, match=match):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, **kw)


def test_module_rejects_wrong_ndim_like_torch():
    with pytest.raises(ValueError, match="expected 4D input"):
        fastbn.nn.BatchNorm2d(3)(torch.randn(2, 3, 4))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_tensors_on_different_devices():
    with pytest.raises(RuntimeError, match="expected weight on cuda"):
        F.batch_norm(torch.randn(4, 3, device="cuda"), None, None, torch.ones(3), None, training=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channels_last", [((64, 32, 9, 7), False), ((64, 32, 9, 7), True), ((300, 200), False),
                                                  ((4, 3, 400, 400), False), ((3000, 700), False),
                                                  ((3, 24, 4, 4), False), ((32, 64, 2, 2), False),
                                                  ((512, 8, 6, 6), False), ((256, 32, 16, 16), True),
                                                  ((160, 4, 11, 11), False)])
def test_fused_backward_equals_reduce_then_input(device, shape, channels_last):
    """batch_norm_backward (one region where channels fit in cache, three phases, or sums then
    dx) against the split ops, on shapes either side of the cache threshold and short planes."""
    x, w, b, rm, rv = make_case(shape, torch.float32, device, channels_last)
    _, mean, invstd = torch.ops.fastbn.batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
    g = torch.randn_like(x)
    dx, gw, gb = torch.ops.fastbn.batch_norm_backward(g, x, mean, invstd, w)
    sdy, sdyxmu, gw2, gb2 = torch.ops.fastbn.batch_norm_backward_reduce(g, x, mean, invstd, w)
    dx2 = torch.ops.fastbn.batch_norm_backward_input(g, x, mean, invstd, w, sdy, sdyxmu)
    torch.testing.assert_close(dx, dx2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gb2, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert dx.is_contiguous(memory_format=torch.channels_last)
