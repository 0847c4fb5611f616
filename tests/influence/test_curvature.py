import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_influence.influence.curvature import (
    exact_hessian,
    flat_hvp,
    flatten_params,
    gauss_newton_vector_product,
    hessian_vector_product,
    lanczos_extreme_eigenvalues,
    mean_loss_function,
    power_iteration,
    unflatten_vector,
)


def _mlp_problem(n: int = 40, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (n,))

    def loss_fn(m, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(m(xb), yb, reduction="none")

    names = [n for n, _ in net.named_parameters()]
    params = {k: v.detach() for k, v in net.named_parameters()}
    return net, (x, y), loss_fn, names, params


def _reference_hessian(net, data, loss_fn, params):
    names = list(params)
    flat0 = flatten_params(params)

    def f(flat):
        p = unflatten_vector(flat, params)
        return _mean(net, p, data)

    return torch.autograd.functional.hessian(f, flat0), names


def _mean(net, p, data):
    x, y = data
    logits = functional_call(net, p, (x,))
    return nn.functional.cross_entropy(logits, y)


def test_mean_loss_matches_module_and_batches():
    net, data, loss_fn, names, params = _mlp_problem()
    f = mean_loss_function(net, loss_fn, data, names, batch_size=7)
    assert torch.allclose(f(params), loss_fn(net, data).mean(), atol=1e-12)
    assert len(list(f.terms())) == math.ceil(40 / 7)
    assert torch.allclose(f.per_sample(params), loss_fn(net, data), atol=1e-12)


def test_hvp_and_exact_hessian_match_autograd_reference():
    net, data, loss_fn, names, params = _mlp_problem()
    ref, _ = _reference_hessian(net, data, loss_fn, params)
    f = mean_loss_function(net, loss_fn, data, names, batch_size=16)
    H = exact_hessian(f, params)
    assert torch.allclose(H, H.T)
    assert torch.allclose(H, ref, atol=1e-10, rtol=1e-8)

    torch.manual_seed(1)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    for mode in ("forward-over-reverse", "reverse-over-reverse"):
        hv = hessian_vector_product(f, params, unflatten_vector(v, params), mode=mode)
        assert torch.allclose(flatten_params(hv), ref @ v, atol=1e-10)
    op = flat_hvp(f, params)
    V = torch.randn(4, H.shape[0], dtype=torch.float64)
    assert torch.allclose(op(V), V @ ref, atol=1e-10)
    # float32 inputs come back as float32 (the operator casts to the parameters' dtype and back)
    assert op(v.float()).dtype == torch.float32


def test_partial_parameter_block_and_unknown_names():
    net, data, loss_fn, _, params = _mlp_problem()
    f = mean_loss_function(net, loss_fn, data, ["2.weight", "2.bias"])
    sub = {k: params[k] for k in ["2.weight", "2.bias"]}
    ref, _ = _reference_hessian(net, data, loss_fn, params)
    H = exact_hessian(f, sub)
    d = sub["2.weight"].numel() + sub["2.bias"].numel()
    assert torch.allclose(H, ref[-d:, -d:], atol=1e-10)
    with pytest.raises(ValueError, match="param_names"):
        mean_loss_function(net, loss_fn, data, ["nope.weight"])


def test_wrong_loss_shape_is_reported():
    net, data, loss_fn, names, params = _mlp_problem()
    f = mean_loss_function(net, lambda m, b: loss_fn(m, b).mean(), data, names, argname="train_loss")
    with pytest.raises(ValueError, match="train_loss.*one loss per sample"):
        f(params)


def test_gauss_newton_equals_hessian_for_logistic_regression_and_is_psd_for_mlp():
    torch.manual_seed(0)
    x = torch.randn(50, 4, dtype=torch.float64)
    y = (torch.rand(50) < 0.5).double()
    lin = nn.Linear(4, 1).double()
    names = ["weight", "bias"]
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def loss_fn(m, b):
        return nn.functional.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1], reduction="none")

    f = mean_loss_function(
        lin,
        loss_fn,
        (x, y),
        names,
        outputs_fn=lambda m, b: m(b[0]).squeeze(-1),
        loss_on_outputs=lambda o, b: nn.functional.binary_cross_entropy_with_logits(o, b[1], reduction="none"),
    )
    H = exact_hessian(f, params)
    G = flat_hvp(f, params, gauss_newton=True)(torch.eye(5, dtype=torch.float64))
    assert torch.allclose(G, H, atol=1e-12)

    net, data, loss_fn2, names2, params2 = _mlp_problem()
    fm = mean_loss_function(
        net,
        loss_fn2,
        data,
        names2,
        outputs_fn=lambda m, b: m(b[0]),
        loss_on_outputs=lambda o, b: nn.functional.cross_entropy(o, b[1], reduction="none"),
    )
    D = sum(p.numel() for p in params2.values())
    G2 = flat_hvp(fm, params2, gauss_newton=True)(torch.eye(D, dtype=torch.float64))
    assert torch.allclose(G2, G2.T, atol=1e-12)
    assert torch.linalg.eigvalsh(G2).min() > -1e-12
    # The plain-callable form agrees with the MeanLoss form.
    x2, y2 = data
    gv = gauss_newton_vector_product(
        lambda p: functional_call(net, p, (x2,)),
        lambda o: nn.functional.cross_entropy(o, y2),
        params2,
        unflatten_vector(torch.eye(D, dtype=torch.float64)[3], params2),
    )
    assert torch.allclose(flatten_params(gv), G2[3], atol=1e-12)
    with pytest.raises(ValueError, match="gauss_newton"):
        flat_hvp(lambda p: fm(p), params2, gauss_newton=True)


def test_lanczos_finds_extreme_eigenvalues_of_indefinite_hessian():
    net, data, loss_fn, names, params = _mlp_problem()
    ref, _ = _reference_hessian(net, data, loss_fn, params)
    # Random weights are far from a minimum: the Hessian is typically indefinite.
    evals = torch.linalg.eigvalsh(ref)
    f = mean_loss_function(net, loss_fn, data, names)
    op = flat_hvp(f, params)
    est = lanczos_extreme_eigenvalues(op, op.dim, n_iter=op.dim)
    assert est.converged
    assert est.largest == pytest.approx(float(evals[-1]), rel=1e-8)
    assert est.smallest == pytest.approx(float(evals[0]), abs=1e-8 * float(evals.abs().max()))
    assert est.negative_curvature == bool(evals[0] < -1e-6 * evals[-1])

    A = torch.diag(torch.linspace(0.1, 10.0, 300, dtype=torch.float64))
    est = lanczos_extreme_eigenvalues(lambda v: A @ v, 300, n_iter=60)
    # An eigenvalue lies within the Ritz residual of every Ritz value.
    assert abs(est.largest - 10.0) <= est.residual_largest + 1e-12
    assert est.largest == pytest.approx(10.0, rel=1e-4)
    assert not est.negative_curvature
    B = torch.diag(
        torch.cat([torch.linspace(-5.0, 5.0, 299, dtype=torch.float64), torch.tensor([10.0], dtype=torch.float64)])
    )
    lam, _, ok = power_iteration(lambda v: B @ v, 300, n_iter=500, tol=1e-12)
    assert ok and lam == pytest.approx(10.0, rel=1e-8)
