import math
import warnings

import pytest
import torch

from lightning_influence.errors import SingularHessianError, SolverNotConvergedError
from lightning_influence.influence.inverse_hvp import (
    arnoldi_factors,
    arnoldi_inverse_hvp,
    cg_inverse_hvp,
    exact_inverse_hvp,
    lissa_inverse_hvp,
    solve_with_eigh,
    symmetric_eigh,
)

D = 40


def _matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return (q * eigenvalues) @ q.T


def _rhs(k: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(k, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def spd():
    return _matrix(torch.logspace(-2, 1, D, dtype=torch.float64))


def _reference(H, b, lam):
    return torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), b.T).T


def test_exact_matches_dense_solve_and_flags_indefinite(spd):
    b = _rhs()
    x, diag = exact_inverse_hvp(spd, b, damping=0.1)
    assert torch.allclose(x, _reference(spd, b, 0.1), rtol=1e-10, atol=1e-12)
    assert diag.solver == "exact" and diag.converged and diag.residual < 1e-12
    assert diag.details["negative_curvature"] is False
    x1, _ = exact_inverse_hvp(spd, b[0], damping=0.1)
    assert x1.shape == (D,) and torch.allclose(x1, x[0])

    eig = torch.linspace(-1.0, 3.0, D, dtype=torch.float64) + 0.013  # no eigenvalue near 0
    H = _matrix(eig)
    x, diag = exact_inverse_hvp(H, b, damping=0.0)
    assert torch.allclose(x, _reference(H, b, 0.0), rtol=1e-9, atol=1e-10)
    assert diag.details["negative_curvature"] is True and diag.details["indefinite_system"] is True


def test_exact_singular_hessian_with_zero_damping_raises():
    eig = torch.cat([torch.zeros(3, dtype=torch.float64), torch.linspace(0.5, 2.0, D - 3, dtype=torch.float64)])
    H = _matrix(eig)
    with pytest.raises(SingularHessianError, match="singular.*`damping`"):
        exact_inverse_hvp(H, _rhs(), damping=0.0)
    _, diag = exact_inverse_hvp(H, _rhs(), damping=1e-3)
    assert diag.residual < 1e-10
    with pytest.raises(ValueError, match="`damping`"):
        exact_inverse_hvp(H, _rhs(), damping=-1.0)


def test_cg_batched_matches_exact(spd):
    b = _rhs(7)
    calls = []

    def hvp(v):
        calls.append(v.shape)
        return v @ spd

    x, diag = cg_inverse_hvp(hvp, b, damping=1e-3, tol=1e-10)
    assert torch.allclose(x, _reference(spd, b, 1e-3), rtol=1e-7, atol=1e-9)
    assert diag.converged and diag.residual <= 1e-9
    assert diag.residuals.shape == (7,)
    # right-hand sides are multiplied together, not one by one
    assert all(len(s) == 2 for s in calls) and calls[0][0] == 7


def test_cg_nonconvergence_reports_residual(spd):
    b = _rhs()
    with pytest.warns(UserWarning, match=r"CG did not converge in 2 iterations: worst relative residual \d\.\d+e"):
        _, diag = cg_inverse_hvp(lambda v: v @ spd, b, damping=0.0, max_iter=2)
    assert not diag.converged and diag.residual > 1e-3
    with pytest.raises(SolverNotConvergedError, match="residual"):
        cg_inverse_hvp(lambda v: v @ spd, b, damping=0.0, max_iter=2, on_failure="raise")


def test_cg_detects_negative_curvature():
    H = _matrix(torch.linspace(-1.0, 2.0, D, dtype=torch.float64))
    with pytest.warns(UserWarning, match="non-positive curvature"):
        _, diag = cg_inverse_hvp(lambda v: v @ H, _rhs(), damping=0.0)
    assert diag.details["negative_curvature"] and not diag.converged


def test_lissa_damping_is_the_true_tikhonov_lambda(spd):
    b = _rhs(3)
    lam = 0.5
    x, diag = lissa_inverse_hvp(lambda v: v @ spd, b, damping=lam, tol=1e-12, depth=20000)
    assert torch.allclose(x, _reference(spd, b, lam), rtol=1e-8, atol=1e-10)
    s = diag.details["scale"]
    assert diag.details["recursion_damping"] == pytest.approx(lam / s)
    # The reference implementations' "damp=d, scale=s" without the final /s returns s (H + s d I)^-1 b;
    # here the same d and s give the Tikhonov lambda = s * d, and the /s is applied.
    assert diag.converged and diag.residual < 1e-9


