"""The NumPy MLP: every backward against central differences in float64, stability, training."""
import subprocess
import sys

import numpy as np
import pytest

from fastbn.numpy_mlp import MLP, SGD, CrossEntropyModule, LeakyReLUModule, LinearModule, SoftMaxModule

rng = np.random.default_rng(0)


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to every entry of x (in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)) + np.max(np.abs(b)), 1e-12)


def check_module(module, x, params=None):
    """dL/dx (and dL/dparams) of L = sum(forward(x) * w) against central differences."""
    w = rng.normal(size=module.forward(x).shape)

    def loss():
        return float(np.sum(module.forward(x) * w))

    loss()
    dx = module.backward(w).copy()
    assert rel_error(dx, numeric_grad(loss, x)) < 1e-6
    for name in params or []:
        loss()
        module.backward(w)
        analytic = module.grads[name].copy()
        assert rel_error(analytic, numeric_grad(loss, module.params[name])) < 1e-6, name


def test_linear_backward():
    m = LinearModule(7, 5, np.random.default_rng(1), dtype=np.float64, std=1.0)
    check_module(m, rng.normal(size=(4, 7)), ["weight", "bias"])
    assert m.params["weight"].shape == (5, 7) and m.params["bias"].shape == (5,)
    assert set(m.grads) == {"weight", "bias"}


def test_linear_init_is_the_studys():
    m = LinearModule(3072, 100, np.random.default_rng(0))
    assert m.params["weight"].dtype == np.float32
    assert abs(m.params["weight"].std() - 1e-4) < 5e-6 and np.all(m.params["bias"] == 0)


@pytest.mark.parametrize("slope", [0.0, 0.02, 0.5])
def test_leaky_relu_backward(slope):
    x = rng.normal(size=(6, 9))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    check_module(LeakyReLUModule(slope), x)


@pytest.mark.parametrize("slope", [-0.5, 0.0, 0.02, 1.0, 3.0])
def test_leaky_relu_is_its_definition_exactly(slope):
    # the definition, elementwise; the module computes x times its derivative, with no branch
    x = rng.normal(size=(7, 11)).astype(np.float32)
    x[0, :4] = [0.0, -0.0, np.inf, -np.inf]
    dout = rng.normal(size=x.shape).astype(np.float32)
    m = LeakyReLUModule(slope)
    a = np.float32(slope)
    with np.errstate(invalid="ignore"):  # slope 0: 0 * -inf is NaN in both
        np.testing.assert_array_equal(m.forward(x), np.where(x > 0, x, x * a))
    np.testing.assert_array_equal(m.backward(dout), np.where(x > 0, dout, dout * a))


def test_linear_takes_a_weight_in_either_memory_order():
    # W is kept in Fortran order for speed; a C-ordered W assigned by a user gives the same maths
    x, dout = rng.normal(size=(4, 7)), rng.normal(size=(4, 5))
    m = LinearModule(7, 5, np.random.default_rng(1), dtype=np.float64, std=1.0)
    assert m.params["weight"].flags.f_contiguous and m.grads["weight"].flags.f_contiguous
    w = m.params["weight"].copy(order="C")
    m.params["weight"] = w
    np.testing.assert_allclose(m.forward(x), x @ w.T, rtol=1e-12)
    np.testing.assert_allclose(m.backward(dout), dout @ w, rtol=1e-12)
    np.testing.assert_allclose(m.grads["weight"], dout.T @ x, rtol=1e-12)


def test_softmax_backward_and_stability():
    check_module(SoftMaxModule(), rng.normal(size=(5, 10)))
    out = SoftMaxModule().forward(np.array([[1e4, 1e4 - 1, 1e4 - 2]], dtype=np.float32))
    assert np.all(np.isfinite(out)) and abs(out.sum() - 1) < 1e-6 and out[0, 0] > out[0, 1] > out[0, 2]


def test_cross_entropy_backward_and_zero_probability():
    ce = CrossEntropyModule()
    y = np.eye(4)[[0, 2, 1]]
    x = rng.uniform(0.1, 1.0, size=(3, 4))
    g = ce.backward(x, y)
    assert rel_error(g, numeric_grad(lambda: ce.forward(x, y), x)) < 1e-6
    x0 = np.array([[0.0, 1.0, 0.0, 0.0]], dtype=np.float32)  # the true class's probability underflowed
    y0 = np.eye(4, dtype=np.float32)[[0]]
    assert np.isfinite(ce.forward(x0, y0)) and np.all(np.isfinite(ce.backward(x0, y0)))


def test_mlp_end_to_end_gradient():
    model = MLP(6, [5, 4], 3, 0.1, seed=3, dtype=np.float64)
    for m in model.linear_layers:
        m.params["weight"][...] = np.random.default_rng(4).normal(size=m.params["weight"].shape)
    x, y = rng.normal(size=(4, 6)), np.eye(3)[[0, 1, 2, 1]]
    ce = CrossEntropyModule()

    def loss():
        return ce.forward(model.forward(x), y)

    out = model.forward(x)
    dx = model.backward(ce.backward(out, y), need_input_grad=True)
    assert rel_error(dx, numeric_grad(loss, x)) < 1e-6
    for m in model.linear_layers:
        out = model.forward(x)
        model.backward(ce.backward(out, y))
        for k in ("weight", "bias"):
            assert rel_error(m.grads[k].copy(), numeric_grad(loss, m.params[k])) < 1e-6


def test_training_on_separable_data_learns():
    r = np.random.default_rng(5)
    centers = r.normal(0, 3, size=(3, 20)).astype(np.float32)
    labels = r.integers(0, 3, 600)
    x = (centers[labels] + r.normal(size=(600, 20))).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[labels]
    model = MLP(20, [16], 3, 0.02, seed=1)
    for m in model.linear_layers:  # the study's 1e-4 init needs many steps; this test wants few
        m.params["weight"][...] = np.random.default_rng(2).normal(0, 0.1, m.params["weight"].shape)
    opt, ce = SGD(model, 0.1), CrossEntropyModule()
    losses = []
    for step in range(300):
        i = np.arange(step * 50, step * 50 + 50) % 600
        out = model.forward(x[i])
        losses.append(ce.forward(out, y[i]))
        model.backward(ce.backward(out, y[i]))
        opt.step()
    acc = np.mean(model.forward(x).argmax(1) == labels)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]) and acc > 0.9


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: LinearModule(4, 2).forward(np.zeros((3, 5), np.float32)), "expected 4 features"),
        (lambda: LinearModule(4, 2).forward(np.zeros(4, np.float32)), "2D array"),
        (lambda: LeakyReLUModule(0.02).forward(np.ones((2, 3), np.int64)), "floating point"),
        (lambda: CrossEntropyModule().forward(np.full((2, 3), 1 / 3), np.array([[1, 0, 0], [1, 1, 0]])), "one-hot"),
        (lambda: CrossEntropyModule().forward(np.full((2, 3), 1 / 3), np.array([[0.5, 0.5, 0], [1, 0, 0]])), "one-hot"),
        (lambda: CrossEntropyModule().backward(np.full((2, 3), 1 / 3), np.eye(4)[:2]), "do not match"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_runs_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, fastbn.numpy_mlp as m, fastbn.data\n"
            "net = m.MLP(8, [4], 2, 0.02); print(net.forward(np.zeros((3, 8), np.float32)).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "(3, 2)" in out.stdout
