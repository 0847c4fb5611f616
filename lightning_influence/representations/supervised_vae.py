"""A supervised VAE whose latent space splits into a class part and a nuisance part, and its invariances.

Nguyen & Rodríguez Martínez, "Learning invariances for interpretability using supervised VAE",
arXiv 2007.07591. The latent ``z = [z_s, z_n]``: the decoder reads all of ``z``, a classifier
reads only ``z_s``. Sampling ``z_n`` from the prior with ``z_s`` held at the encoder mean
generates images the model considers the same class (its invariances); resampling ``z_s``
instead changes the class (its variations).

The paper publishes no code; β, λ, the latent sizes and the architecture here are a reasonable
reading, not the paper's settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_influence.data.batches import batch_inputs, batch_labels
from lightning_influence.gradients.noise import standard_normal
from lightning_influence.models.objectives import negative_elbo
from lightning_influence.models.vae import VAEModule
from lightning_influence.representations.blocks import classifier_head, mlp
from lightning_influence.utils.modes import eval_mode

__all__ = ["Judge", "SupervisedVAE"]

#: ``judge(images [N, ...]) -> labels [N]``.
Judge = Callable[[Tensor], Tensor]


def _square_shape(input_dim: int) -> tuple[int, ...]:
    side = math.isqrt(input_dim)
    return (1, side, side) if side * side == input_dim else (input_dim,)


class SupervisedVAE(VAEModule):
    """A VAE with latent ``z = [z_s, z_n]``; a classifier on ``z_s`` only; trained on ELBO + λ·CE.

    .. math::
        \\ell(x, y) = \\underbrace{\\mathbb E_q[-\\log p(x\\mid z)]
            + \\beta\\,\\mathrm{KL}(q(z\\mid x)\\,\\|\\,\\mathcal N(0, I))}_{\\text{negative ELBO}}
            + \\lambda\\,\\mathrm{CE}\\big(g_\\psi(\\mu_s(x)),\\, y\\big)

    :meth:`per_sample_loss` returns ``Tensor[B]`` and draws its noise through
    :func:`~lightning_influence.gradients.noise.standard_normal`, so the trajectory recorder and TracIn use
    this model unchanged. Samples with label ``-1`` contribute only their ELBO (semi-supervised).

    Args:
        input_dim: flattened input size (64 for the 8x8 digits). Inputs may be flat or images.
        hidden_dim: width of the two hidden layers of the encoder and of the decoder.
        supervised_dim: size ``k`` of ``z_s``, the part the classifier reads.
        nuisance_dim: size of ``z_n``, the part it does not.
        num_classes: number of classes.
        classifier_hidden: hidden width of the classifier on ``z_s`` (0: linear).
        classification_weight: λ, the weight of the cross-entropy.
        beta: weight of the KL term. The defaults (``k = 3``, ``m = 5``, ``beta = 0.25``,
            ``λ = 20``, ``lr = 2e-3``) were tuned on the 8x8 digits: with ``beta = 1`` or a larger
            ``z_s`` the decoder ignores ``z_n`` there, and the "invariances" are copies of the input
            (see ``nuisance_kl`` in :func:`~lightning_influence.representations.invariances.invariance_metrics`).
        lr: Adam learning rate.
        image_shape: shape of one input as an image, for sample grids and attributions
            (default: ``(1, s, s)`` when ``input_dim = s^2``).
        **kwargs: other :class:`~lightning_influence.models.VAEModule` options (``likelihood``,
            ``optimizer``, ``train_draws``, ``influence_draws``...).

    Example:
        >>> model = SupervisedVAE(input_dim=64, hidden_dim=32, supervised_dim=3, nuisance_dim=2)
        >>> x, y = torch.rand(4, 64), torch.tensor([0, 1, 2, -1])
        >>> model.per_sample_loss((x, y)).shape
        torch.Size([4])
        >>> model.sample_invariances(x, 5).shape
        torch.Size([4, 5, 64])
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden_dim: int = 128,
        supervised_dim: int = 3,
        nuisance_dim: int = 5,
        num_classes: int = 10,
        classifier_hidden: int = 32,
        classification_weight: float = 20.0,
        beta: float = 0.25,
        lr: float = 2e-3,
        image_shape: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(beta=beta, lr=lr, **kwargs)
        for name, value, low in (
            ("input_dim", input_dim, 1),
            ("hidden_dim", hidden_dim, 1),
            ("supervised_dim", supervised_dim, 1),
            ("nuisance_dim", nuisance_dim, 1),
            ("num_classes", num_classes, 2),
            ("classifier_hidden", classifier_hidden, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        if not classification_weight >= 0:
            raise ValueError(f"`classification_weight` must be >= 0, got {classification_weight!r}.")
        shape = tuple(image_shape) if image_shape is not None else _square_shape(input_dim)
        if math.prod(shape) != input_dim:
            raise ValueError(f"`image_shape` {shape} does not hold `input_dim`={input_dim} values.")
        self.save_hyperparameters()
        self.input_dim, self.image_shape = input_dim, shape
        self.supervised_dim, self.nuisance_dim = supervised_dim, nuisance_dim
        self.latent_dim = supervised_dim + nuisance_dim
        self.num_classes = num_classes
        self.classification_weight = float(classification_weight)
        self.encoder = mlp([input_dim, hidden_dim, hidden_dim, 2 * self.latent_dim])
        self.decoder = mlp([self.latent_dim, hidden_dim, hidden_dim, input_dim])
        self.classifier = classifier_head(supervised_dim, classifier_hidden, num_classes)

    # --- model -------------------------------------------------------------------------------

    @override
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each ``[B, k + m]`` with ``z_s`` first."""
        if x.dim() < 2 or x[0].numel() != self.input_dim:
            raise ValueError(
                f"`x` must be a batch of inputs with {self.input_dim} values each ([B, {self.input_dim}] or"
                f" [B, *{self.image_shape}]), got shape {tuple(x.shape)}."
            )
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    @override
    def decode(self, z: Tensor) -> Tensor:
        """Decoder output ``[B, input_dim]`` (logits for the Bernoulli likelihood) from the full ``z``."""
        return self.decoder(z)

    def split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_s, z_n)`` of a latent ``[B, k + m]``."""
        return z[:, : self.supervised_dim], z[:, self.supervised_dim :]

    def classify_latent(self, z: Tensor) -> Tensor:
        """Class logits ``[B, C]`` from a full latent ``[B, k + m]``; only ``z_s`` is read."""
        return self.classifier(z[:, : self.supervised_dim])

    def classify(self, x: Tensor) -> Tensor:
        """Class logits ``[B, C]`` of inputs, from the encoder mean ``mu_s``."""
        return self.classify_latent(self.encode(x)[0])

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels ``[B]`` (eval mode, no grad)."""
        with eval_mode(self):
            return self.classify(x).argmax(dim=1)

    def decode_mean(self, z: Tensor) -> Tensor:
        """The mean image of ``p(x | z)``: ``sigmoid(logits)`` (Bernoulli) or the decoder output (Gaussian)."""
        out = self.decode(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    # --- objective ---------------------------------------------------------------------------

    def loss_terms(self, batch: Any, n_draws: int | None = None) -> dict[str, Tensor]:
        """Per-sample ``elbo`` (negative ELBO), ``ce`` (0 for label -1), ``loss``, and the ``logits``."""
        x, y = batch_inputs(batch), batch_labels(batch)
        draws = self.influence_draws if n_draws is None else n_draws
        nelbo = negative_elbo(self, x, beta=self.beta, likelihood=self.likelihood, n_draws=draws, sigma=self.sigma)
        logits = self.classify(x)
        y = y.to(device=logits.device, dtype=torch.long).reshape(-1)
        labelled = y >= 0
        # No data-dependent branching: this runs under torch.func.vmap for per-sample gradients.
        ce = F.cross_entropy(logits, y.clamp_min(0), reduction="none") * labelled.to(logits.dtype)
        return {"elbo": nelbo, "ce": ce, "loss": nelbo + self.classification_weight * ce, "logits": logits, "y": y}

    @override
    def per_sample_loss(self, batch: Any, n_draws: int | None = None) -> Tensor:
        """Negative ELBO + λ·cross-entropy of each sample, ``Tensor[B]``."""
        return self.loss_terms(batch, n_draws)["loss"]

    def _log_terms(self, stage: str, terms: dict[str, Tensor]) -> Tensor:
        loss = terms["loss"].mean()
        labelled = terms["y"] >= 0
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}_elbo", terms["elbo"].mean(), on_step=False, on_epoch=True)
        self.log(f"{stage}_ce", terms["ce"].mean(), on_step=False, on_epoch=True)
        if bool(labelled.any()):
            acc = (terms["logits"].argmax(1) == terms["y"])[labelled].float().mean()
            self.log(f"{stage}_acc", acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._log_terms("train", self.loss_terms(batch, n_draws=self.train_draws))

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._log_terms("val", self.loss_terms(batch, n_draws=self.train_draws))

    # --- sampling ----------------------------------------------------------------------------

    def _noise(self, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
        if generator is None:
            return standard_normal(shape, like=like)
        return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)

    def _resample(self, x: Tensor, n: int, part: Literal["s", "n"], generator: torch.Generator | None) -> Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
        if not isinstance(x, Tensor):
            raise TypeError(f"`x` must be a Tensor batch of inputs, got {type(x).__name__}.")
        with eval_mode(self), torch.no_grad():
            mu, _ = self.encode(x)
            b, k = mu.shape[0], self.supervised_dim
            z = mu.unsqueeze(1).repeat(1, n, 1)  # [B, n, k + m]
            if part == "n":
                z[:, :, k:] = self._noise((b, n, self.nuisance_dim), mu, generator)
            else:
                z[:, :, :k] = self._noise((b, n, k), mu, generator)
            out = self.decode_mean(z.reshape(b * n, -1))
        return out.reshape(b, n, *x.shape[1:])

    def sample_invariances(self, x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Images the model considers the same class: ``z_s = mu_s(x)`` fixed, ``z_n ~ N(0, I)``, decoded.

        Args:
            x: inputs ``[B, ...]`` (flat or images).
            n: samples per input.
            generator: optional ``torch.Generator`` for reproducible draws (default:
                :func:`~lightning_influence.gradients.noise.standard_normal`, i.e. the global RNG or keyed noise).

        Returns:
            ``[B, n, ...]`` decoded means, shaped like ``x``'s samples.
        """
        return self._resample(x, n, "n", generator)

    def sample_variations(self, x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """The contrast: ``z_n = mu_n(x)`` fixed, ``z_s ~ N(0, I)`` resampled, decoded; ``[B, n, ...]``."""
        return self._resample(x, n, "s", generator)

    # --- reporting ---------------------------------------------------------------------------

    def as_images(self, x: Tensor) -> Tensor:
        """Inputs or samples ``[..., input_dim]`` as images ``[N, *image_shape]``."""
        return x.reshape(-1, *self.image_shape)
