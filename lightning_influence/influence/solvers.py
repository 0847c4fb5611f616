"""Inverse-HVP solvers behind one small protocol, each configured by a typed options dataclass.

A :class:`Solver` turns right-hand sides ``b`` into ``(H + lambda I)^{-1} b`` on a
:class:`~lightning_influence.influence.hessian.BlockCurvature`, reusing whatever the curvature
has already computed. The math is in :mod:`~lightning_influence.influence.inverse_hvp`; these
classes only wire options and cached factorisations to it.

==============  =====================  =============================================
name            options                scale
==============  =====================  =============================================
``"exact"``     :class:`ExactOptions`  explicit Hessian, up to a few thousand parameters
``"cg"``        :class:`CGOptions`     positive-definite ``H + lambda I``
``"lissa"``     :class:`LiSSAOptions`  the Neumann series, optionally mini-batched
``"arnoldi"``   :class:`ArnoldiOptions` low rank, millions of parameters
==============  =====================  =============================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union, runtime_checkable

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_influence.errors import ConfigurationError
from lightning_influence.influence.curvature import EigenEstimate
from lightning_influence.influence.hessian import BlockCurvature
from lightning_influence.influence.inverse_hvp import (
    ArnoldiFactors,
    SolverDiagnostics,
    arnoldi_factors,
    arnoldi_inverse_hvp,
    cg_inverse_hvp,
    lissa_inverse_hvp,
    relative_residual,
    solve_with_eigh,
)
from lightning_influence.utils.arguments import check_count

__all__ = [
    "ArnoldiOptions",
    "ArnoldiSolver",
    "CGOptions",
    "CGSolver",
    "ExactOptions",
    "ExactSolver",
    "LiSSAOptions",
    "LiSSASolver",
    "OnFailure",
    "Solver",
    "make_solver",
]

OnFailure = Literal["warn", "raise", "ignore"]


@dataclass(frozen=True)
class ExactOptions:
    """Options of the exact (eigendecomposition) solver.

    Args:
        rcond: relative cut-off under which an eigenvalue of ``H + lambda I`` counts as zero
            (default ``D * eps``).
        pseudo_inverse: drop such directions instead of raising ``SingularHessianError``.
    """

    rcond: float | None = None
    pseudo_inverse: bool = False


@dataclass(frozen=True)
class CGOptions:
    """Options of conjugate gradients.

    Args:
        tol: relative residual to reach (floored at ``4 eps`` of the dtype the products are computed in).
        max_iter: iterations at most (default ``D``).
        on_failure: what a non-converged solve does (default: the facade's ``on_failure``).
    """

    tol: float = 1e-8
    max_iter: int | None = None
    on_failure: OnFailure | None = None


@dataclass(frozen=True)
class LiSSAOptions:
    """Options of LiSSA.

    Args:
        scale: the recursion's scale (default: from the largest eigenvalue estimate).
        depth: recursion steps at most.
        tol: stop when an update is this small relative to the iterate.
        on_failure: what a non-converged solve does (default: the facade's ``on_failure``).
        stochastic: estimate each product on one Hessian batch drawn at random (mini-batch LiSSA).
        repeat: independent stochastic runs averaged.
        seed: seed of the batch draws.
        residual_tol: relative residual under which a stochastic solve counts as converged.
    """

    scale: float | None = None
    depth: int = 5000
    tol: float = 1e-7
    on_failure: OnFailure | None = None
    stochastic: bool = False
    repeat: int = 1
    seed: int = 0
    residual_tol: float = 0.1


@dataclass(frozen=True)
class ArnoldiOptions:
    """Options of the low-rank Arnoldi solver.

    Args:
        n_iter: Arnoldi iterations, a positive integer (default ``min(100, D)``).
        top_k: Ritz pairs kept, a positive integer (default ``min(50, n_iter)``).
        seed: seed of the start vector and of the restart vectors.
        compute_residual: report the relative residual (one more product per solve).

    Raises:
        ConfigurationError: if ``n_iter`` or ``top_k`` is not a positive integer (a bool included).
    """

    n_iter: int | None = None
    top_k: int | None = None
    seed: int = 0
    compute_residual: bool = True

    def __post_init__(self) -> None:
        # None selects the default; 0 is refused rather than read as "unset".
        for name in ("n_iter", "top_k"):
            value = getattr(self, name)
            if value is not None:
                check_count(f"`{name}`", value, error=ConfigurationError)


SolverOptions = Union[ExactOptions, CGOptions, LiSSAOptions, ArnoldiOptions]


@runtime_checkable
class Solver(Protocol):
    """Solves ``(H + lambda I) x = b`` for rows ``b [k, D]`` on a block's curvature."""

    name: str

    def solve(
        self, curvature: BlockCurvature, rhs: Tensor, damping: float, on_failure: OnFailure
    ) -> tuple[Tensor, SolverDiagnostics]:
        """``x [k, D]`` and the solve's diagnostics (always with the relative residual)."""
        ...

    def eigenvalues(self, curvature: BlockCurvature) -> EigenEstimate | None:
        """Extreme eigenvalues the solver gets for free (``None``: ask Lanczos)."""
        ...


class ExactSolver:
    """Explicit Hessian and its eigendecomposition, computed once and reused for every solve."""

    name = "exact"

    def __init__(self, options: ExactOptions | None = None) -> None:
        self.options = options or ExactOptions()

    def solve(
        self, curvature: BlockCurvature, rhs: Tensor, damping: float, on_failure: OnFailure
    ) -> tuple[Tensor, SolverDiagnostics]:
        b = rhs.to(torch.float64)
        x, diag = solve_with_eigh(
            curvature.explicit_eigh(), b, damping, rcond=self.options.rcond, pseudo_inverse=self.options.pseudo_inverse
        )
        matrix = curvature.matrix
        diag.residuals = relative_residual(lambda v: v @ matrix, x, b, damping)
        diag.residual = float(diag.residuals.max())
        return x, diag

    def eigenvalues(self, curvature: BlockCurvature) -> EigenEstimate:
        values = curvature.explicit_eigh().values
        lo, hi = float(values[0]), float(values[-1])
        return EigenEstimate(
            smallest=lo,
            largest=hi,
            n_iter=curvature.n_params,
            converged=True,
            negative_curvature=bool(lo < -1e-6 * abs(hi)),
            residual_smallest=0.0,
            residual_largest=0.0,
            ritz_values=values,
        )


class CGSolver:
    """Conjugate gradients on the Hessian-vector product, all right-hand sides at once."""

    name = "cg"

    def __init__(self, options: CGOptions | None = None) -> None:
        self.options = options or CGOptions()

    def solve(
        self, curvature: BlockCurvature, rhs: Tensor, damping: float, on_failure: OnFailure
    ) -> tuple[Tensor, SolverDiagnostics]:
        o = self.options
        with curvature.evaluating():
            return cg_inverse_hvp(
                curvature.operator,
                rhs.to(torch.float64),
                damping,
                tol=o.tol,
                max_iter=o.max_iter,
                on_failure=o.on_failure or on_failure,
            )

    def eigenvalues(self, curvature: BlockCurvature) -> None:
        return None


class LiSSASolver:
    """The Neumann series, scaled by the largest eigenvalue estimate; optionally on sampled Hessian batches."""

    name = "lissa"

    def __init__(self, options: LiSSAOptions | None = None) -> None:
        self.options = options or LiSSAOptions()

    def solve(
        self, curvature: BlockCurvature, rhs: Tensor, damping: float, on_failure: OnFailure
    ) -> tuple[Tensor, SolverDiagnostics]:
        o = self.options
        eigen = curvature.lanczos_eigenvalues()
        with curvature.evaluating():
            return lissa_inverse_hvp(
                curvature.operator,
                rhs.to(torch.float64),
                damping,
                scale=o.scale,
                depth=o.depth,
                tol=o.tol,
                eigen=eigen,
                on_failure=o.on_failure or on_failure,
                sampled_hvp=curvature.sampled_hvp(o.seed) if o.stochastic else None,
                repeat=o.repeat,
                residual_tol=o.residual_tol,
            )

    def eigenvalues(self, curvature: BlockCurvature) -> None:
        return None


class ArnoldiSolver:
    """A rank-``top_k`` eigendecomposition by Arnoldi, computed once per curvature and reused."""

    name = "arnoldi"

    def __init__(self, options: ArnoldiOptions | None = None) -> None:
        self.options = options or ArnoldiOptions()
        self._factors: tuple[BlockCurvature, ArnoldiFactors] | None = None

    def factors(self, curvature: BlockCurvature) -> ArnoldiFactors:
        """The Ritz pairs of ``curvature`` (computed on first use)."""
        if self._factors is None or self._factors[0] is not curvature:
            n_iter, top_k = self._n_iter(curvature), self._top_k(curvature)
            with curvature.evaluating():
                factors = arnoldi_factors(
                    curvature.operator,
                    curvature.n_params,
                    n_iter=n_iter,
                    top_k=top_k,
                    seed=self.options.seed,
                    dtype=curvature.dtype,
                    device=curvature.device,
                )
            self._factors = (curvature, factors)
        return self._factors[1]

    def solve(
        self, curvature: BlockCurvature, rhs: Tensor, damping: float, on_failure: OnFailure
    ) -> tuple[Tensor, SolverDiagnostics]:
        factors = self.factors(curvature)
        with curvature.evaluating():
            x, diag = arnoldi_inverse_hvp(
                curvature.operator,
                rhs.to(curvature.dtype),
                damping,
                factors=factors,
                compute_residual=self.options.compute_residual,
            )
        if not diag.converged and on_failure != "ignore":
            rank_zero_warn(
                f"Arnoldi: the {diag.details['top_k']} kept Ritz pairs are not converged (largest Ritz residual"
                f" {diag.details['max_ritz_residual']:.3e}, top eigenvalue {float(factors.values.abs().max()):.3e});"
                " the low-rank inverse is approximate. Raise `n_iter` or lower `top_k` in the solver options."
            )
        requested = min(self._top_k(curvature), self._n_iter(curvature), curvature.n_params)
        if diag.details["top_k"] < requested and on_failure != "ignore":
            # Only if no restart vector could be orthogonalised to the basis: the missing directions are lost.
            rank_zero_warn(
                f"Arnoldi kept {diag.details['top_k']} Ritz pairs of the {requested} requested (`top_k`): the Krylov"
                f" space stopped growing after {factors.n_iter} of {curvature.n_params} dimensions, so the low-rank"
                " inverse misses directions. Use the exact or CG solver."
            )
        return x, diag

    def _n_iter(self, curvature: BlockCurvature) -> int:
        return min(100, curvature.n_params) if self.options.n_iter is None else int(self.options.n_iter)

    def _top_k(self, curvature: BlockCurvature) -> int:
        return min(50, self._n_iter(curvature)) if self.options.top_k is None else int(self.options.top_k)

    def eigenvalues(self, curvature: BlockCurvature) -> EigenEstimate | None:
        if curvature.eigen_iters > 0:
            return None
        # The factorisation's Ritz values come for free (Krylov extremes converge first).
        f = self.factors(curvature)
        lo, hi = float(f.ritz_values[0]), float(f.ritz_values[-1])
        return EigenEstimate(
            smallest=lo,
            largest=hi,
            n_iter=f.n_iter,
            converged=f.converged(),
            negative_curvature=bool(lo < -1e-6 * abs(hi)),
            ritz_values=f.ritz_values,
        )


_SOLVERS: dict[str, tuple[type, type]] = {
    "exact": (ExactSolver, ExactOptions),
    "cg": (CGSolver, CGOptions),
    "lissa": (LiSSASolver, LiSSAOptions),
    "arnoldi": (ArnoldiSolver, ArnoldiOptions),
}


def make_solver(solver: str | Solver, options: SolverOptions | Mapping[str, Any] | None = None) -> Solver:
    """A :class:`Solver` from its name and options (a dataclass, or a dict of its fields).

    Raises:
        ConfigurationError: for an unknown name, options of another solver, or unknown option keys.

    Example:
        >>> make_solver("cg", {"tol": 1e-6}).options
        CGOptions(tol=1e-06, max_iter=None, on_failure=None)
    """
    if isinstance(solver, Solver) and not isinstance(solver, str):
        if options is not None:
            raise ConfigurationError("`solver_options` configure a solver given by name; set them on your `solver`.")
        return solver
    if solver not in _SOLVERS:
        raise ConfigurationError(f"`solver` must be one of {tuple(_SOLVERS)} or a Solver, got {solver!r}.")
    cls, options_cls = _SOLVERS[solver]
    if options is None:
        return cls(options_cls())
    if dataclasses.is_dataclass(options):
        if not isinstance(options, options_cls):
            raise ConfigurationError(
                f"`solver_options` is a {type(options).__name__} but the {solver!r} solver takes {options_cls.__name__}."
            )
        return cls(options)
    if not isinstance(options, Mapping):
        raise ConfigurationError(f"`solver_options` must be a {options_cls.__name__} or a dict, got {options!r}.")
    fields = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigurationError(
            f"`solver_options` has keys {unknown} that the {solver!r} solver does not take; it accepts {sorted(fields)}."
        )
    return cls(options_cls(**dict(options)))
