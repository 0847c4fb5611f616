"""Fragility checks: validate influence estimates against real retraining (Epifano et al., 2023).

- :class:`FragilityCheck` retrains without the samples an estimator ranks highest (leave-one-out
  or leave-k-out, warm start or scratch, several seeds) and compares predicted with actual
  changes of the test loss, next to the retraining noise floor.
- :class:`FragilityReport` holds the result: metrics, a verdict per check, JSON, TensorBoard.
- :mod:`~lightning_influence.fragility.metrics`: Pearson/Spearman (torchmetrics), sign agreement,
  slope, fraction above the noise floor, confidence intervals.
- :mod:`~lightning_influence.fragility.estimates`: exact damped-Hessian influence-function
  estimates of a small parameter block (the reference estimator of the paper).
- :mod:`~lightning_influence.fragility.diagnostics`: Hessian eigenvalues and damping sweeps.
- :mod:`~lightning_influence.fragility.references`: KDE and k-NN sanity rows (exact leave-one-out).
- :mod:`~iris`: the paper's Iris task as Lightning objects.
"""

from lightning_influence.fragility.check import FragilityCheck, select_removals
from lightning_influence.fragility.diagnostics import curvature_diagnostics
from lightning_influence.fragility.estimates import influence_function_estimates, influence_function_parts
from lightning_influence.fragility.references import density_references
from lightning_influence.fragility.report import CurvatureDiagnostics, FragilityReport, RemovalResult, Verdict
from lightning_influence.fragility.retraining import Retrainer

__all__ = [
    "CurvatureDiagnostics",
    "FragilityCheck",
    "FragilityReport",
    "RemovalResult",
    "Retrainer",
    "Verdict",
    "curvature_diagnostics",
    "density_references",
    "influence_function_estimates",
    "influence_function_parts",
    "select_removals",
]
