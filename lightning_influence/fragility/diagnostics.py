"""Curvature diagnostics of a trained model: can influence estimates be trusted in this regime at all?

Two questions from Epifano et al. (2023) and Basu et al. (2021):

- Is the model at a minimum of the training loss in the chosen parameter block? The smallest and
  largest Hessian eigenvalues (Lanczos on Hessian-vector products) answer it; a significantly
  negative smallest eigenvalue is flagged, because ``(H + lambda I)^{-1}`` is then indefinite
  or singular for small damping.
- How much do influence-function estimates depend on the damping ``lambda``? A sweep recomputes
  the estimates of the removals being checked for each ``lambda`` (exact Hessian of the block,
  one eigendecomposition); the report then shows which damping agrees best with retraining.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_influence.fragility.estimates import _to_dtype, collate_all, influence_function_parts
from lightning_influence.fragility.report import CurvatureDiagnostics
from lightning_influence.gradients.losses import PerSampleLoss
from lightning_influence.gradients.parameters import resolve_parameter_names
from lightning_influence.influence.curvature import flat_hvp, lanczos_extreme_eigenvalues, mean_loss_function

__all__ = ["DEFAULT_DAMPINGS", "curvature_diagnostics"]

DEFAULT_DAMPINGS: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def curvature_diagnostics(
    module: nn.Module,
    loss_fn: PerSampleLoss,
    train_data: Any,
    test_data: Any,
    params: Sequence[str] | str | None,
    removal_groups: Sequence[Sequence[int]] = (),
    dampings: Sequence[float] = DEFAULT_DAMPINGS,
    n_iter: int = 50,
    seed: int = 0,
    exact_max_dim: int = 2000,
    batch_size: int = 256,
    *,
    measurement: PerSampleLoss | None = None,
) -> CurvatureDiagnostics:
    """Extreme Hessian eigenvalues of a parameter block and a damping sweep of influence estimates.

    Args:
        module: the trained model (copied to float64; not modified).
        loss_fn: per-sample training loss ``loss_fn(module, batch) -> Tensor[B]``.
        train_data: the training set.
        test_data: the test sample(s) of the measurement (for the sweep's test gradient).
        params: the block (names or module prefixes).
        removal_groups: the removals to predict at every damping (each a list of training indices;
            the prediction of a group is the sum of its members' scores).
        dampings: the sweep's ``lambda`` values (>= 0).
        n_iter: Lanczos steps.
        seed: Lanczos start vector seed.
        exact_max_dim: largest block for which the exact Hessian, full spectrum and sweep are computed.
        batch_size: rows per Hessian-vector-product batch.
        measurement: the per-sample test objective of the sweep (default: ``loss_fn``).

    Returns:
        A :class:`CurvatureDiagnostics` (the sweep's agreement with retraining is filled in by
        :meth:`FragilityReport.finalize`).
    """
    if any(d < 0 for d in dampings):
        raise ValueError(f"`dampings` must be >= 0, got {list(dampings)}.")
    names = resolve_parameter_names(module, params, "curvature_params")
    m64 = copy.deepcopy(module).to(torch.float64).eval()
    values = {n: p.detach() for n, p in m64.named_parameters() if n in names}
    dim = sum(v.numel() for v in values.values())
    train = _to_dtype(collate_all(train_data, "train_data"), torch.float64)
    loss = mean_loss_function(m64, loss_fn, train, names, batch_size=batch_size)
    est = lanczos_extreme_eigenvalues(flat_hvp(loss, values), dim, n_iter=n_iter, seed=seed)
    diag = CurvatureDiagnostics(
        param_names=names,
        dim=dim,
        smallest=est.smallest,
        largest=est.largest,
        n_iter=est.n_iter,
        converged=est.converged,
        negative_curvature=est.negative_curvature,
    )
    if dim > exact_max_dim:
        diag.note = f"block of {dim} > exact_max_dim={exact_max_dim} parameters: no exact spectrum or damping sweep"
        return diag
    parts = influence_function_parts(module, loss_fn, train, test_data, names, batch_size, measurement=measurement)
    diag.spectrum = [float(x) for x in torch.linalg.eigvalsh(parts.hessian)]
    if removal_groups:
        scores = parts.scores(list(dampings))  # [K, N]
        diag.dampings = [float(d) for d in dampings]
        diag.damping_predictions = [[float(row[list(g)].sum()) for g in removal_groups] for row in scores]
        base = torch.tensor(diag.damping_predictions[0], dtype=torch.float64)
        denom = float(base.norm()) or 1.0
        diag.damping_relative_change = [
            float((torch.tensor(p, dtype=torch.float64) - base).norm()) / denom for p in diag.damping_predictions
        ]
    return diag
