"""KDE and k-NN densities: closed-form leave-one-out influence against brute-force refits."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_influence.influence.density import (
    kde_log_density,
    kde_loo_influence,
    kde_loo_influence_bruteforce,
    knn_log_density,
    knn_loo_influence,
    knn_loo_influence_bruteforce,
    unit_ball_log_volume,
)


@pytest.fixture(scope="module")
def six_clusters() -> torch.Tensor:
    """2-D data with six clusters of different sizes and spreads (the VAE-TracIn paper's illustration)."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor(
        [[0.0, 0.0], [4.0, 0.0], [8.0, 1.0], [0.0, 5.0], [4.0, 6.0], [9.0, 6.0]], dtype=torch.float64
    )
    sizes = [30, 20, 12, 8, 25, 5]
    spreads = [0.3, 0.6, 1.0, 0.4, 0.8, 1.5]
    pts = [c + s * torch.randn(n, 2, generator=gen, dtype=torch.float64) for c, n, s in zip(centres, sizes, spreads)]
    return torch.cat(pts)


@pytest.fixture(scope="module")
def queries(six_clusters: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    off_data = torch.rand(15, 2, generator=gen, dtype=torch.float64) * torch.tensor([10.0, 8.0]) - 1.0
    return torch.cat([off_data, six_clusters[::7]])  # includes training points (self-influence)


@pytest.mark.parametrize("bandwidth", [0.2, 0.7, 2.0])
def test_kde_closed_form_matches_bruteforce(six_clusters, queries, bandwidth):
    closed = kde_loo_influence(queries, six_clusters, bandwidth)
    brute = kde_loo_influence_bruteforce(queries, six_clusters, bandwidth)
    assert closed.shape == (queries.shape[0], six_clusters.shape[0])
    assert closed.dtype == torch.float64
    assert (closed - brute).abs().max().item() <= 1e-10


@pytest.mark.parametrize("k", [2, 3, 7])
def test_knn_closed_form_matches_bruteforce(six_clusters, queries, k):
    closed = knn_loo_influence(queries, six_clusters, k)
    brute = knn_loo_influence_bruteforce(queries, six_clusters, k)
    assert (closed - brute).abs().max().item() <= 1e-10


def test_knn_closed_form_with_ties_and_duplicates():
    # An integer grid with a duplicated point: many distances tie exactly.
    g = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(4.0), indexing="ij"), dim=-1).reshape(-1, 2)
    x = torch.cat([g, g[:3]]).to(torch.float64)
    z = torch.tensor([[1.5, 1.5], [2.0, 2.0], [0.5, 0.0], [3.0, 1.0]], dtype=torch.float64)
    for k in (1, 2, 4, 5):
        if k == 1:
            z_k = z[[0, 2]]  # grid points are at distance 0 from themselves: density infinite for k=1
        else:
            z_k = z
        closed = knn_loo_influence(z_k, x, k)
        brute = knn_loo_influence_bruteforce(z_k, x, k)
        assert (closed - brute).abs().max().item() <= 1e-10, k


def test_knn_proponents_are_exactly_the_k_nearest_neighbours(six_clusters, queries):
    k = 5
    inf = knn_loo_influence(queries, six_clusters, k)
    n = six_clusters.shape[0]
    dist = torch.cdist(queries, six_clusters)
    for m in range(queries.shape[0]):
        nearest = set(torch.argsort(dist[m])[:k].tolist())
        proponents = set(torch.nonzero(inf[m] > math.log((n - 1) / n) + 1e-12).reshape(-1).tolist())
        assert proponents <= nearest
        # A neighbour is a strict proponent unless R_{k+1} == R_k (a tie), which generic data lacks.
        assert proponents == nearest
        others = inf[m, [i for i in range(n) if i not in nearest]]
        assert torch.allclose(others, torch.full_like(others, math.log((n - 1) / n)))


def test_kde_self_influence_is_high_in_sparse_regions(six_clusters):
    # "High self influence samples come from sparse regions": self-influence falls with density.
    h = 0.5
    self_inf = kde_loo_influence(six_clusters, six_clusters, h).diagonal()
    log_density = kde_log_density(six_clusters, six_clusters, h)
    ranks_inf = torch.argsort(torch.argsort(self_inf)).double()
    ranks_den = torch.argsort(torch.argsort(log_density)).double()
    rho = torch.corrcoef(torch.stack([ranks_inf, ranks_den]))[0, 1].item()
    assert rho < -0.9
    assert (self_inf > 0).all()  # every point supports its own likelihood


def test_kde_log_density_against_gaussian_formula():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    h = 0.8
    k = lambda d2: math.exp(-d2 / (2 * h * h)) / (2 * math.pi * h * h)
    expected = math.log(0.5 * (k(0.5) + k(0.5)))
    assert kde_log_density(z, x, h).item() == pytest.approx(expected, abs=1e-12)


def test_knn_log_density_formula():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    z = torch.zeros(1, 2, dtype=torch.float64)
    # k = 2: R_2 = 1, p = 2 / (3 * pi * 1^2)
    assert knn_log_density(z, x, 2).item() == pytest.approx(math.log(2 / (3 * math.pi)), abs=1e-12)
    assert unit_ball_log_volume(3) == pytest.approx(math.log(4 / 3 * math.pi), abs=1e-12)


def test_inputs_are_upcast_to_float64(six_clusters):
    x32 = six_clusters.float()
    out = kde_loo_influence(x32[:3], x32, 0.5)
    assert out.dtype == torch.float64


def test_bad_inputs_name_the_argument(six_clusters):
    with pytest.raises(ValueError, match="`bandwidth`"):
        kde_loo_influence(six_clusters[:2], six_clusters, 0.0)
    with pytest.raises(ValueError, match="`queries` have 3 features"):
        kde_loo_influence(torch.zeros(2, 3), six_clusters, 1.0)
    with pytest.raises(ValueError, match="`k`"):
        knn_loo_influence(six_clusters[:2], six_clusters, 0)
    with pytest.raises(ValueError, match="k \\+ 1"):
        knn_loo_influence(six_clusters[:2], six_clusters[:3], 3)
    with pytest.raises(ValueError, match="distance 0"):
        knn_log_density(six_clusters[:1], six_clusters, 1)  # a training point is its own 1st neighbour
    with pytest.raises(ValueError, match="inf or NaN"):
        kde_log_density(torch.tensor([[float("nan"), 0.0]]), six_clusters, 1.0)
    with pytest.raises(TypeError, match="floating point"):
        kde_log_density(torch.zeros(1, 2, dtype=torch.long), six_clusters, 1.0)
