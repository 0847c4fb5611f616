"""Kernel and k-nearest-neighbour density estimators whose leave-one-out influence is known exactly.

These are the classical sanity baselines of the VAE-TracIn paper (Kong & Chaudhuri, 2021): for
them, removing one training point and refitting is cheap and exact, so an influence method, a
fragility check or a test can be compared against the truth to machine precision.

Influence follows the package's sign convention: the influence of training point ``x_i`` on a
query ``z`` is the change of the negative log-likelihood of ``z`` when ``x_i`` is removed,

.. math::

    \\mathrm{IF}(x_i, z) = -\\log p_{X \\setminus \\{x_i\\}}(z) + \\log p_X(z),

so ``IF > 0`` marks a proponent (removing ``x_i`` makes ``z`` less likely). Self-influence is
``IF(x_i, x_i)``.

Everything is computed in float64; inputs of any floating dtype are upcast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "kde_log_density",
    "kde_loo_influence",
    "kde_loo_influence_bruteforce",
    "knn_log_density",
    "knn_loo_influence",
    "knn_loo_influence_bruteforce",
    "unit_ball_log_volume",
]


def _as_points(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [N, D], got {type(t).__name__}.")
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2:
        raise ValueError(f"`{name}` must have shape [N, D] (or [N] for 1-D data), got {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must be floating point, got {t.dtype}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"`{name}` contains inf or NaN.")
    return t.to(torch.float64)


def _check_pair(queries: Tensor, train: Tensor) -> tuple[Tensor, Tensor]:
    z = _as_points(queries, "queries")
    x = _as_points(train, "train")
    if z.shape[1] != x.shape[1]:
        raise ValueError(
            f"`queries` have {z.shape[1]} features but `train` has {x.shape[1]}; both must be [*, D] with the same D."
        )
    return z, x


def _check_bandwidth(bandwidth: float) -> float:
    if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"`bandwidth` must be a positive finite number, got {bandwidth!r}.")
    return float(bandwidth)


def _log_gaussian_kernel(z: Tensor, x: Tensor, bandwidth: float) -> Tensor:
    """``log K_h(z_m - x_n)`` for the isotropic Gaussian kernel, shape ``[M, N]``."""
    d = z.shape[1]
    sq = torch.cdist(z, x).square()
    return -sq / (2.0 * bandwidth**2) - 0.5 * d * math.log(2.0 * math.pi * bandwidth**2)


def kde_log_density(queries: Tensor, train: Tensor, bandwidth: float) -> Tensor:
    """Log density of a Gaussian kernel density estimate, ``log p(z) = log (1/N) sum_j K_h(z - x_j)``.

    ``K_h(u) = (2 pi h^2)^{-D/2} exp(-|u|^2 / (2 h^2))``.

    Args:
        queries: points ``z``, shape ``[M, D]``.
        train: training points ``x``, shape ``[N, D]``.
        bandwidth: kernel width ``h > 0``.

    Returns:
        ``Tensor[M]`` in float64.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 1)
        >>> round(float(kde_log_density(torch.zeros(1, 1), x, 1.0)), 6)  # log N(0; 0, 1)
        -0.918939
    """
    z, x = _check_pair(queries, train)
    h = _check_bandwidth(bandwidth)
    if x.shape[0] == 0:
        raise ValueError("`train` is empty: a density estimate needs at least one point.")
    return torch.logsumexp(_log_gaussian_kernel(z, x, h), dim=1) - math.log(x.shape[0])


def _log_sum_except_each(log_terms: Tensor) -> Tensor:
    """``log sum_{j != i} exp(a_j)`` for every ``i`` along the last dimension, without subtraction."""
    m = log_terms.shape[0]
    pad = torch.full((m, 1), -math.inf, dtype=log_terms.dtype, device=log_terms.device)
    prefix = torch.cat([pad, torch.logcumsumexp(log_terms, dim=1)[:, :-1]], dim=1)  # sum_{j < i}
    suffix = torch.cat([torch.logcumsumexp(log_terms.flip(1), dim=1).flip(1)[:, 1:], pad], dim=1)  # sum_{j > i}
    return torch.logaddexp(prefix, suffix)


def kde_loo_influence(queries: Tensor, train: Tensor, bandwidth: float) -> Tensor:
    """Closed-form leave-one-out influence of every training point on every query for a Gaussian KDE.

    With ``p(z) = (1/N) sum_j K_h(z - x_j)``, removing ``x_i`` gives
    ``p_{-i}(z) = (N p(z) - K_h(z - x_i)) / (N - 1)``, hence

    .. math::

        \\mathrm{IF}(x_i, z) = \\log \\frac{(N - 1)\\, p(z)}{N p(z) - K_h(z - x_i)}.

    The difference ``N p(z) - K_i = sum_{j != i} K_j`` is never formed by subtraction, which
    cancels catastrophically when ``x_i`` carries almost all of the kernel mass at ``z`` (the
    self-influence of an isolated point): it is the log-sum-exp of the kernels before ``i`` and
    after ``i``, from prefix and suffix ``logcumsumexp`` -- ``O(M N)``, accurate to rounding.

    Args:
        queries: points ``z``, shape ``[M, D]``.
        train: training points ``x``, shape ``[N, D]`` with ``N >= 2``.
        bandwidth: kernel width ``h > 0``.

    Returns:
        ``Tensor[M, N]`` (float64): entry ``[m, i]`` is ``IF(x_i, z_m)``; positive = proponent.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [0.1], [5.0]])
        >>> inf = kde_loo_influence(torch.tensor([[0.0]]), x, bandwidth=0.5)
        >>> bool(inf[0, 0] > 0 and inf[0, 2] < 0)  # near point: proponent; far point: opponent
        True
    """
    z, x = _check_pair(queries, train)
    h = _check_bandwidth(bandwidth)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"`train` needs at least 2 points for leave-one-out, got {n}.")
    log_k = _log_gaussian_kernel(z, x, h)  # [M, N]
    log_s = torch.logsumexp(log_k, dim=1, keepdim=True)  # log(N p(z))
    log_rest = _log_sum_except_each(log_k)  # log(N p(z) - K_i)
    return math.log((n - 1) / n) + log_s - log_rest


def kde_loo_influence_bruteforce(queries: Tensor, train: Tensor, bandwidth: float) -> Tensor:
    """Leave-one-out influence by refitting the KDE without each point (reference for tests).

    Costs ``O(M N^2 D)``; same output as :func:`kde_loo_influence`.
    """
    z, x = _check_pair(queries, train)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"`train` needs at least 2 points for leave-one-out, got {n}.")
    full = kde_log_density(z, x, bandwidth)
    out = torch.empty(z.shape[0], n, dtype=torch.float64)
    keep = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        keep[i] = False
        out[:, i] = full - kde_log_density(z, x[keep], bandwidth)
        keep[i] = True
    return out


def unit_ball_log_volume(dim: int) -> float:
    """``log V_D`` with ``V_D = pi^{D/2} / Gamma(D/2 + 1)``, the volume of the unit ball in ``R^D``."""
    if dim < 1:
        raise ValueError(f"`dim` must be >= 1, got {dim}.")
    return 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim + 1.0)


def _check_k(k: int, n: int, extra: int = 0) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if k + extra > n:
        need = "k + 1" if extra else "k"
        raise ValueError(f"`k`={k} needs at least {need} = {k + extra} training points, got {n}.")
    return k


def _sorted_distances(z: Tensor, x: Tensor) -> Tensor:
    return torch.cdist(z, x).sort(dim=1).values


def knn_log_density(queries: Tensor, train: Tensor, k: int) -> Tensor:
    """Log density of the k-nearest-neighbour estimator, ``p(z) = k / (N V_D R_k(z)^D)``.

    ``R_k(z)`` is the distance from ``z`` to its ``k``-th nearest training point. Training points
    that coincide with ``z`` count as neighbours at distance 0 (the estimator depends on the
    training set only; a query is never excluded from its own neighbourhood). Use ``k >= 2`` for
    self-influence of training points.

    Args:
        queries: points ``z``, shape ``[M, D]``.
        train: training points ``x``, shape ``[N, D]`` with ``N >= k``.
        k: number of neighbours.

    Returns:
        ``Tensor[M]`` (float64).

    Raises:
        ValueError: if ``R_k(z) = 0`` for some query (``k`` training points coincide with it, the
            density is infinite); raise ``k``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [2.0]])
        >>> round(float(knn_log_density(torch.tensor([[0.5]]), x, k=1).exp()), 6)  # 1 / (2 * 2 * 0.5)
        0.5
    """
    z, x = _check_pair(queries, train)
    n, d = x.shape
    _check_k(k, n)
    r_k = _sorted_distances(z, x)[:, k - 1]
    _check_radius(r_k, k)
    return math.log(k) - math.log(n) - unit_ball_log_volume(d) - d * torch.log(r_k)


def _check_radius(r_k: Tensor, k: int) -> None:
    if (r_k <= 0).any():
        bad = int(torch.nonzero(r_k <= 0)[0, 0])
        raise ValueError(
            f"query {bad} has {k} or more training points at distance 0, so the k-NN density is infinite;"
            f" use a larger `k` (got k={k})."
        )


def knn_loo_influence(queries: Tensor, train: Tensor, k: int) -> Tensor:
    """Closed-form leave-one-out influence for the k-NN density estimator.

    Removing ``x_i`` changes ``N`` to ``N - 1`` and, if ``x_i`` is among the ``k`` nearest
    neighbours of ``z``, moves the ``k``-th neighbour out to the old ``(k+1)``-th:

    .. math::

        \\mathrm{IF}(x_i, z) = \\log\\frac{N-1}{N}
            + \\mathbb{1}[\\lVert z - x_i \\rVert \\le R_k(z)]\\; D \\log\\frac{R_{k+1}(z)}{R_k(z)}.

    Ties are exact: if ``x_i`` is at distance exactly ``R_k(z)`` but not counted among the first
    ``k``, a tie means ``R_{k+1}(z) = R_k(z)`` and the second term is 0 either way.

    Args:
        queries: points ``z``, shape ``[M, D]``.
        train: training points ``x``, shape ``[N, D]`` with ``N >= k + 1``.
        k: number of neighbours.

    Returns:
        ``Tensor[M, N]`` (float64): entry ``[m, i]`` is ``IF(x_i, z_m)``; the ``k`` nearest
        neighbours are the only proponents.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [1.0], [3.0]])
        >>> inf = knn_loo_influence(torch.tensor([[0.2]]), x, k=1)
        >>> [round(v, 4) for v in inf[0].tolist()]  # log(2/3) + log(0.8/0.2) for the neighbour
        [0.9808, -0.4055, -0.4055]
    """
    z, x = _check_pair(queries, train)
    n, d = x.shape
    _check_k(k, n, extra=1)
    dist = torch.cdist(z, x)
    radii = dist.sort(dim=1).values
    r_k, r_k1 = radii[:, k - 1 : k], radii[:, k : k + 1]
    _check_radius(r_k.squeeze(1), k)
    member = dist <= r_k
    return math.log((n - 1) / n) + member.to(torch.float64) * (d * (torch.log(r_k1) - torch.log(r_k)))


def knn_loo_influence_bruteforce(queries: Tensor, train: Tensor, k: int) -> Tensor:
    """Leave-one-out influence by refitting the k-NN density without each point (reference for tests)."""
    z, x = _check_pair(queries, train)
    n = x.shape[0]
    _check_k(k, n, extra=1)
    full = knn_log_density(z, x, k)
    out = torch.empty(z.shape[0], n, dtype=torch.float64)
    keep = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        keep[i] = False
        out[:, i] = full - knn_log_density(z, x[keep], k)
        keep[i] = True
    return out
