"""The study's three Python BatchNorms: against torch, gradcheck, needs_input_grad, and the
kernels checked against them."""
import pytest
import torch
import torch.nn.functional as TF

import fastbn
from fastbn.reference import CustomBatchNormAutograd, CustomBatchNormManualFunction, CustomBatchNormManualModule


@pytest.mark.parametrize("cls", [CustomBatchNormAutograd, CustomBatchNormManualModule])
def test_modules_match_torch_batch_stats(cls):
    m = cls(7).double()
    with torch.no_grad():
        m.gamma.copy_(torch.rand(7) + 0.5)
        m.beta.copy_(torch.randn(7))
    x = torch.randn(16, 7, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = m(x)
    y_ref = TF.batch_norm(x2, None, None, m.gamma, m.beta, training=True, eps=m.eps)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x2, g)[0])


def test_manual_function_gradcheck_and_needs_input_grad():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(4, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, b: CustomBatchNormManualFunction.apply(x, g, b, 1e-5), (x, gamma, beta))
    # only the gradients asked for are computed
    calls = {}
    orig = CustomBatchNormManualFunction.backward

    def spy(ctx, grad):
        calls["needs"] = ctx.needs_input_grad
        return orig(ctx, grad)

    CustomBatchNormManualFunction.backward = staticmethod(spy)
    try:
        y = CustomBatchNormManualFunction.apply(x.detach(), gamma, beta.detach(), 1e-5)
        grads = torch.autograd.grad(y.sum(), gamma)
    finally:
        CustomBatchNormManualFunction.backward = staticmethod(orig)
    assert calls["needs"][:3] == (False, True, False) and grads[0].shape == (4,)


def test_manual_function_refuses_double_backward():
    # its saved x_hat and invstd carry no graph, so a second derivative would come out wrong
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    gamma, beta = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y = CustomBatchNormManualFunction.apply(x, gamma, beta, 1e-5)
    (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_reference_rejects_wrong_shape():
    with pytest.raises(ValueError, match="expected input of shape \\(batch, 5\\)"):
        CustomBatchNormManualModule(5)(torch.randn(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_the_reference(dtype):
    ref = CustomBatchNormManualModule(300).to(dtype)
    with torch.no_grad():
        ref.gamma.copy_(torch.rand(300) + 0.5)
        ref.beta.copy_(torch.randn(300))
    ours = fastbn.nn.BatchNorm1d(300, track_running_stats=False).to(dtype)
    ours.weight.data.copy_(ref.gamma.data)
    ours.bias.data.copy_(ref.beta.data)
    x = torch.randn(64, 300, dtype=dtype) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ya, yb, **tol)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa, ours.weight, ours.bias], g)
    gb = torch.autograd.grad(yb, [xb, ref.gamma, ref.beta], g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **tol)
