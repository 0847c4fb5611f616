"""Exact damped-Hessian influence estimates: the linear algebra and agreement with exact LOO refits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence.fragility.estimates import (
    collate_all,
    damped_inverse_scores,
    influence_function_estimates,
    influence_function_parts,
)


def _sq_loss(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (module(x).squeeze(-1) - y) ** 2


@pytest.fixture(scope="module")
def ridge():
    """Linear regression at its exact ridge optimum, with data for LOO refits in closed form."""
    torch.manual_seed(0)
    n, d, lam = 60, 4, 0.05
    x = torch.randn(n, d, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 0.3 * torch.randn(n, dtype=torch.float64)
    x_test = torch.randn(1, d, dtype=torch.float64)
    y_test = torch.tensor([1.5], dtype=torch.float64)

    def solve(keep: torch.Tensor) -> torch.Tensor:
        # argmin (1/m) sum (w.x - y)^2 + (lam/2) |w|^2  ->  (2/m X^T X + lam I) w = 2/m X^T y
        xs, ys = x[keep], y[keep]
        m = xs.shape[0]
        return torch.linalg.solve(2.0 / m * xs.T @ xs + lam * torch.eye(d, dtype=torch.float64), 2.0 / m * xs.T @ ys)

    w = solve(torch.ones(n, dtype=torch.bool))
    lin = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin, x, y, x_test, y_test, lam, solve


def test_damped_inverse_scores_match_a_linear_solve():
    torch.manual_seed(1)
    a = torch.randn(6, 6, dtype=torch.float64)
    h = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    g = torch.randn(9, 6, dtype=torch.float64)
    t = torch.randn(6, dtype=torch.float64)
    for lam in (0.0, 0.3):
        expected = g @ torch.linalg.solve(h + lam * torch.eye(6, dtype=torch.float64), t) / 9
        assert torch.allclose(damped_inverse_scores(h, g, t, n=9, damping=lam), expected, atol=1e-12)
    sweep = damped_inverse_scores(h, g, t, n=9, damping=[0.0, 0.3, 1.0])
    assert sweep.shape == (3, 9)
    assert torch.allclose(sweep[1], damped_inverse_scores(h, g, t, n=9, damping=0.3))


def test_singular_hessian_uses_the_pseudo_inverse():
    # A rank-deficient H (like softmax weights) with gradients inside its range: the pseudo-inverse is exact.
    torch.manual_seed(2)
    basis = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))[0]
    h = basis @ torch.diag(torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)) @ basis.T
    g = torch.randn(4, 3, dtype=torch.float64) @ basis.T
    t = torch.randn(3, dtype=torch.float64) @ basis.T
    expected = g @ torch.linalg.pinv(h) @ t / 4
    assert torch.allclose(damped_inverse_scores(h, g, t, n=4), expected, atol=1e-10)


def test_bad_shapes_and_damping_are_rejected():
    h = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="`train_grads`"):
        damped_inverse_scores(h, torch.zeros(2, 4), torch.zeros(3), n=2)
    with pytest.raises(ValueError, match="`damping`"):
        damped_inverse_scores(h, torch.zeros(2, 3), torch.zeros(3), n=2, damping=-1.0)
    with pytest.raises(FloatingPointError):
        damped_inverse_scores(h * float("nan"), torch.zeros(2, 3), torch.zeros(3), n=2)


def test_estimates_match_the_analytic_influence_of_least_squares(ridge):
    lin, x, y, x_test, y_test, lam, _ = ridge
    n = x.shape[0]
    w = lin.weight.detach().reshape(-1)
    scores = influence_function_estimates(lin, _sq_loss, (x, y), (x_test, y_test), damping=lam)
    h = 2.0 / n * x.T @ x + lam * torch.eye(4, dtype=torch.float64)
    g_train = 2.0 * (x @ w - y).unsqueeze(1) * x
    g_test = (2.0 * (x_test @ w - y_test).unsqueeze(1) * x_test).reshape(-1)
    expected = g_train @ torch.linalg.solve(h, g_test) / n
    assert torch.allclose(scores, expected, atol=1e-10)


@pytest.mark.parametrize("engine", ["factored", "auto", "loop"])
def test_every_engine_name_gives_the_analytic_scores(ridge, engine):
    lin, x, y, x_test, y_test, lam, _ = ridge
    reference = influence_function_estimates(lin, _sq_loss, (x, y), (x_test, y_test), damping=lam)
    scores = influence_function_estimates(lin, _sq_loss, (x, y), (x_test, y_test), damping=lam, engine=engine)
    assert torch.allclose(scores, reference, atol=1e-10)


def test_an_unknown_engine_name_is_refused(ridge):
    lin, x, y, x_test, y_test, lam, _ = ridge
    with pytest.raises(ValueError, match=r"`engine` must be 'auto', 'factored', 'vmap', 'loop'.*'fast'"):
        influence_function_estimates(lin, _sq_loss, (x, y), (x_test, y_test), engine="fast")


def test_estimates_predict_exact_leave_one_out_refits(ridge):
    lin, x, y, x_test, y_test, lam, solve = ridge
    n = x.shape[0]
    scores = influence_function_estimates(lin, _sq_loss, (x, y), (x_test, y_test), damping=lam)
    base = float((x_test @ solve(torch.ones(n, dtype=torch.bool)) - y_test) ** 2)
    actual = []
    for i in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        actual.append(float((x_test @ solve(keep) - y_test) ** 2) - base)
    actual_t = torch.tensor(actual, dtype=torch.float64)
    r = torch.corrcoef(torch.stack([scores, actual_t]))[0, 1]
    assert r > 0.99
    assert (torch.sign(scores) == torch.sign(actual_t)).double().mean() > 0.9


def test_parts_are_float64_and_model_untouched(ridge):
    _lin, x, y, x_test, y_test, _, _ = ridge
    lin32 = nn.Linear(4, 1).float()
    before = {k: v.clone() for k, v in lin32.state_dict().items()}
    parts = influence_function_parts(
        lin32, _sq_loss, (x.float(), y.float()), (x_test.float(), y_test.float()), "weight"
    )
    assert parts.hessian.dtype == torch.float64 and parts.hessian.shape == (4, 4)
    assert parts.train_grads.shape == (60, 4) and parts.param_names == ["weight"]
    assert all(torch.equal(before[k], v) for k, v in lin32.state_dict().items())
    assert lin32.weight.dtype == torch.float32
    sub = parts.scores(0.1, indices=[3, 5])
    assert torch.allclose(sub, parts.scores(0.1)[[3, 5]])


def test_collate_all_keeps_order():
    ds = torch.utils.data.TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    _x, y = collate_all(ds, batch_size=3)
    assert torch.equal(y, torch.arange(10))
