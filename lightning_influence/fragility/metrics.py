"""Agreement between predicted and actual removal effects: pure functions of two score vectors.

``predicted[i]`` is an estimator's score for removal ``i`` (positive = removing the samples is
predicted to *raise* the test loss, the package's proponent convention); ``actual[i]`` is the
measured change of the test loss after retraining without them. Correlations come from
``torchmetrics.functional``; the rest (sign agreement, scale, noise-floor fraction, confidence
intervals) are small closed forms.

All functions take 1-D tensors (or sequences) of equal length and return Python floats, with
``nan`` where a statistic is undefined (fewer than 3 pairs, a constant input, or a non-finite value).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

__all__ = [
    "agreement_metrics",
    "bootstrap_interval",
    "correlation_confidence_interval",
    "fraction_above_noise_floor",
    "mean_confidence_interval",
    "pearson",
    "sign_agreement",
    "slope",
    "spearman",
    "student_t_quantile",
]

ArrayLike = Tensor | Sequence[float]


def _pair(predicted: ArrayLike, actual: ArrayLike) -> tuple[Tensor, Tensor]:
    p = torch.as_tensor(predicted, dtype=torch.float64)
    a = torch.as_tensor(actual, dtype=torch.float64)
    # Flattening first would pair (3, 2) with (2, 3) element by element: entries of different removals.
    if p.shape != a.shape:
        if p.dim() == 1 and a.dim() == 1:
            raise ValueError(f"`predicted` and `actual` must have the same length, got {p.numel()} and {a.numel()}.")
        raise ValueError(
            f"`predicted` and `actual` must have the same shape, got {tuple(p.shape)} and {tuple(a.shape)}."
        )
    return p.reshape(-1), a.reshape(-1)


def _degenerate(p: Tensor, a: Tensor) -> bool:
    # A non-finite value (a diverged retraining) makes the correlation undefined: NaN, as Pearson's arithmetic
    # gives it, rather than a rank that places NaN somewhere.
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(a).all())):
        return True
    return p.numel() < 3 or bool(p.std() == 0) or bool(a.std() == 0)


def pearson(predicted: ArrayLike, actual: ArrayLike) -> float:
    """Pearson correlation ``cov(p, a) / (sd(p) sd(a))`` (``torchmetrics.functional.pearson_corrcoef``).

    Example:
        >>> round(pearson([1.0, 2.0, 3.0, 4.0], [2.0, 4.1, 5.9, 8.0]), 4)
        0.9995
    """
    p, a = _pair(predicted, actual)
    if _degenerate(p, a):
        return math.nan
    return float(pearson_corrcoef(p, a))


def spearman(predicted: ArrayLike, actual: ArrayLike) -> float:
    """Spearman rank correlation (``torchmetrics.functional.spearman_corrcoef``; ties get average ranks).

    torchmetrics adds an ``eps`` of 1e-6 to the denominator, so a perfect ranking reads
    0.999999.

    Example:
        >>> round(spearman([1.0, 2.0, 3.0, 4.0], [1.0, 10.0, 100.0, 1000.0]), 4)
        1.0
    """
    p, a = _pair(predicted, actual)
    if _degenerate(p, a):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about float64 ranks; the value is exact
        return float(spearman_corrcoef(p, a))


def sign_agreement(predicted: ArrayLike, actual: ArrayLike) -> float:
    """Fraction of pairs whose signs agree, ``mean(sign(p) == sign(a))``.

    Example:
        >>> sign_agreement([1.0, -1.0, 2.0, -0.5], [0.3, -0.1, -0.2, -0.4])
        0.75
    """
    p, a = _pair(predicted, actual)
    if p.numel() == 0:
        return math.nan
    return float((torch.sign(p) == torch.sign(a)).double().mean())


def slope(predicted: ArrayLike, actual: ArrayLike) -> tuple[float, float]:
    """Least-squares fit ``actual ~ slope * predicted + intercept``; a slope of 1 means the scale is right.

    Returns:
        ``(slope, intercept)``; ``(nan, nan)`` for fewer than 2 pairs or constant ``predicted``.

    Example:
        >>> s, c = slope([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
        >>> round(s, 6), round(c, 6)
        (2.0, 0.0)
    """
    p, a = _pair(predicted, actual)
    if p.numel() < 2 or bool(p.std() == 0):
        return math.nan, math.nan
    pc = p - p.mean()
    s = float((pc * (a - a.mean())).sum() / pc.square().sum())
    return s, float(a.mean() - s * p.mean())


def fraction_above_noise_floor(actual: ArrayLike, noise_floor: float) -> float:
    """Fraction of effects with ``|actual| > noise_floor``.

    Example:
        >>> fraction_above_noise_floor([0.1, -0.01, 0.5, 0.0], 0.05)
        0.5
    """
    a = torch.as_tensor(actual, dtype=torch.float64).reshape(-1)
    if a.numel() == 0 or noise_floor is None or not math.isfinite(noise_floor):
        return math.nan
    return float((a.abs() > noise_floor).double().mean())


def _student_t_cdf(t: float, df: float) -> float:
    """CDF of Student's t via the regularised incomplete beta, evaluated by numerical quadrature."""
    if t == 0.0:
        return 0.5
    # P(|T| <= |t|) = 1 - I_{df/(df+t^2)}(df/2, 1/2); integrate the t density on [0, |t|] instead,
    # after the substitution u = atan(x / sqrt(df)), which maps the heavy tail to a finite range.
    x_max = abs(t)
    u_max = math.atan(x_max / math.sqrt(df))
    n = 2000
    u = torch.linspace(0.0, u_max, n + 1, dtype=torch.float64)
    # density of T in terms of u: f(x) dx with x = sqrt(df) tan u, dx = sqrt(df) sec^2 u du,
    # f(x) = c (1 + x^2/df)^(-(df+1)/2) = c cos(u)^(df+1)  ->  integrand = c sqrt(df) cos(u)^(df-1)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    integrand = math.exp(log_c) * math.sqrt(df) * torch.cos(u).pow(df - 1)
    half = float(torch.trapezoid(integrand, u))
    return 0.5 + math.copysign(half, t)


def student_t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t distribution (bisection on the CDF; accurate to about 1e-6).

    Example:
        >>> round(student_t_quantile(0.975, 4), 4)
        2.7764
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"`q` must be in (0, 1), got {q}.")
    if df <= 0:
        raise ValueError(f"`df` must be positive, got {df}.")
    if q == 0.5:
        return 0.0
    target = q if q > 0.5 else 1.0 - q
    lo, hi = 0.0, 1.0
    while _student_t_cdf(hi, df) < target:
        hi *= 2.0
        if hi > 1e8:
            break
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _student_t_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


def mean_confidence_interval(values: ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval ``mean +- t_{(1+level)/2, n-1} sd / sqrt(n)``.

    Non-finite values are dropped. Returns ``(mean, low, high)``; the bounds are ``nan`` for
    fewer than two finite values.

    Example:
        >>> m, lo, hi = mean_confidence_interval([0.6, 0.7, 0.8])
        >>> round(m, 3), round(lo, 3), round(hi, 3)
        (0.7, 0.452, 0.948)
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must be in (0, 1), got {level}.")
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.numel() < 2:
        return mean, math.nan, math.nan
    half = student_t_quantile(0.5 + level / 2, v.numel() - 1) * float(v.std()) / math.sqrt(v.numel())
    return mean, mean - half, mean + half


def correlation_confidence_interval(values: ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """Mean correlation and its confidence interval, computed on the Fisher-z scale.

    Correlations are transformed with ``z = atanh(r)`` (clipped away from +-1), the Student-t
    interval of the mean is taken on ``z`` and mapped back with ``tanh``, so the bounds always
    lie in [-1, 1] (a Student-t interval on ``r`` itself can leave it for a few seeds).

    Example:
        >>> m, lo, hi = correlation_confidence_interval([0.9, -0.5, 0.2])
        >>> -1.0 <= lo <= m <= hi <= 1.0
        True
    """
    r = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    r = r[torch.isfinite(r)].clamp(-1 + 1e-12, 1 - 1e-12)
    m, lo, hi = mean_confidence_interval(torch.atanh(r), level)
    back = [min(1.0, max(-1.0, math.tanh(v))) if math.isfinite(v) else v for v in (m, lo, hi)]
    return back[0], back[1], back[2]


def bootstrap_interval(
    predicted: ArrayLike,
    actual: ArrayLike,
    statistic: Callable[[Tensor, Tensor], float],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(predicted, actual)`` over resampled pairs.

    Resamples whose statistic is undefined (``nan``) are dropped; returns ``(nan, nan)`` if fewer
    than half survive.

    Example:
        >>> lo, hi = bootstrap_interval(list(range(10)), [2.0 * x for x in range(10)], pearson, n_resamples=50)
        >>> round(lo, 6), round(hi, 6)
        (1.0, 1.0)
    """
    if n_resamples < 1:
        raise ValueError(f"`n_resamples` must be >= 1, got {n_resamples}.")
    p, a = _pair(predicted, actual)
    n = p.numel()
    if n < 3:
        return math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_resamples, n), generator=gen)
    stats = torch.tensor([statistic(p[i], a[i]) for i in idx], dtype=torch.float64)
    stats = stats[torch.isfinite(stats)]
    if stats.numel() < n_resamples / 2:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2
    q = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


def agreement_metrics(
    predicted: ArrayLike,
    actual: ArrayLike,
    noise_floor: float | None = None,
    n_bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Every agreement statistic of one predicted/actual pairing, as a flat dict.

    Keys: ``n``, ``pearson``, ``spearman``, ``sign_agreement``, ``slope``, ``intercept``,
    ``fraction_above_noise_floor`` (``nan`` without a floor) and, with ``n_bootstrap > 0``,
    ``pearson_low``/``pearson_high``/``spearman_low``/``spearman_high`` (percentile bootstrap).
    """
    p, a = _pair(predicted, actual)
    s, c = slope(p, a)
    out = {
        "n": float(p.numel()),
        "pearson": pearson(p, a),
        "spearman": spearman(p, a),
        "sign_agreement": sign_agreement(p, a),
        "slope": s,
        "intercept": c,
        "fraction_above_noise_floor": fraction_above_noise_floor(a, noise_floor)
        if noise_floor is not None
        else math.nan,
    }
    if n_bootstrap > 0:
        for name, fn in (("pearson", pearson), ("spearman", spearman)):
            lo, hi = bootstrap_interval(p, a, fn, n_resamples=n_bootstrap, level=level, seed=seed)
            out[f"{name}_low"], out[f"{name}_high"] = lo, hi
    return out
