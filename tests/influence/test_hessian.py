import torch

from lightning_influence.influence.hessian import BlockCurvature


def test_sampled_hvp_is_unbiased_with_a_short_last_batch():
    """41 samples in batches of 20, 20 and 1: the mean of many sampled products is the full H v.

    The lone last sample has a 9x larger curvature, so drawing the three batches equally often (instead
    of in proportion to their sizes) would put a third of the weight on it and miss H by about 34%.
    """
    g = torch.Generator().manual_seed(0)
    n = 41
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x[-1] *= 3.0
    lin = torch.nn.Linear(3, 1, bias=False).double()

    def loss(m, b):
        return 0.5 * m(b).squeeze(-1) ** 2  # per-sample Hessian x x^T

    state = {k: v.detach() for k, v in lin.named_parameters()}
    curvature = BlockCurvature(lin, loss, x, state, ["weight"], batch_size=20)
    assert curvature.mean_loss.batch_sizes == [20, 20, 1]
    H = x.T @ x / n
    v = torch.eye(3, dtype=torch.float64)
    with curvature.evaluating():
        torch.testing.assert_close(curvature.operator(v), v @ H)
        sampled = curvature.sampled_hvp(seed=0)
        draws = 4000
        mean = sum(sampled(v, step) for step in range(draws)) / draws
    # The Monte Carlo error of 4000 draws is under 1% here (seeds 0-2).
    assert float((mean - H).norm() / H.norm()) < 0.05
