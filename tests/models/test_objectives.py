import math

import pytest
import torch
import torch.nn.functional as F

from lightning_influence.data.batches import batch_inputs
from lightning_influence.gradients.noise import fixed_noise, keyed_standard_normal
from lightning_influence.models import MLPVAE
from lightning_influence.models.objectives import gaussian_kl, negative_elbo


def _vae(latent=2):
    torch.manual_seed(0)
    return MLPVAE(input_dim=6, hidden_dim=5, latent_dim=latent).double()


def _manual(vae, x, eps, beta, likelihood, sigma=1.0):
    """-log p(x|z) averaged over the draws in eps [B, K, L], plus beta * KL, one sample at a time."""
    out = []
    for i in range(x.shape[0]):
        h = vae.encoder(x[i : i + 1])
        mu, logvar = h[:, :2], h[:, 2:]
        rec = []
        for k in range(eps.shape[1]):
            z = mu + torch.exp(0.5 * logvar) * eps[i, k]
            logits = vae.decoder(z)[0]
            if likelihood == "bernoulli":
                p = torch.sigmoid(logits)
                rec.append(-(x[i] * torch.log(p) + (1 - x[i]) * torch.log(1 - p)).sum())
            else:
                rec.append(((x[i] - logits) ** 2).sum() / (2 * sigma**2))
        var = logvar.exp()
        kl = 0.5 * (mu**2 + var - 1 - logvar).sum()
        out.append(torch.stack(rec).mean() + beta * kl)
    return torch.stack(out)


@pytest.mark.parametrize(
    "likelihood, beta, sigma", [("bernoulli", 1.0, 1.0), ("bernoulli", 4.0, 1.0), ("gaussian", 0.5, 0.3)]
)
@pytest.mark.parametrize("n_draws", [1, 5])
def test_negative_elbo_equals_manual_formula(likelihood, beta, sigma, n_draws):
    vae = _vae()
    x = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([3, 1, 4, 15])
    with fixed_noise(ids, seed=2):
        got = negative_elbo(vae, x, beta=beta, likelihood=likelihood, n_draws=n_draws, sigma=sigma)
    eps = keyed_standard_normal(ids, (n_draws, 2), seed=2, dtype=torch.float64)
    ref = _manual(vae, x, eps, beta, likelihood, sigma)
    assert got.shape == (4,) and got.dtype == torch.float64
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_n_draws_average_single_draw_losses():
    vae = _vae()
    x = torch.rand(3, 6, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2])
    with fixed_noise(ids, seed=0):
        avg = negative_elbo(vae, x, n_draws=6)
    eps = keyed_standard_normal(ids, (6, 2), seed=0, dtype=torch.float64)
    singles = torch.stack([_manual(vae, x, eps[:, k : k + 1], 1.0, "bernoulli") for k in range(6)], dim=1)
    assert torch.allclose(avg, singles.mean(1), rtol=1e-10)
    assert float(singles.detach().std(1).min()) > 1e-6  # the draws really differ


def test_more_draws_lower_the_variance():
    vae = _vae()
    x = torch.rand(1, 6, dtype=torch.float64).expand(400, 6)
    torch.manual_seed(3)
    with torch.no_grad():
        v1 = negative_elbo(vae, x, n_draws=1).var()
        v16 = negative_elbo(vae, x, n_draws=16).var()
    assert float(v16) < float(v1) / 6  # ~1/16 in expectation


def test_loss_of_a_sample_does_not_depend_on_its_batch():
    vae = _vae()
    x = torch.rand(5, 6, dtype=torch.float64)
    ids = torch.arange(5) + 100
    with fixed_noise(ids, seed=1):
        full = negative_elbo(vae, x, n_draws=3)
    with fixed_noise(ids[2:3], seed=1):
        one = negative_elbo(vae, x[2:3], n_draws=3)
    assert torch.allclose(full[2:3], one, rtol=1e-12)


def test_bernoulli_term_is_bce_with_logits():
    vae = _vae()
    x = torch.rand(3, 6, dtype=torch.float64)
    with fixed_noise(torch.arange(3), seed=0):
        got = negative_elbo(vae, x, beta=0.0)
    mu, logvar = vae.encode(x)
    eps = keyed_standard_normal(torch.arange(3), (1, 2), seed=0, dtype=torch.float64)[:, 0]
    z = mu + torch.exp(0.5 * logvar) * eps
    ref = F.binary_cross_entropy_with_logits(vae.decode(z), x, reduction="none").sum(1)
    assert torch.allclose(got, ref, rtol=1e-12)


def test_gaussian_kl_closed_form_vs_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logvar = 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    kl = gaussian_kl(mu, logvar)
    n = 200_000
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    log_q = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    samples = log_q - log_p
    mc = samples.mean(0)
    se = samples.std(0) / math.sqrt(n)
    assert torch.all((mc - kl).abs() < 4 * se)
    # also equals torch.distributions' closed form
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, std), torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ).sum(-1)
    assert torch.allclose(kl, ref, rtol=1e-12)
    assert torch.allclose(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_gaussian_kl_flattens_latent_dims():
    mu, logvar = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    assert torch.allclose(gaussian_kl(mu, logvar), gaussian_kl(mu.flatten(1), logvar.flatten(1)))


def test_argument_errors():
    vae = _vae()
    x = torch.rand(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="`n_draws` must be >= 1, got 0"):
        negative_elbo(vae, x, n_draws=0)
    with pytest.raises(ValueError, match="`likelihood` must be 'bernoulli' or 'gaussian', got 'poisson'"):
        negative_elbo(vae, x, likelihood="poisson")


def test_batch_inputs():
    x = torch.randn(3, 2)
    assert batch_inputs(x) is x
    assert batch_inputs((x, torch.zeros(3))) is x
    assert batch_inputs([x]) is x
    for key in ("x", "image", "input", "inputs"):
        assert batch_inputs({key: x, "label": 0}) is x
    with pytest.raises(ValueError, match=r"keys \['a', 'b'\]; use key 'x'"):
        batch_inputs({"a": x, "b": x})
    with pytest.raises(TypeError, match="got str"):
        batch_inputs("nope")
    with pytest.raises(TypeError, match="got tuple"):
        batch_inputs(())
