"""Agreement metrics: correlations against direct formulas, sign/slope/noise closed forms, intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_influence.fragility.metrics import (
    agreement_metrics,
    bootstrap_interval,
    fraction_above_noise_floor,
    mean_confidence_interval,
    pearson,
    sign_agreement,
    slope,
    spearman,
    student_t_quantile,
)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(40, generator=gen, dtype=torch.float64)
    a = 0.7 * p + 0.5 * torch.randn(40, generator=gen, dtype=torch.float64)
    return p, a


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def test_correlations_match_direct_formulas(pair):
    p, a = pair
    pn, an = p.numpy(), a.numpy()
    assert pearson(p, a) == pytest.approx(np.corrcoef(pn, an)[0, 1], abs=1e-6)
    assert spearman(p, a) == pytest.approx(np.corrcoef(_ranks(pn), _ranks(an))[0, 1], abs=1e-5)
    assert pearson(p, -a) == pytest.approx(-pearson(p, a), abs=1e-9)


def test_degenerate_inputs_give_nan_not_a_number():
    assert math.isnan(pearson([1.0, 2.0], [1.0, 2.0]))  # fewer than 3 pairs
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # constant prediction
    assert math.isnan(slope([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0])
    assert math.isnan(fraction_above_noise_floor([0.1, 0.2], float("nan")))
    # A diverged retraining (a NaN actual change): undefined, never a rank that places the NaN somewhere.
    nan_actual = [0.0, float("nan"), 0.1, 0.15]
    assert math.isnan(spearman([0.0, 0.1, 0.2, 0.3], nan_actual))
    assert math.isnan(pearson([0.0, 0.1, 0.2, 0.3], nan_actual))


def test_length_mismatch_names_both_arguments():
    with pytest.raises(ValueError, match="`predicted` and `actual`"):
        pearson([1.0, 2.0, 3.0], [1.0, 2.0])


@pytest.mark.parametrize("fn", [pearson, spearman, sign_agreement, slope, agreement_metrics])
def test_shape_mismatch_names_both_arguments_and_shapes(fn):
    """(3, 2) and (2, 3) have 6 entries each; flattened, they paired entries of different removals."""
    p = torch.arange(6.0).reshape(3, 2)
    with pytest.raises(
        ValueError, match=r"`predicted` and `actual` must have the same shape, got \(3, 2\) and \(2, 3\)"
    ):
        fn(p, p.T)
    with pytest.raises(ValueError, match=r"same shape, got \(4,\) and \(4, 1\)"):
        fn(torch.arange(4.0), torch.arange(4.0)[:, None])
    assert fn(p, 2.0 * p) == fn(p.flatten(), 2.0 * p.flatten())  # equal shapes still pair entry by entry


def test_sign_slope_and_noise_fraction(pair):
    p, a = pair
    s, c = slope(p, 3.0 * p - 0.25)
    assert s == pytest.approx(3.0, abs=1e-12) and c == pytest.approx(-0.25, abs=1e-12)
    expected = float(np.mean(np.sign(p.numpy()) == np.sign(a.numpy())))
    assert sign_agreement(p, a) == pytest.approx(expected)
    assert fraction_above_noise_floor(a, 0.5) == pytest.approx(float((a.abs() > 0.5).double().mean()))


@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 9, 2.2622), (0.95, 30, 1.6973), (0.025, 5, -2.5706)],
)
def test_student_t_quantile_matches_tables(q, df, expected):
    assert student_t_quantile(q, df) == pytest.approx(expected, abs=2e-4)


def test_mean_confidence_interval_contains_the_mean_and_shrinks():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, generator=gen, dtype=torch.float64) + 0.6
    m, lo, hi = mean_confidence_interval(x[:10])
    m2, lo2, hi2 = mean_confidence_interval(x)
    assert lo < m < hi and lo2 < m2 < hi2
    assert hi2 - lo2 < hi - lo
    assert lo2 < 0.6 < hi2
    assert all(math.isnan(v) for v in mean_confidence_interval([0.5])[1:])
    m3, _, _ = mean_confidence_interval([0.1, float("nan"), 0.3])  # NaN repeats are dropped
    assert m3 == pytest.approx(0.2)


def test_bootstrap_interval_is_deterministic_and_brackets_the_estimate(pair):
    p, a = pair
    lo, hi = bootstrap_interval(p, a, pearson, n_resamples=300, seed=3)
    assert (lo, hi) == bootstrap_interval(p, a, pearson, n_resamples=300, seed=3)
    assert lo < pearson(p, a) < hi


def test_agreement_metrics_keys(pair):
    p, a = pair
    m = agreement_metrics(p, a, noise_floor=0.3, n_bootstrap=100)
    for key in (
        "n",
        "pearson",
        "spearman",
        "sign_agreement",
        "slope",
        "intercept",
        "fraction_above_noise_floor",
        "pearson_low",
        "pearson_high",
        "spearman_low",
        "spearman_high",
    ):
        assert key in m
    assert m["n"] == 40
    assert math.isnan(agreement_metrics(p, a)["fraction_above_noise_floor"])
