"""Reference VAEs as LightningModules, each with the ``per_sample_loss`` the recorder uses by default."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_influence.data.batches import batch_inputs
from lightning_influence.models.objectives import Likelihood, negative_elbo

__all__ = ["MLPVAE", "ConvVAE", "VAEModule"]


class VAEModule(pl.LightningModule):
    """Shared training logic: subclasses define ``encode(x) -> (mu, logvar)`` and ``decode(z)``.

    Training minimises the mean of :meth:`per_sample_loss` with ``train_draws`` draws; influence
    uses :meth:`per_sample_loss` with ``influence_draws`` draws (averaging draws lowers the
    Monte-Carlo noise of each per-sample gradient).

    Args:
        beta: KL weight of the beta-ELBO.
        likelihood: ``"bernoulli"`` (inputs in [0, 1], decoder logits) or ``"gaussian"``.
        sigma: observation noise of the Gaussian likelihood.
        lr: learning rate.
        optimizer: ``"sgd"`` (the setting TracIn's theory assumes) or ``"adam"``.
        momentum: SGD momentum.
        train_draws: reparameterisation draws per sample in training.
        influence_draws: draws per sample in :meth:`per_sample_loss` (16 in the VAE-TracIn code).
    """

    def __init__(
        self,
        beta: float = 1.0,
        likelihood: Likelihood = "bernoulli",
        sigma: float = 1.0,
        lr: float = 1e-3,
        optimizer: Literal["sgd", "adam"] = "adam",
        momentum: float = 0.0,
        train_draws: int = 1,
        influence_draws: int = 16,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adam', got {optimizer!r}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}.")
        for name, value in (("train_draws", train_draws), ("influence_draws", influence_draws)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.beta = beta
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"`likelihood` must be 'bernoulli' or 'gaussian', got {likelihood!r}.")
        if sigma <= 0:
            raise ValueError(f"`sigma` must be > 0, got {sigma}.")
        self.likelihood: Likelihood = likelihood
        self.sigma = sigma
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.train_draws = train_draws
        self.influence_draws = influence_draws

    @override
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction from the posterior mean, with ``(mu, logvar)``."""
        mu, logvar = self.encode(x)
        return self.decode(mu), mu, logvar

    def per_sample_loss(self, batch: Any, n_draws: int | None = None) -> Tensor:
        """Negative beta-ELBO of each sample, ``Tensor[B]``."""
        draws = self.influence_draws if n_draws is None else n_draws
        return negative_elbo(
            self, batch_inputs(batch), beta=self.beta, likelihood=self.likelihood, n_draws=draws, sigma=self.sigma
        )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.per_sample_loss(batch, n_draws=self.train_draws).mean()
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self.per_sample_loss(batch, n_draws=self.train_draws).mean()
        self.log("val_loss", loss, prog_bar=True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MLPVAE(VAEModule):
    """A fully connected VAE (encoder ``D -> H -> 2L``, decoder ``L -> H -> D``).

    Args:
        input_dim: flattened input size (64 for the 8x8 digits).
        hidden_dim: hidden width.
        latent_dim: latent size.
        **kwargs: see :class:`VAEModule`.

    Example:
        >>> vae = MLPVAE(input_dim=64, hidden_dim=32, latent_dim=4)
        >>> vae.per_sample_loss(torch.rand(3, 64)).shape
        torch.Size([3])
    """

    def __init__(self, input_dim: int = 64, hidden_dim: int = 128, latent_dim: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.input_dim = input_dim
        self.encoder = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, input_dim))

    @override
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    @override
    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)


class ConvVAE(VAEModule):
    """A convolutional VAE with a ``ConvTranspose2d`` decoder, for square single- or multi-channel images.

    Args:
        image_size: height = width of the input (divisible by 4).
        channels: input channels.
        width: channels of the first conv layer (the second has ``2 * width``).
        latent_dim: latent size.
        **kwargs: see :class:`VAEModule`.

    Example:
        >>> vae = ConvVAE(image_size=8, channels=1, width=4, latent_dim=3)
        >>> vae.per_sample_loss(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2])
    """

    def __init__(
        self, image_size: int = 28, channels: int = 1, width: int = 16, latent_dim: int = 8, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if image_size % 4:
            raise ValueError(f"`image_size` must be divisible by 4, got {image_size}.")
        self.save_hyperparameters()
        self.image_size, self.channels = image_size, channels
        s = image_size // 4
        self._feat = (2 * width, s, s)
        flat = 2 * width * s * s
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(flat, 2 * latent_dim),
        )
        self.decoder_input = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
        )

    @override
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 2:
            side = math.isqrt(x.shape[1] // self.channels)
            x = x.reshape(x.shape[0], self.channels, side, side)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    @override
    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.decoder_input(z).reshape(-1, *self._feat))
