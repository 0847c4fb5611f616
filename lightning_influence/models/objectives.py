"""Per-sample objectives: the negative beta-ELBO of a VAE.

Any VAE that exposes ``encode(x) -> (mu, logvar)`` and ``decode(z) -> x_hat`` (logits for a
Bernoulli likelihood, means for a Gaussian one) works with :func:`negative_elbo`. The
reparameterisation noise comes from :func:`lightning_influence.gradients.noise.standard_normal`, so under
influence recording a sample sees the same noise, keyed by ``(seed, sample id, draw)``, at every
checkpoint.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_influence.gradients.noise import standard_normal

__all__ = ["VAEProtocol", "gaussian_kl", "negative_elbo"]

Likelihood = Literal["bernoulli", "gaussian"]


class VAEProtocol(Protocol):
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, z: Tensor) -> Tensor: ...


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample, summed over latent dimensions.

    .. math:: \\mathrm{KL} = \\tfrac12 \\sum_j \\left(\\mu_j^2 + e^{\\log\\sigma_j^2} - 1 - \\log\\sigma_j^2\\right)
    """
    mu, logvar = mu.flatten(1), logvar.flatten(1)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def negative_elbo(
    vae: VAEProtocol,
    x: Tensor,
    *,
    beta: float = 1.0,
    likelihood: Likelihood = "bernoulli",
    n_draws: int = 1,
    sigma: float = 1.0,
) -> Tensor:
    """Per-sample negative beta-ELBO, averaged over ``n_draws`` reparameterisation draws.

    .. math::
        \\ell_\\beta(x) = \\frac{1}{K}\\sum_{k=1}^{K} -\\log p(x \\mid z_k)
            + \\beta\\,\\mathrm{KL}(q(z\\mid x)\\,\\|\\,\\mathcal N(0, I)),
        \\qquad z_k = \\mu(x) + \\sigma(x)\\odot\\epsilon_k

    The Bernoulli term is binary cross-entropy with logits summed over pixels (targets in
    ``[0, 1]``); the Gaussian term is ``||x - x_hat||^2 / (2 sigma^2)`` summed over pixels (the
    constant ``D log sigma + (D / 2) log 2 pi`` is dropped: it has no gradient, so the value is not a
    proper negative log-density).

    Args:
        vae: a module with ``encode`` and ``decode``.
        x: inputs ``[B, ...]``.
        beta: weight of the KL term.
        likelihood: ``"bernoulli"`` (decoder returns logits) or ``"gaussian"`` (decoder returns means).
        n_draws: reparameterisation draws averaged per sample (the VAE-TracIn code uses 16).
        sigma: observation noise of the Gaussian likelihood.

    Returns:
        ``Tensor[B]``.

    Example:
        >>> import torch
        >>> from lightning_influence.models.vae import MLPVAE
        >>> vae = MLPVAE(input_dim=64, hidden_dim=32, latent_dim=4)
        >>> negative_elbo(vae, torch.rand(5, 64), n_draws=3).shape
        torch.Size([5])
    """
    if n_draws < 1:
        raise ValueError(f"`n_draws` must be >= 1, got {n_draws}.")
    if likelihood not in ("bernoulli", "gaussian"):
        raise ValueError(f"`likelihood` must be 'bernoulli' or 'gaussian', got {likelihood!r}.")
    mu, logvar = vae.encode(x)
    b = x.shape[0]
    latent_shape = tuple(mu.shape[1:])
    eps = standard_normal((b, n_draws, *latent_shape), like=mu)
    z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    out = vae.decode(z.reshape(b * n_draws, *latent_shape)).reshape(b, n_draws, -1)
    target = x.reshape(b, 1, -1).to(out.dtype).expand_as(out)
    if likelihood == "bernoulli":
        rec = F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(dim=2)
    else:
        rec = 0.5 * (out - target).pow(2).sum(dim=2) / (sigma**2)
    return rec.mean(dim=1) + beta * gaussian_kl(mu, logvar).to(rec.dtype)