def test_lissa_checks_scale_and_divergence(spd):
    b = _rhs(2)
    with pytest.raises(ValueError, match="`scale`.*too small"):
        lissa_inverse_hvp(lambda v: v @ spd, b, damping=0.1, scale=2.0)  # top eigenvalue is 10
    H = _matrix(torch.linspace(-1.0, 2.0, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="diverges"):
        lissa_inverse_hvp(lambda v: v @ H, b, damping=0.5)
    with pytest.warns(UserWarning, match="LiSSA did not converge.*residual"):
        _, diag = lissa_inverse_hvp(lambda v: v @ spd, b, damping=1e-3, depth=5)
    assert not diag.converged and diag.residual > 1e-2


def test_arnoldi_full_rank_is_exact_and_low_rank_spectrum_is_captured(spd):
    b = _rhs()
    x, diag = arnoldi_inverse_hvp(lambda v: v @ spd, b, damping=1e-2, n_iter=D, top_k=D)
    assert torch.allclose(x, _reference(spd, b, 1e-2), rtol=1e-7, atol=1e-8)
    assert diag.converged and diag.residual < 1e-8

    # A rank-5 Hessian: 12 Arnoldi steps find its range, and right-hand sides in the range are solved.
    eig = torch.cat(
        [torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0], dtype=torch.float64), torch.zeros(D - 5, dtype=torch.float64)]
    )
    H = _matrix(eig, seed=3)
    f = arnoldi_factors(lambda v: H @ v, D, n_iter=12, top_k=5, dtype=torch.float64)
    assert torch.allclose(f.values.sort().values, eig[:5].sort().values, atol=1e-10)
    assert f.converged()
    b_range = _rhs(3) @ H
    x, diag = arnoldi_inverse_hvp(lambda v: v @ H, b_range, damping=0.1, factors=f)
    assert torch.allclose(x, _reference(H, b_range, 0.1), atol=1e-9)
    assert diag.details["captured_fraction_min"] == pytest.approx(1.0, abs=1e-12)


def test_stochastic_lissa_with_minibatch_hessians(spd):
    """H = (A_0 + A_1) / 2; each step uses one A_i (an unbiased estimate), runs are averaged."""
    g = torch.Generator().manual_seed(5)
    noise = _matrix(torch.linspace(-0.5, 0.5, D, dtype=torch.float64), seed=7)
    parts = [spd + noise, spd - noise]
    b = _rhs(2)

    def sampled(v, step):
        return v @ parts[int(torch.randint(2, (1,), generator=g))]

    x, diag = lissa_inverse_hvp(lambda v: v @ spd, b, damping=1.0, sampled_hvp=sampled, depth=300, repeat=8)
    ref = _reference(spd, b, 1.0)
    assert diag.details["stochastic"] and diag.iterations == 2400
    assert diag.residual == pytest.approx(float(((x @ spd + x - b).norm(dim=1) / b.norm(dim=1)).max()))
    assert (x - ref).norm() / ref.norm() < 0.1
    with pytest.raises(ValueError, match="`repeat`"):
        lissa_inverse_hvp(lambda v: v @ spd, b, damping=1.0, repeat=2)
    with pytest.raises(FloatingPointError, match="diverged"):
        lissa_inverse_hvp(lambda v: v @ spd, b, damping=1.0, sampled_hvp=lambda v, t: 40.0 * v @ spd, depth=500)


