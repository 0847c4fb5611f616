"""Inverse Hessian-vector products: solve ``(H + lambda I) x = b`` for one or many right-hand sides.

Pure solvers on a symmetric operator ``hvp: [k, D] -> [k, D]`` (see
:func:`lightning_influence.influence.curvature.flat_hvp`) or, for :func:`exact_inverse_hvp`, on the
explicit matrix. ``damping`` is always the Tikhonov ``lambda`` added to the *mean* Hessian, in
every solver, so results of different solvers are directly comparable.

===========================  ===============================  ======================================
solver                       cost                             use
===========================  ===============================  ======================================
:func:`exact_inverse_hvp`    ``O(D^3)`` once, ``D^2`` memory  blocks up to a few thousand parameters
:func:`cg_inverse_hvp`       ``~sqrt(kappa)`` HVPs per rhs    positive-definite ``H + lambda I``
:func:`lissa_inverse_hvp`    ``~kappa`` HVPs per rhs          the classic Neumann-series estimator
:func:`arnoldi_inverse_hvp`  ``n_iter`` HVPs, once            millions of parameters (low rank)
===========================  ===============================  ======================================

Each returns ``(solution, SolverDiagnostics)``; the diagnostics always carry the relative residual
``||(H + lambda I) x - b|| / ||b||`` (worst over right-hand sides), so a failed solve is visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_influence.errors import SingularHessianError, SolverNotConvergedError
from lightning_influence.influence.curvature import EigenEstimate, lanczos_extreme_eigenvalues, random_unit_vector

__all__ = [
    "ArnoldiFactors",
    "SolverDiagnostics",
    "SymmetricEigh",
    "arnoldi_factors",
    "arnoldi_inverse_hvp",
    "cg_inverse_hvp",
    "exact_inverse_hvp",
    "lissa_inverse_hvp",
    "relative_residual",
    "solve_with_eigh",
    "symmetric_eigh",
]

HVP = Callable[[Tensor], Tensor]
OnFailure = Literal["warn", "raise", "ignore"]


@dataclass
class SolverDiagnostics:
    """What a solver did.

    Attributes:
        solver: ``"exact"``, ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
        damping: the Tikhonov ``lambda`` that was added to ``H``.
        residual: worst relative residual ``||(H + lambda I) x - b|| / ||b||`` over right-hand sides.
        iterations: iterations (HVP rounds) taken.
        converged: whether the solver met its criterion.
        residuals: per right-hand-side relative residuals ``[k]``.
        details: solver-specific numbers (LiSSA scale and recursion damping, Arnoldi eigenvalues...).
    """

    solver: str
    damping: float
    residual: float
    iterations: int
    converged: bool
    residuals: Tensor = field(default_factory=lambda: torch.empty(0))
    details: dict[str, object] = field(default_factory=dict)


def _as_matrix(rhs: Tensor, argname: str = "rhs") -> tuple[Tensor, bool]:
    if rhs.dim() == 1:
        rows, single = rhs.unsqueeze(0), True
    elif rhs.dim() == 2:
        rows, single = rhs, False
    else:
        raise ValueError(
            f"`{argname}` must be a vector [D] or a matrix [k, D] of right-hand sides, got {tuple(rhs.shape)}."
        )
    _check_finite_rows(rows, argname)
    return rows, single


def _check_finite_rows(rows: Tensor, argname: str) -> None:
    # A NaN right-hand side makes every residual NaN, and NaN compares False against any tolerance:
    # CG would stop at once with zeros and the direct solvers would return NaN flagged as converged.
    finite = torch.isfinite(rows).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"`{argname}` must be finite, but rows {bad[:10]}{'...' if len(bad) > 10 else ''} (of {rows.shape[0]})"
            " contain inf/NaN; check the gradients they come from."
        )


def _check_damping(damping: float) -> float:
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"`damping` must be a finite number >= 0, got {damping}.")
    return damping


def _check_positive(value: float, argname: str) -> float:
    """``value`` as a float, refusing anything but a finite number ``> 0`` (NaN passes every ``<=`` test)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{argname}` must be a finite number > 0, got {value!r}.") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"`{argname}` must be a finite number > 0, got {value!r}.")
    return number


def _check_rcond(rcond: float | None) -> None:
    try:
        ok = rcond is None or (math.isfinite(float(rcond)) and float(rcond) >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"`rcond` must be a finite number >= 0 or None, got {rcond!r}.")


def relative_residual(hvp: HVP, x: Tensor, b: Tensor, damping: float) -> Tensor:
    """Per-row ``||(H + lambda I) x - b|| / ||b||`` for ``x, b`` of shape ``[k, D]`` (0 where ``b = 0`` and ``x = 0``)."""
    r = hvp(x) + damping * x - b
    bn = b.norm(dim=1)
    rn = r.norm(dim=1)
    return torch.where(bn > 0, rn / bn.clamp_min(torch.finfo(b.dtype).tiny), rn)


def _report(msg: str, on_failure: OnFailure) -> None:
    if on_failure == "raise":
        raise SolverNotConvergedError(msg)
    if on_failure == "warn":
        rank_zero_warn(msg)
    elif on_failure != "ignore":
        raise ValueError(f"`on_failure` must be 'warn', 'raise' or 'ignore', got {on_failure!r}.")


def _check_finite(x: Tensor, solver: str) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"The {solver} inverse-HVP produced inf/NaN (the Hessian-vector products or the iteration diverged);"
            " increase `damping` or check the loss for non-finite values."
        )


# ----------------------------------------------------------------------------------------------
# exact
# ----------------------------------------------------------------------------------------------
def exact_inverse_hvp(
    hessian: Tensor, rhs: Tensor, damping: float = 0.0, *, rcond: float | None = None
) -> tuple[Tensor, SolverDiagnostics]:
    """Solve ``(H + lambda I) x = b`` with the explicit Hessian by eigendecomposition.

    .. math:: x = V\\,\\mathrm{diag}\\big(1/(\\mu_i + \\lambda)\\big)\\,V^\\top b, \\qquad H = V\\,\\mathrm{diag}(\\mu)\\,V^\\top

    Indefinite but non-singular ``H + lambda I`` is solved as well (and flagged in ``details``).

    Args:
        hessian: symmetric ``[D, D]``.
        rhs: ``[D]`` or ``[k, D]``.
        damping: Tikhonov ``lambda >= 0``.
        rcond: an eigenvalue of ``H + lambda I`` with ``|mu + lambda| <= rcond * max|mu + lambda|``
            counts as zero (default ``D * eps`` of the dtype).

    Returns:
        ``x`` shaped like ``rhs`` and :class:`SolverDiagnostics` (``details`` holds the
        eigenvalues ``"smallest"``/``"largest"`` of ``H`` and ``"negative_curvature"``).

    Raises:
        SingularHessianError: if ``H + lambda I`` is singular, naming the smallest eigenvalue and
            suggesting ``damping``.

    Example:
        >>> import torch
        >>> H = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> x, diag = exact_inverse_hvp(H, torch.tensor([2.0, 4.0], dtype=torch.float64), damping=0.0)
        >>> x
        tensor([1., 1.], dtype=torch.float64)
    """
    damping = _check_damping(damping)
    _check_rcond(rcond)
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"`hessian` must be a square matrix [D, D], got shape {tuple(hessian.shape)}.")
    b, single = _as_matrix(rhs)
    if b.shape[1] != hessian.shape[0]:
        raise ValueError(f"`rhs` has {b.shape[1]} columns but the Hessian is {hessian.shape[0]} x {hessian.shape[0]}.")
    eig = symmetric_eigh(hessian)
    x, diag = solve_with_eigh(eig, b.to(eig.vectors.dtype), damping, rcond=rcond)
    x = x.to(rhs.dtype)
    diag.residuals = ((hessian @ x.T).T.to(torch.float64) + damping * x.to(torch.float64) - b.to(torch.float64)).norm(
        dim=1
    ) / b.to(torch.float64).norm(dim=1).clamp_min(1e-300)
    diag.residual = float(diag.residuals.max())
    return (x[0] if single else x), diag


@dataclass
class SymmetricEigh:
    """Eigendecomposition ``H = V diag(values) V^T`` (values ascending), reusable across solves."""

    values: Tensor
    vectors: Tensor


def symmetric_eigh(hessian: Tensor) -> SymmetricEigh:
    """``torch.linalg.eigh`` of the symmetrised matrix; checks for inf/NaN first."""
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("`hessian` contains inf/NaN; the loss or its second derivatives are not finite.")
    h = 0.5 * (hessian + hessian.T)
    values, vectors = torch.linalg.eigh(h)
    return SymmetricEigh(values, vectors)


def solve_with_eigh(
    eig: SymmetricEigh, b: Tensor, damping: float, *, rcond: float | None = None, pseudo_inverse: bool = False
) -> tuple[Tensor, SolverDiagnostics]:
    """``(H + lambda I)^{-1} b`` for rows ``b [k, D]`` from a precomputed :class:`SymmetricEigh`.

    The one exact solve of the package: influence functions, the fragility estimates and the
    damping sweeps all come here.

    Args:
        eig: the eigendecomposition of ``H``.
        b: right-hand sides ``[k, D]``.
        damping: Tikhonov ``lambda >= 0``.
        rcond: an eigenvalue of ``H + lambda I`` with ``|mu + lambda| <= rcond * max|mu + lambda|``
            counts as zero (default ``D * eps`` of the dtype).
        pseudo_inverse: drop those directions (the Moore-Penrose solution) instead of raising.
            A softmax output layer's weight Hessian is exactly singular along directions every
            gradient is orthogonal to, so there the pseudo-inverse is the right answer.

    Raises:
        SingularHessianError: if ``H + lambda I`` is singular and ``pseudo_inverse`` is off, naming
            the smallest eigenvalue and suggesting ``damping``.

    Example:
        >>> import torch
        >>> eig = symmetric_eigh(torch.diag(torch.tensor([0.0, 4.0], dtype=torch.float64)))
        >>> x, diag = solve_with_eigh(eig, torch.tensor([[1.0, 4.0]], dtype=torch.float64), 0.0, pseudo_inverse=True)
        >>> x, diag.details["dropped_directions"]
        (tensor([[0., 1.]], dtype=torch.float64), 1)
    """
    damping = _check_damping(damping)
    _check_rcond(rcond)
    _check_finite_rows(b, "b")
    shifted = eig.values + damping
    dim = eig.values.shape[0]
    eps = torch.finfo(eig.values.dtype).eps
    rcond = dim * eps if rcond is None else rcond
    top = float(shifted.abs().max()) if dim else 0.0
    smallest_abs = float(shifted.abs().min())
    kept = shifted.abs() > rcond * top
    if not pseudo_inverse and (top == 0.0 or not bool(kept.all())):
        raise SingularHessianError(
            f"H + damping*I is singular: its smallest |eigenvalue| is {smallest_abs:.3e} (largest {top:.3e},"
            f" damping={damping:g}). The Hessian has flat directions (e.g. redundant parameters or a model"
            " not at a strict minimum); pass `damping` > 0 (e.g. 1e-3 * largest eigenvalue)."
        )
    inverse = torch.where(kept, 1.0 / torch.where(kept, shifted, torch.ones_like(shifted)), torch.zeros_like(shifted))
    x = ((b @ eig.vectors) * inverse) @ eig.vectors.T
    smallest, largest = float(eig.values[0]), float(eig.values[-1])
    smallest_kept = float(shifted.abs()[kept].min()) if bool(kept.any()) else 0.0
    diag = SolverDiagnostics(
        solver="exact",
        damping=damping,
        residual=0.0,
        iterations=1,
        converged=True,
        details={
            "smallest": smallest,
            "largest": largest,
            "negative_curvature": bool(smallest < -1e-6 * abs(largest)),
            "indefinite_system": bool(float(shifted.min()) < 0),
            "condition_number": top / smallest_kept if smallest_kept > 0 else float("inf"),
            "dropped_directions": int((~kept).sum()),
        },
    )
    return x, diag


# ----------------------------------------------------------------------------------------------
# conjugate gradients
# ----------------------------------------------------------------------------------------------
def cg_inverse_hvp(
    hvp: HVP,
    rhs: Tensor,
    damping: float = 0.0,
    *,
    tol: float = 1e-8,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    on_failure: OnFailure = "warn",
    precision: torch.dtype | None = None,
) -> tuple[Tensor, SolverDiagnostics]:
    """Solve ``(H + lambda I) x = b`` by conjugate gradients, all right-hand sides at once.

    Every row of ``rhs`` runs its own CG recurrence (its own step sizes) but the products with ``H``
    of all active rows are taken together, ``hvp([k, D])``. A row stops when its recursive
    residual is ``<= tol_eff * ||b||``; the reported residual is recomputed from ``x`` at the end
    and the row counts as converged if it is ``<= 10 tol_eff`` (the true residual drifts from the
    recursive one). The target is floored at the working precision,

    .. math:: \\mathrm{tol_{eff}} = \\max(\\mathrm{tol},\\; 4\\,\\varepsilon),

    with ``eps`` the machine epsilon of the coarser of ``rhs``'s dtype and the dtype the products
    are computed in: products of a float32 model carry relative errors of order ``1e-7``, so the
    true residual of the best float32 solution stalls there and a smaller ``tol`` could only
    report a false failure.

    CG needs ``H + lambda I`` positive definite: a direction with ``p^T (H + lambda I) p <= 0``
    stops that row and is reported as ``negative_curvature`` (raise ``damping`` or use the
    Gauss-Newton matrix).

    Args:
        hvp: ``[k, D] -> H [k, D]`` (symmetric).
        rhs: ``[D]`` or ``[k, D]``.
        damping: Tikhonov ``lambda >= 0``.
        tol: relative residual target.
        max_iter: iteration cap (default ``min(max(10 D, 100), 1000)``).
        x0: starting guess (default zeros).
        on_failure: what to do when a row does not converge: ``"warn"``, ``"raise"``
            (:class:`SolverNotConvergedError`) or ``"ignore"``; the message names the residual.
        precision: the dtype ``hvp`` computes in (default: its ``dtype`` attribute, as a
            :class:`~lightning_influence.influence.curvature.FlatOperator` has, else ``rhs``'s).

    Returns:
        ``x`` shaped like ``rhs`` and :class:`SolverDiagnostics` (``details``: ``tol`` as given and
        the ``effective_tol`` used).

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, d = cg_inverse_hvp(lambda v: v @ A, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64)), d.converged
        (True, True)
    """
    damping = _check_damping(damping)
    b, single = _as_matrix(rhs)
    k, dim = b.shape
    if max_iter is None:
        # Rounding breaks CG's finite termination, so allow several sweeps of the dimension.
        max_iter = min(max(10 * dim, 100), 1000)
    if max_iter < 1:
        raise ValueError(f"`max_iter` must be >= 1, got {max_iter}.")
    tol = _check_positive(tol, "tol")
    if precision is None:
        precision = getattr(hvp, "dtype", None)
    if not isinstance(precision, torch.dtype) or not precision.is_floating_point:
        precision = b.dtype
    eps = max(torch.finfo(b.dtype).eps, torch.finfo(precision).eps)
    effective_tol = max(tol, 4 * eps)

    def A(v: Tensor) -> Tensor:
        return hvp(v) + damping * v

    x = torch.zeros_like(b) if x0 is None else _as_matrix(x0, "x0")[0].to(b).clone()
    r = b - A(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    bnorm = b.norm(dim=1)
    target = effective_tol * bnorm
    active = rs.sqrt() > target
    negative = torch.zeros(k, dtype=torch.bool, device=b.device)
    it = 0
    while bool(active.any()) and it < max_iter:
        it += 1
        idx = active.nonzero().squeeze(1)
        Ap = A(p[idx])
        pAp = (p[idx] * Ap).sum(1)
        bad = pAp <= 0
        if bool(bad.any()):
            negative[idx[bad]] = True
            active[idx[bad]] = False
            keep = ~bad
            idx, Ap, pAp = idx[keep], Ap[keep], pAp[keep]
            if idx.numel() == 0:
                break
        alpha = rs[idx] / pAp
        x[idx] += alpha[:, None] * p[idx]
        r[idx] -= alpha[:, None] * Ap
        rs_new = (r[idx] * r[idx]).sum(1)
        beta = rs_new / rs[idx]
        p[idx] = r[idx] + beta[:, None] * p[idx]
        rs[idx] = rs_new
        done = rs_new.sqrt() <= target[idx]
        active[idx[done]] = False

    _check_finite(x, "CG")
    residuals = relative_residual(hvp, x, b, damping)
    # The true residual can drift from the recursive one; allow a little slack before flagging.
    converged_rows = (residuals <= 10 * effective_tol) & ~negative
    diag = SolverDiagnostics(
        solver="cg",
        damping=damping,
        residual=float(residuals.max()),
        iterations=it,
        converged=bool(converged_rows.all()),
        residuals=residuals,
        details={
            "negative_curvature": bool(negative.any()),
            "max_iter": max_iter,
            "tol": tol,
            "effective_tol": effective_tol,
        },
    )
    if negative.any():
        _report(
            f"CG met non-positive curvature p^T (H + damping I) p <= 0 in {int(negative.sum())} of {k} right-hand"
            f" sides (damping={damping:g}, worst relative residual {diag.residual:.3e}): H + damping*I is not positive"
            " definite. Increase `damping`, use `gauss_newton=True`, or use the exact solver.",
            on_failure,
        )
    elif not diag.converged:
        _report(
            f"CG did not converge in {it} iterations: worst relative residual {diag.residual:.3e} > 10 x tol ="
            f" {10 * effective_tol:.3g} ({int((~converged_rows).sum())} of {k} right-hand sides"
            + (f"; tol={tol:g} floored at 4 eps of {precision}" if effective_tol > tol else "")
            + "). Increase `max_iter` or `damping`.",
            on_failure,
        )
    return (x[0] if single else x), diag


# ----------------------------------------------------------------------------------------------
# LiSSA
# ----------------------------------------------------------------------------------------------
def lissa_inverse_hvp(
    hvp: HVP,
    rhs: Tensor,
    damping: float,
    *,
    scale: float | None = None,
    depth: int = 5000,
    tol: float = 1e-7,
    eigen: EigenEstimate | None = None,
    eigen_iters: int = 30,
    on_failure: OnFailure = "warn",
    sampled_hvp: Callable[[Tensor, int], Tensor] | None = None,
    repeat: int = 1,
    residual_tol: float = 0.1,
) -> tuple[Tensor, SolverDiagnostics]:
    """LiSSA (Agarwal et al. 2017; Koh & Liang 2017): the Neumann series for ``(H + lambda I)^{-1} b``.

    The reference implementations iterate ``h <- b + (1 - d) h - H h / s`` whose fixed point is
    ``h* = s (H + s d I)^{-1} b``: their "damping" ``d`` is *not* the Tikhonov damping, ``s d`` is
    (methods.md §0: CLIF's ``d = 0.01, s = 25`` means ``lambda = 0.25``). Here ``damping`` is the
    true ``lambda``; the recursion uses ``d = lambda / s`` internally and the result is divided by
    ``s``, so LiSSA solves the same system as every other solver.

    The recursion contracts iff every eigenvalue ``mu`` of ``H`` satisfies ``-lambda < mu < 2 s - lambda``;
    it converges at rate ``max |1 - (mu + lambda) / s|``. With ``scale=None``, ``s`` is set to
    ``1.05 (mu_max + lambda)`` from a Lanczos estimate of ``mu_max``; a given ``scale`` is checked
    against that estimate and rejected if the recursion would diverge.

    By default the products are full-batch (deterministic): the recursion is a Richardson
    iteration that stops at ``tol`` and one repetition suffices. With ``sampled_hvp(v, step)``, an
    unbiased mini-batch estimate of ``H v``, it is the original stochastic LiSSA: each of
    ``repeat`` runs takes exactly ``depth`` steps and the runs are averaged; mini-batch Hessians
    have larger top eigenvalues than the mean, so the default scale doubles. The result is judged
    by its true residual (one full product per right-hand side): ``converged`` means
    ``residual <= residual_tol``.

    Args:
        hvp: ``[k, D] -> H [k, D]``.
        rhs: ``[D]`` or ``[k, D]``.
        damping: Tikhonov ``lambda >= 0`` on the mean Hessian.
        scale: the recursion's ``s`` (default: from the top eigenvalue).
        depth: maximum number of recursion steps.
        tol: stop when the relative change ``||h_{t+1} - h_t|| / ||h_{t+1}||`` of every row is below ``tol``.
        eigen: a precomputed :class:`EigenEstimate` of ``H`` (else ``eigen_iters`` Lanczos steps are run).
        eigen_iters: Lanczos steps for the eigenvalue estimate.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when the depth is exhausted before ``tol``
            (or, stochastic, the residual exceeds ``residual_tol``).
        sampled_hvp: ``(v [k, D], step) -> Ĥ_step v``, an unbiased estimate of ``H v`` (stochastic LiSSA).
        repeat: independent stochastic runs averaged (stochastic LiSSA only).
        residual_tol: relative residual accepted from stochastic LiSSA.

    Returns:
        ``x`` shaped like ``rhs`` and :class:`SolverDiagnostics` (``details``: ``scale``,
        ``recursion_damping`` ``d``, ``rate``, the eigenvalue estimates).

    Raises:
        ValueError: if ``scale`` is too small for the top eigenvalue, or ``H + lambda I`` has a
            non-positive eigenvalue (the series diverges).

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, d = lissa_inverse_hvp(lambda v: v @ A, torch.tensor([1.0, 2.0], dtype=torch.float64), damping=0.5)
        >>> torch.allclose((A + 0.5 * torch.eye(2, dtype=torch.float64)) @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        True
    """
    damping = _check_damping(damping)
    b, single = _as_matrix(rhs)
    k, dim = b.shape
    if depth < 1:
        raise ValueError(f"`depth` must be >= 1, got {depth}.")
    tol = _check_positive(tol, "tol")
    residual_tol = _check_positive(residual_tol, "residual_tol")
    if scale is not None:
        scale = _check_positive(scale, "scale")
    if repeat < 1:
        raise ValueError(f"`repeat` must be >= 1, got {repeat}.")
    if repeat > 1 and sampled_hvp is None:
        raise ValueError(
            "`repeat` > 1 only makes sense with `sampled_hvp` (stochastic LiSSA); full-batch LiSSA is deterministic."
        )
    if eigen is None:
        eigen = lanczos_extreme_eigenvalues(hvp, dim, n_iter=eigen_iters, dtype=torch.float64)
    top = eigen.largest
    if eigen.smallest + damping <= 0:
        raise ValueError(
            f"LiSSA diverges: H has an eigenvalue {eigen.smallest:.3e} <= -damping ({-damping:g}), so H + damping*I is"
            " not positive definite. Increase `damping` above the negative curvature or use `gauss_newton=True`."
        )
    # Lanczos underestimates the top eigenvalue slightly; leave a margin.
    s_min = 0.5 * (top + damping) * 1.02
    if scale is None:
        scale = (2.0 if sampled_hvp is not None else 1.05) * (top + damping)
    elif scale <= s_min:
        raise ValueError(
            f"`scale`={scale:g} is too small: the LiSSA recursion converges only if scale > (largest eigenvalue +"
            f" damping) / 2 = {0.5 * (top + damping):.4g} (largest eigenvalue estimate {top:.4g}). Use scale >="
            f" {top + damping:.4g}."
        )
    s = float(scale)
    d = damping / s
    rate = max(abs(1.0 - (eigen.smallest + damping) / s), abs(1.0 - (top + damping) / s))

    if sampled_hvp is not None:
        return _stochastic_lissa(
            hvp, sampled_hvp, b, single, damping, s, d, rate, top, eigen, depth, repeat, residual_tol, on_failure
        )

    h = b.clone()
    active = torch.ones(k, dtype=torch.bool, device=b.device)
    steps = 0
    change = torch.full((k,), math.inf, dtype=b.dtype, device=b.device)
    for steps in range(1, depth + 1):
        idx = active.nonzero().squeeze(1)
        hi = h[idx]
        new = b[idx] + (1.0 - d) * hi - hvp(hi) / s
        delta = (new - hi).norm(dim=1) / new.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        h[idx] = new
        change[idx] = delta
        if not torch.isfinite(new).all():
            break
        active[idx[delta <= tol]] = False
        if not bool(active.any()):
            break
    x = h / s
    _check_finite(x, "LiSSA")
    residuals = relative_residual(hvp, x, b, damping)
    converged = not bool(active.any())
    diag = SolverDiagnostics(
        solver="lissa",
        damping=damping,
        residual=float(residuals.max()),
        iterations=steps,
        converged=converged,
        residuals=residuals,
        details={
            "scale": s,
            "recursion_damping": d,
            "rate": rate,
            "largest": top,
            "smallest": eigen.smallest,
            "last_relative_change": float(change.max()),
        },
    )
    if not converged:
        _report(
            f"LiSSA did not converge in depth={depth} steps: relative change {float(change.max()):.3e} > tol={tol:g},"
            f" worst relative residual {diag.residual:.3e} (contraction rate {rate:.6f} with scale={s:.4g}, damping="
            f"{damping:g}). Increase `depth` or `damping`, or use the CG solver.",
            on_failure,
        )
    return (x[0] if single else x), diag


def _stochastic_lissa(
    hvp: HVP,
    sampled_hvp: Callable[[Tensor, int], Tensor],
    b: Tensor,
    single: bool,
    damping: float,
    s: float,
    d: float,
    rate: float,
    top: float,
    eigen: EigenEstimate,
    depth: int,
    repeat: int,
    residual_tol: float,
    on_failure: OnFailure,
) -> tuple[Tensor, SolverDiagnostics]:
    total = torch.zeros_like(b)
    step = 0
    bound = 1e6 * float(b.norm()) * s / max(damping + max(eigen.smallest, 0.0), 1e-12 * s)
    for _ in range(repeat):
        h = b.clone()
        for _ in range(depth):
            h = b + (1.0 - d) * h - sampled_hvp(h, step) / s
            step += 1
            if not torch.isfinite(h).all() or float(h.norm()) > bound:
                raise FloatingPointError(
                    f"Stochastic LiSSA diverged at step {step} (scale={s:.4g}): a mini-batch Hessian has an eigenvalue"
                    " above 2*scale - damping or below -damping. Pass a larger `scale` or `damping`, or larger batches."
                )
        total += h
    x = total / (repeat * s)
    residuals = relative_residual(hvp, x, b, damping)
    diag = SolverDiagnostics(
        solver="lissa",
        damping=damping,
        residual=float(residuals.max()),
        iterations=depth * repeat,
        converged=bool(residuals.max() <= residual_tol),
        residuals=residuals,
        details={
            "scale": s,
            "recursion_damping": d,
            "rate": rate,
            "largest": top,
            "smallest": eigen.smallest,
            "stochastic": True,
            "repeat": repeat,
            "depth": depth,
        },
    )
    if not diag.converged:
        _report(
            f"Stochastic LiSSA ({repeat} x {depth} steps) ended with worst relative residual {diag.residual:.3e} >"
            f" residual_tol={residual_tol:g} (contraction rate {rate:.6f}, scale={s:.4g}, damping={damping:g})."
            " Increase `depth` (bias) or `repeat` (variance), use larger batches, or use the CG solver.",
            on_failure,
        )
    return (x[0] if single else x), diag


# ----------------------------------------------------------------------------------------------
# Arnoldi (Schioppa et al. 2022)
# ----------------------------------------------------------------------------------------------
@dataclass
class ArnoldiFactors:
    """Low-rank eigen-approximation ``H ~ U diag(values) U^T`` from Arnoldi iterations.

    Attributes:
        values: the kept Ritz values ``[r]`` (largest magnitude first).
        vectors: orthonormal Ritz vectors ``[r, D]``.
        n_iter: Arnoldi steps taken (one HVP each).
        ritz_values: all Ritz values of the Krylov projection, ascending.
        ritz_residuals: bounds on ``||H u_i - mu_i u_i||`` of the kept pairs.
        restarts: deflated restarts taken after the Krylov space became invariant.
        exhausted: the basis spans the whole space (``n_iter == D``), so the pairs are exact eigenpairs.
    """

    values: Tensor
    vectors: Tensor
    n_iter: int
    ritz_values: Tensor
    ritz_residuals: Tensor = field(default_factory=lambda: torch.empty(0))
    restarts: int = 0
    exhausted: bool = False

    def converged(self, tol: float = 1e-4) -> bool:
        """Every kept Ritz pair has residual ``<= tol * max |value|``."""
        if self.ritz_residuals.numel() == 0:
            return True
        return bool(self.ritz_residuals.max() <= tol * float(self.values.abs().max()))

    def project(self, g: Tensor) -> Tensor:
        """``U g``: coordinates ``[k, r]`` of rows ``g [k, D]`` in the eigenbasis."""
        return g.to(self.vectors.dtype) @ self.vectors.T

    def inverse_diagonal(self, damping: float) -> Tensor:
        """``1 / (values + lambda)``."""
        return 1.0 / (self.values + damping)


def arnoldi_factors(
    hvp: HVP,
    dim: int,
    n_iter: int = 100,
    top_k: int = 50,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ArnoldiFactors:
    """Arnoldi iteration with full reorthogonalisation, keeping the ``top_k`` Ritz pairs of largest magnitude.

    Memory is ``(n_iter + 1) * D`` numbers (the Krylov basis), time ``n_iter`` HVPs: this is what
    lets influence functions reach millions of parameters (Schioppa et al., "Scaling up influence
    functions", AAAI 2022). The top eigen-directions carry most of the influence; the rest of
    the spectrum is dropped (its inverse is not approximated at all).

    A Krylov space ``span{q, Hq, H^2 q, ...}`` holds one direction per *distinct* eigenvalue, so
    it becomes invariant (breaks down) early when eigenvalues repeat, e.g. ``I_out (x) Sigma_x`` of
    a multi-output linear layer under squared error. The iteration then continues from a fresh
    seeded random vector orthogonalised against the basis (a deflated restart), so a repeated
    eigenvalue gets as many eigenvectors as its multiplicity (up to ``n_iter`` in all). It stops
    early only when the basis spans all ``D`` dimensions. With the discarded breakdown remainders
    ``w_b`` (``||w_b|| <= max(1e-10, 100 eps) max |T_ij|``), the Krylov relation is

    .. math:: H V = V T + \\beta_m v_{m+1} e_m^\\top + \\sum_b w_b e_b^\\top,

    so a Ritz pair ``(mu, V y)`` has ``||H V y - mu V y|| <= |beta_m y_m| + sum_b ||w_b|| |y_b|``,
    which is the reported ``ritz_residuals``.

    Args:
        hvp: ``[D] -> H [D]``.
        dim: ``D``.
        n_iter: Krylov steps (``<= D``).
        top_k: Ritz pairs kept (``<= n_iter``).
        seed: seed of the start vector and of the restart vectors.
        dtype: dtype of the basis (float32 halves the memory at scale).
        device: device of the basis (default: the operator's, else CPU).

    Raises:
        ValueError: if ``n_iter`` or ``top_k`` is below 1.
        FloatingPointError: if a Hessian-vector product is not finite.
    """
    if n_iter < 1 or top_k < 1:
        raise ValueError(f"`n_iter` and `top_k` must be >= 1, got n_iter={n_iter}, top_k={top_k}.")
    if device is None:
        device = getattr(hvp, "device", "cpu")
    eps = torch.finfo(dtype).eps
    # Twice-reorthogonalised remainders of an invariant subspace are rounding noise of order eps ||H||.
    breakdown_tol = max(1e-10, 100 * eps)
    # Drawn on the CPU from one seeded stream (its first draw is the start vector), so the restarts are
    # reproducible and identical on every device.
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def draw() -> Tensor:
        return random_unit_vector(dim, gen, dtype, device)

    m = min(n_iter, dim)
    basis = torch.empty(m + 1, dim, dtype=dtype, device=device)
    basis[0] = draw()
    hess = torch.zeros(m + 1, m, dtype=torch.float64)
    discarded = torch.zeros(m, dtype=torch.float64)
    restarts = 0
    steps = m
    for j in range(m):
        w = hvp(basis[j]).to(dtype)
        if not torch.isfinite(w).all():
            raise FloatingPointError(f"The Hessian-vector product returned inf/NaN at Arnoldi step {j}.")
        for _ in range(2):
            coeff = basis[: j + 1] @ w
            w = w - coeff @ basis[: j + 1]
            hess[: j + 1, j] += coeff.to(torch.float64).cpu()
        norm = float(w.norm())
        if norm > breakdown_tol * max(float(hess[: j + 1, : j + 1].abs().max()), norm, 1e-300):
            hess[j + 1, j] = norm
            basis[j + 1] = w / norm
            continue
        # The basis spans an invariant subspace: keep the remainder for the residual bound and go on
        # in its orthogonal complement, unless that is empty or the step budget is spent.
        discarded[j] = norm
        if j + 1 == dim:
            steps = j + 1
            break
        if j + 1 == m:
            break
        fresh = None
        for _ in range(3):
            q = draw()
            for _ in range(2):
                q = q - (basis[: j + 1] @ q) @ basis[: j + 1]
            # A Gaussian vector keeps about sqrt((D - j - 1) / D) of its norm here; far less is rounding.
            if float(q.norm()) > math.sqrt(eps):
                fresh = q / q.norm()
                break
        if fresh is None:
            steps = j + 1
            break
        basis[j + 1] = fresh
        restarts += 1
    # H is symmetric, so the Hessenberg matrix is tridiagonal up to rounding: symmetrise it.
    h = hess[:steps, :steps]
    h = 0.5 * (h + h.T)
    evals, evecs = torch.linalg.eigh(h)
    keep = min(top_k, steps)
    order = evals.abs().argsort(descending=True)[:keep]
    values = evals[order]
    vectors = (evecs[:, order].T.to(dtype).to(basis.device)) @ basis[:steps]
    # The bound of the docstring: the last step's remainder plus the ones discarded at breakdowns.
    tail = float(hess[steps, steps - 1]) if steps == m and steps < dim else 0.0
    residuals = (tail * evecs[-1, order]).abs() + discarded[:steps] @ evecs[:, order].abs()
    return ArnoldiFactors(
        values=values.to(dtype).to(basis.device),
        vectors=vectors,
        n_iter=steps,
        ritz_values=evals,
        ritz_residuals=residuals,
        restarts=restarts,
        exhausted=steps == dim,
    )


def arnoldi_inverse_hvp(
    hvp: HVP,
    rhs: Tensor,
    damping: float = 0.0,
    *,
    factors: ArnoldiFactors | None = None,
    n_iter: int = 100,
    top_k: int = 50,
    seed: int = 0,
    compute_residual: bool = True,
) -> tuple[Tensor, SolverDiagnostics]:
    """``(H + lambda I)^{-1} b ~ U^T diag(1 / (mu + lambda)) U b`` from :func:`arnoldi_factors`.

    This is the inverse restricted to the top eigen-directions: the component of ``b`` outside
    them is dropped, so the residual is *not* small in general (it is reported, with the share of
    ``||b||^2`` that the kept directions capture). ``converged`` means the kept Ritz pairs are
    accurate eigenpairs (residual ``<= 1e-4`` of the top eigenvalue), not that the system is solved. For influence scores only the projections
    ``U g`` are needed; :class:`~lightning_influence.influence.influence_function.InfluenceFunction`
    computes factors once and reuses them.

    Args:
        hvp: ``[k, D] -> H [k, D]``.
        rhs: ``[D]`` or ``[k, D]``.
        damping: Tikhonov ``lambda``; a kept Ritz value with ``mu + lambda <= 0`` raises.
        factors: precomputed factors (else computed with ``n_iter``, ``top_k``, ``seed``).
        compute_residual: spend one more HVP per right-hand side to report the true residual.

    Returns:
        ``x`` shaped like ``rhs`` and :class:`SolverDiagnostics` (``details``: kept eigenvalues,
        ``captured_fraction``).
    """
    damping = _check_damping(damping)
    b, single = _as_matrix(rhs)
    if factors is None:
        factors = arnoldi_factors(
            hvp, b.shape[1], n_iter=n_iter, top_k=top_k, seed=seed, dtype=b.dtype, device=b.device
        )
    shifted = factors.values + damping
    if bool((shifted <= 0).any()):
        raise SingularHessianError(
            f"Arnoldi kept eigenvalue {float(factors.values.min()):.3e} <= -damping ({-damping:g}): H + damping*I is"
            " not positive definite in the kept directions. Increase `damping` or use `gauss_newton=True`."
        )
    coords = factors.project(b)
    x = ((coords / shifted) @ factors.vectors).to(b.dtype)
    captured = (coords.norm(dim=1) ** 2 / (b.norm(dim=1) ** 2).clamp_min(1e-300)).to(torch.float64)
    if compute_residual:
        residuals = relative_residual(hvp, x, b, damping)
    else:
        residuals = torch.full((b.shape[0],), math.nan, dtype=torch.float64)
    diag = SolverDiagnostics(
        solver="arnoldi",
        damping=damping,
        residual=float(residuals.max()),
        iterations=factors.n_iter,
        converged=factors.converged(),
        residuals=residuals,
        details={
            "top_k": int(factors.values.numel()),
            "kept_eigenvalues": factors.values.detach().cpu(),
            "captured_fraction_min": float(captured.min()),
            "max_ritz_residual": float(factors.ritz_residuals.max()) if factors.ritz_residuals.numel() else 0.0,
            "restarts": factors.restarts,
            "exhausted": factors.exhausted,
            "smallest": float(factors.ritz_values[0]),
            "largest": float(factors.ritz_values[-1]),
        },
    )
    return (x[0] if single else x), diag
