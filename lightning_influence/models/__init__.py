"""Reference LightningModules: VAEs with the ``per_sample_loss`` the recorder uses by default, and their objective."""

from lightning_influence.models.objectives import gaussian_kl, negative_elbo
from lightning_influence.models.vae import MLPVAE, ConvVAE, VAEModule

__all__ = ["MLPVAE", "ConvVAE", "VAEModule", "gaussian_kl", "negative_elbo"]