def test_arnoldi_restarts_after_breakdown_so_repeated_eigenvalues_get_every_eigenvector():
    """4 distinct eigenvalues, each 10 times: one Krylov sequence spans only 4 dimensions.

    Without a restart the iteration stopped after 4 steps, kept 4 pairs and called them converged;
    each restart from a fresh vector orthogonal to the basis adds one more copy of every eigenvalue.
    """
    distinct = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    H = _matrix(distinct.repeat_interleave(10), seed=2)
    f = arnoldi_factors(lambda v: v @ H, D, n_iter=20, top_k=20, dtype=torch.float64)
    assert f.n_iter == 20 and f.restarts == 4 and not f.exhausted
    torch.testing.assert_close(f.values.sort().values, distinct.repeat(5).sort().values)
    assert f.converged() and float(f.ritz_residuals.max()) < 1e-9
    torch.testing.assert_close(f.vectors @ f.vectors.T, torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(f.vectors @ H, f.values[:, None] * f.vectors)

    b = _rhs()
    x, diag = arnoldi_inverse_hvp(lambda v: v @ H, b, damping=1e-2, n_iter=D, top_k=D)
    torch.testing.assert_close(x, _reference(H, b, 1e-2))
    assert diag.converged and diag.residual < 1e-10 and diag.iterations == D and diag.details["top_k"] == D
    assert diag.details["exhausted"] and diag.details["restarts"] == 9


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_solver_refuses_a_non_finite_right_hand_side_by_name(spd, bad):
    """A NaN rhs made CG stop at once with zeros and the direct solvers return NaN flagged converged."""
    b = _rhs(3)
    b[1, 4] = bad
    hvp = lambda v: v @ spd  # noqa: E731
    message = r"`rhs` must be finite, but rows \[1\] \(of 3\) contain inf/NaN"
    for solve in (
        lambda: exact_inverse_hvp(spd, b, damping=0.1),
        lambda: cg_inverse_hvp(hvp, b, damping=0.1),
        lambda: lissa_inverse_hvp(hvp, b, damping=0.1),
        lambda: arnoldi_inverse_hvp(hvp, b, damping=0.1, n_iter=D, top_k=D),
    ):
        with pytest.raises(ValueError, match=message):
            solve()
    with pytest.raises(ValueError, match=r"`b` must be finite"):
        solve_with_eigh(symmetric_eigh(spd), b, 0.1)
    with pytest.raises(ValueError, match=r"`x0` must be finite"):
        cg_inverse_hvp(hvp, _rhs(3), damping=0.1, x0=b)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -1.0])
def test_tolerances_and_scale_must_be_finite_and_positive(spd, bad):
    b = _rhs(2)
    hvp = lambda v: v @ spd  # noqa: E731
    for name, solve in (
        ("tol", lambda: cg_inverse_hvp(hvp, b, damping=0.1, tol=bad)),
        ("tol", lambda: lissa_inverse_hvp(hvp, b, damping=0.1, tol=bad)),
        ("scale", lambda: lissa_inverse_hvp(hvp, b, damping=0.1, scale=bad)),
        ("residual_tol", lambda: lissa_inverse_hvp(hvp, b, damping=0.1, residual_tol=bad)),
    ):
        with pytest.raises(ValueError, match=rf"`{name}` must be a finite number > 0, got {bad}"):
            solve()
    with pytest.raises(ValueError, match=r"`rcond` must be a finite number >= 0"):
        exact_inverse_hvp(spd, b, damping=0.1, rcond=-1.0 if bad == 0.0 else bad)
    with pytest.raises(ValueError, match=r"`rcond` must be a finite number >= 0 or None, got \[0.1\]"):
        exact_inverse_hvp(spd, b, damping=0.1, rcond=[0.1])  # a TypeError from float() before


def test_cg_tolerance_is_floored_at_the_precision_of_the_products():
    """float32 products stall the true residual near 1e-7: tol=1e-8 is unreachable, not a failure."""
    H = _matrix(torch.linspace(0.5, 2.0, D, dtype=torch.float64))
    H32 = H.float()
    b = _rhs(4)

    def hvp(v):
        return (v.float() @ H32).to(v.dtype)  # a float64 solve over a float32 model, as FlatOperator does

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        x, diag = cg_inverse_hvp(hvp, b, damping=0.0, tol=1e-8, precision=torch.float32)
    eps = torch.finfo(torch.float32).eps
    assert diag.converged and diag.details["effective_tol"] == 4 * eps and diag.residual <= 40 * eps
    assert float((x - _reference(H, b, 0.0)).norm() / _reference(H, b, 0.0).norm()) < 1e-5
    # float32 right-hand sides set the precision on their own; an unconverged solve still fails.
    _, diag = cg_inverse_hvp(lambda v: v @ H32, b.float(), damping=0.0, tol=1e-8, on_failure="ignore")
    assert diag.converged and diag.details["effective_tol"] == 4 * eps
    with pytest.warns(UserWarning, match=r"CG did not converge in 2 iterations.*floored at 4 eps of torch.float32"):
        _, diag = cg_inverse_hvp(hvp, b, damping=0.0, max_iter=2, precision=torch.float32)
    assert not diag.converged
    # float64 products keep the requested tolerance.
    _, diag = cg_inverse_hvp(lambda v: v @ H, b, damping=0.0, tol=1e-12)
    assert diag.details["effective_tol"] == 1e-12 and diag.residual <= 1e-11
