"""Per-seed correlation confidence intervals are computed on the Fisher-z scale and stay in [-1, 1]."""

from __future__ import annotations

import pytest
import torch

from lightning_influence.fragility.metrics import correlation_confidence_interval, mean_confidence_interval


def test_correlation_interval_uses_fisher_z_and_stays_in_bounds():
    values = [0.95, -0.6, 0.3]
    _, t_lo, t_hi = mean_confidence_interval(values)
    assert t_lo < -1.0 or t_hi > 1.0  # what the old interval on r printed
    m, lo, hi = correlation_confidence_interval(values)
    assert -1.0 <= lo < m < hi <= 1.0
    z = torch.atanh(torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64))
    assert correlation_confidence_interval([0.5, 0.6, 0.7])[0] == pytest.approx(float(torch.tanh(z.mean())))
