"""What qualifies an influence-function result: the solve, the damping, the curvature's spectrum."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_influence.influence.curvature import EigenEstimate
from lightning_influence.influence.inverse_hvp import SolverDiagnostics

__all__ = ["InfluenceDiagnostics"]


@dataclass
class InfluenceDiagnostics:
    """Everything that qualifies an influence result.

    Attributes:
        solver: the inverse-HVP solver's report (residual, iterations, convergence, damping).
        damping: the Tikhonov ``lambda`` added to the mean Hessian.
        smallest_eigenvalue: smallest eigenvalue (estimate) of the curvature matrix of the block.
        largest_eigenvalue: largest eigenvalue (estimate).
        negative_curvature: the curvature matrix has a clearly negative eigenvalue (the model is not
            at a minimum of the training loss in this block, so scores are less trustworthy and small
            damping may make ``H + lambda I`` indefinite).
        eigen_exact: the eigenvalues are exact (explicit Hessian) rather than Krylov estimates.
        eigen_converged: the Krylov (Lanczos or Arnoldi) estimates converged.
        curvature: ``"hessian"`` or ``"gauss-newton"``.
        n_params: size ``D`` of the parameter block.
        param_names: the block's parameter names.
        n_train: training samples scored.
        n_test: test samples scored.
        measurement: name of the measurement (``"train_loss"`` for matched influence).
        train_gradients: ``"recomputed"`` or ``"store"``.
        seconds: wall time of the call.
        warnings: the warnings issued with this result.
        eigen_source: ``"exact"``, ``"lanczos"`` or ``"arnoldi"`` (Ritz values of the solver's factorisation).
    """

    solver: SolverDiagnostics
    damping: float
    smallest_eigenvalue: float
    largest_eigenvalue: float
    negative_curvature: bool
    eigen_exact: bool
    eigen_converged: bool
    curvature: str
    n_params: int
    param_names: list[str]
    n_train: int
    n_test: int
    measurement: str
    train_gradients: str = "recomputed"
    seconds: float = math.nan
    eigen_source: str = "lanczos"
    warnings: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.solver.converged

    def summary(self) -> str:
        """A one-paragraph human-readable report."""
        if self.eigen_exact:
            source = "exact"
        else:
            source = f"{self.eigen_source}, {'converged' if self.eigen_converged else 'not converged'}"
        lines = [
            (
                f"influence of {self.n_train} training samples on {self.n_test} test samples ({self.measurement}),"
                f" {self.n_params} parameters, {self.curvature}"
            ),
            (
                f"solver={self.solver.solver} damping={self.damping:g} residual={self.solver.residual:.3e}"
                f" iterations={self.solver.iterations} converged={self.solver.converged}"
            ),
            (
                f"eigenvalues: smallest={self.smallest_eigenvalue:.4g} largest={self.largest_eigenvalue:.4g} ({source})"
                + (" NEGATIVE CURVATURE" if self.negative_curvature else "")
            ),
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def as_dict(self) -> dict[str, Any]:
        """Scalars only, for loggers."""
        return {
            "damping": self.damping,
            "residual": self.solver.residual,
            "iterations": self.solver.iterations,
            "converged": float(self.solver.converged),
            "smallest_eigenvalue": self.smallest_eigenvalue,
            "largest_eigenvalue": self.largest_eigenvalue,
            "negative_curvature": float(self.negative_curvature),
        }

    @classmethod
    def of(
        cls,
        solver: SolverDiagnostics,
        eigen: EigenEstimate | None,
        *,
        damping: float,
        eigen_source: str,
        **fields: Any,
    ) -> InfluenceDiagnostics:
        """Diagnostics of one solve, with the curvature's eigenvalues when they were estimated."""
        return cls(
            solver=solver,
            damping=damping,
            smallest_eigenvalue=eigen.smallest if eigen is not None else math.nan,
            largest_eigenvalue=eigen.largest if eigen is not None else math.nan,
            negative_curvature=bool(eigen.negative_curvature) if eigen is not None else False,
            eigen_exact=eigen_source == "exact",
            eigen_converged=bool(eigen.converged) if eigen is not None else False,
            eigen_source=eigen_source,
            **fields,
        )
