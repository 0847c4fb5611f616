"""Curvature diagnostics: extreme eigenvalues, negative curvature, the damping sweep."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_influence.fragility.diagnostics import curvature_diagnostics


def _sq_loss(module, batch):
    x, y = batch
    return (module(x).squeeze(-1) - y) ** 2


@pytest.fixture(scope="module")
def regression():
    torch.manual_seed(0)
    x = torch.randn(50, 3, dtype=torch.float64)
    y = x @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) + 0.1 * torch.randn(50, dtype=torch.float64)
    lin = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.linalg.lstsq(x, y.unsqueeze(1)).solution.T)
    return lin, x, y


def test_eigenvalues_match_the_analytic_hessian(regression):
    lin, x, y = regression
    groups = [[0], [1], [2, 3], [4]]
    d = curvature_diagnostics(
        lin, _sq_loss, (x, y), (x[:1], y[:1]), "weight", removal_groups=groups, dampings=[0.0, 0.1, 1.0, 10.0]
    )
    evals = torch.linalg.eigvalsh(2.0 / 50 * x.T @ x)
    assert d.smallest == pytest.approx(float(evals[0]), rel=1e-8)
    assert d.largest == pytest.approx(float(evals[-1]), rel=1e-8)
    assert d.converged and not d.negative_curvature and d.dim == 3
    assert d.spectrum == pytest.approx(evals.tolist(), rel=1e-8)
    assert len(d.damping_predictions) == 4 and all(len(p) == 4 for p in d.damping_predictions)
    # More damping shrinks the inverse: predictions move monotonically away from the undamped ones.
    change = d.damping_relative_change
    assert change[0] == 0.0 and all(a < b for a, b in itertools.pairwise(change))


class _Saddle(nn.Module):
    """loss = a^2 - b^2 per sample: a saddle at the origin."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def _saddle_loss(module, batch):
    (x,) = batch
    return x * (module.a**2 - module.b**2).sum() + 0.0 * x


def test_negative_curvature_is_flagged():
    x = torch.ones(8, dtype=torch.float64)
    d = curvature_diagnostics(_Saddle(), _saddle_loss, (x,), (x[:1],), None, removal_groups=[[0], [1], [2]])
    assert d.negative_curvature
    assert d.smallest == pytest.approx(-2.0) and d.largest == pytest.approx(2.0)


def test_large_blocks_skip_the_exact_sweep(regression):
    lin, x, y = regression
    d = curvature_diagnostics(lin, _sq_loss, (x, y), (x[:1], y[:1]), "weight", removal_groups=[[0]], exact_max_dim=2)
    assert d.spectrum == [] and d.damping_predictions == []
    assert "exact_max_dim" in d.note
    with pytest.raises(ValueError, match="`dampings`"):
        curvature_diagnostics(lin, _sq_loss, (x, y), (x[:1], y[:1]), "weight", dampings=[-1.0])
    with pytest.raises(ValueError, match="`curvature_params`"):
        curvature_diagnostics(lin, _sq_loss, (x, y), (x[:1], y[:1]), "decoder")
