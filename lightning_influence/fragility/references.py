"""Sanity rows for a fragility report: estimators whose leave-one-out influence is known exactly.

A Gaussian KDE and a k-NN density have closed-form leave-one-out influences (Kong & Chaudhuri's
classical estimators, methods.md §1), and refitting them without a point is exact and cheap. Fed
through the same agreement metrics as a real check, they must come out perfect: a report whose
reference rows do not is broken, not fragile. They also give a model-free picture of which
training points are density proponents of the test points.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_influence.fragility.metrics import agreement_metrics
from lightning_influence.influence.density import (
    kde_loo_influence,
    kde_loo_influence_bruteforce,
    knn_loo_influence,
    knn_loo_influence_bruteforce,
)

__all__ = ["density_references", "scott_bandwidth"]


def scott_bandwidth(train: Tensor) -> float:
    """Scott's rule ``h = n^(-1/(d+4)) * mean per-dimension std`` for a Gaussian KDE."""
    x = train.reshape(train.shape[0], -1).double()
    n, d = x.shape
    sd = float(x.std(dim=0).mean()) if n > 1 else 1.0
    return max(sd, 1e-12) * n ** (-1.0 / (d + 4))


def density_references(
    train: Tensor, queries: Tensor, *, bandwidth: float | None = None, k: int = 5
) -> dict[str, dict[str, float]]:
    """Closed-form vs brute-force leave-one-out influence of a KDE and a k-NN density.

    Args:
        train: training inputs ``[N, ...]`` (flattened to ``[N, D]``).
        queries: test inputs ``[M, ...]``.
        bandwidth: KDE bandwidth (default: :func:`scott_bandwidth`).
        k: neighbours of the k-NN density.

    Returns:
        ``{"kde": {...}, "knn": {...}}``, each with ``max_abs_error`` (closed form vs refit), the
        agreement metrics of :func:`~lightning_influence.fragility.metrics.agreement_metrics`
        over all (query, training point) pairs, and the estimator's setting (``bandwidth``/``k``).

    Example:
        >>> import torch
        >>> refs = density_references(torch.randn(30, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 2))
        >>> refs["kde"]["max_abs_error"] < 1e-10 and refs["knn"]["max_abs_error"] < 1e-10
        True
    """
    x = train.reshape(train.shape[0], -1).double()
    z = queries.reshape(queries.shape[0], -1).double()
    h = scott_bandwidth(x) if bandwidth is None else float(bandwidth)
    out: dict[str, dict[str, float]] = {}
    for name, closed, brute, setting in (
        ("kde", kde_loo_influence(z, x, h), kde_loo_influence_bruteforce(z, x, h), {"bandwidth": h}),
        ("knn", knn_loo_influence(z, x, k), knn_loo_influence_bruteforce(z, x, k), {"k": float(k)}),
    ):
        err = float((closed - brute).abs().max())
        finite = torch.isfinite(closed) & torch.isfinite(brute)
        metrics = agreement_metrics(closed[finite].flatten(), brute[finite].flatten())
        out[name] = {"max_abs_error": err if math.isfinite(err) else math.nan, **metrics, **setting}
    return out
