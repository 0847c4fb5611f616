"""Judging a supervised VAE's invariances: label preservation, a plain-classifier baseline, attributions.

The metrics of Nguyen & Rodríguez Martínez (arXiv 2007.07591): samples that resample only the
nuisance latents ``z_n`` should keep their label, judged by the model's own classifier and by an
independently trained one; resampling the class latents ``z_s`` should not. The model's
accuracy is compared with a plain classifier of the same size, and attribution maps of an
image and of its invariance samples are shown side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn
from typing_extensions import override

from lightning_influence.data.batches import batch_inputs, batch_labels
from lightning_influence.representations.blocks import classifier_head, mlp
from lightning_influence.representations.relax.explainer import RELAX
from lightning_influence.representations.supervised_vae import Judge, SupervisedVAE
from lightning_influence.utils.modes import eval_mode

__all__ = [
    "AttributionPanel",
    "InvarianceGrids",
    "IndependentClassifier",
    "PlainClassifier",
    "classifier_saliency",
    "gaussian_kl_per_dim",
    "attribution_panel",
    "invariance_attributions",
    "invariance_grids",
    "invariance_metrics",
    "label_preservation",
]


class PlainClassifier(pl.LightningModule):
    """The baseline: a classifier of the same size as a :class:`SupervisedVAE`'s path ``x -> mu_s -> logits``.

    Same encoder trunk (two hidden layers) ending in ``supervised_dim`` units, then the same head;
    trained on cross-entropy alone.

    Args:
        input_dim: flattened input size.
        hidden_dim: encoder width.
        supervised_dim: bottleneck size (``k``).
        num_classes: classes.
        classifier_hidden: head hidden width (0: linear).
        lr: Adam learning rate.

    Example:
        >>> PlainClassifier(64, 32, 3, 10, 16)(torch.rand(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden_dim: int = 128,
        supervised_dim: int = 4,
        num_classes: int = 10,
        classifier_hidden: int = 32,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}.")
        self.save_hyperparameters()
        self.input_dim = input_dim
        self.lr = lr
        self.net = nn.Sequential(
            mlp([input_dim, hidden_dim, hidden_dim, supervised_dim]),
            classifier_head(supervised_dim, classifier_hidden, num_classes),
        )

    @classmethod
    def like(cls, model: SupervisedVAE, lr: float | None = None) -> PlainClassifier:
        """A plain classifier with ``model``'s sizes (and learning rate unless ``lr`` is given)."""
        hp = model.hparams
        return cls(
            input_dim=model.input_dim,
            hidden_dim=int(hp["hidden_dim"]),
            supervised_dim=model.supervised_dim,
            num_classes=model.num_classes,
            classifier_hidden=int(hp["classifier_hidden"]),
            lr=model.lr if lr is None else lr,
        )

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels ``[B]``."""
        with eval_mode(self):
            return self(x).argmax(dim=1)

    def _step(self, stage: str, batch: Any) -> Tensor:
        x, y = batch_inputs(batch), batch_labels(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_step=False, on_epoch=True)
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step("train", batch)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step("val", batch)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class IndependentClassifier:
    """A judge trained apart from the model: scikit-learn logistic regression on flattened inputs.

    Decoded samples are judged by a classifier that never saw the VAE, so label preservation does
    not reward the model for agreeing with itself.

    Args:
        C: inverse regularisation strength.
        max_iter: solver iterations.

    Example:
        >>> from lightning_influence.data.datamodules import load_digits_tensors
        >>> x, y = load_digits_tensors()
        >>> judge = IndependentClassifier().fit(x[:1000], y[:1000])
        >>> judge.accuracy(x[1000:], y[1000:]) > 0.9
        True
    """

    def __init__(self, C: float = 1.0, max_iter: int = 2000) -> None:
        if C <= 0:
            raise ValueError(f"`C` must be > 0, got {C}.")
        self.C, self.max_iter = C, max_iter
        self._model: Any = None

    def fit(self, x: Tensor, y: Tensor) -> IndependentClassifier:
        """Fit on inputs ``[N, ...]`` and labels ``[N]``; returns self."""
        self._model = LogisticRegression(C=self.C, max_iter=self.max_iter)
        self._model.fit(x.detach().reshape(len(x), -1).cpu().double().numpy(), y.detach().cpu().numpy())
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """Predicted labels ``[N]`` (on ``x``'s device)."""
        if self._model is None:
            raise RuntimeError("IndependentClassifier is not fitted; call `fit(x, y)` first.")
        pred = self._model.predict(x.detach().reshape(len(x), -1).cpu().double().numpy())
        return torch.as_tensor(pred, dtype=torch.long, device=x.device)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Accuracy on ``(x, y)``."""
        return float((self(x) == y.to(x.device)).float().mean())


def label_preservation(samples: Tensor, reference: Tensor, judge: Judge) -> float:
    """Share of samples whose judged label equals their source's reference label.

    .. math:: \\frac{1}{Bn} \\sum_{b, i} \\mathbb 1[\\mathrm{judge}(\\tilde x_{b,i}) = y_b]

    Args:
        samples: ``[B, n, ...]`` (e.g. from :meth:`SupervisedVAE.sample_invariances`).
        reference: labels ``[B]``.
        judge: ``judge(inputs [N, ...]) -> labels [N]``.

    Example:
        >>> judge = lambda x: (x.flatten(1).mean(1) > 0.5).long()
        >>> label_preservation(torch.tensor([[[0.9], [0.2]], [[0.1], [0.3]]]), torch.tensor([1, 0]), judge)
        0.75
    """
    if samples.dim() < 3 or samples.shape[0] != reference.shape[0]:
        raise ValueError(
            f"`samples` must be [B, n, ...] with B = len(reference) = {reference.shape[0]}, got {tuple(samples.shape)}."
        )
    b, n = samples.shape[:2]
    judged = judge(samples.reshape(b * n, *samples.shape[2:])).reshape(b, n)
    return float((judged == reference.to(judged.device).reshape(b, 1)).float().mean())


@torch.no_grad()
def invariance_metrics(
    model: SupervisedVAE,
    x: Tensor,
    y: Tensor,
    judge: Judge | None = None,
    *,
    n_samples: int = 10,
    plain_classifier: PlainClassifier | None = None,
    reference: Literal["label", "prediction"] = "label",
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy and label preservation of a :class:`SupervisedVAE` on held-out ``(x, y)``.

    Returns:
        ``accuracy`` (classifier on ``mu_s``), ``invariance_preservation`` and
        ``variation_preservation`` judged by the model itself (samples re-encoded and classified);
        with a ``judge``: ``judge_accuracy`` on ``x`` and ``invariance_preservation_independent``,
        ``variation_preservation_independent``; with a ``plain_classifier``: ``plain_accuracy``.
        Always ``invariance_diversity`` / ``variation_diversity`` (mean per-pixel std across an
        input's samples) and ``supervised_kl`` / ``nuisance_kl`` (nats per input): a nuisance part
        the decoder ignores makes preservation trivially high, and a warning says so.

    Args:
        model: the trained model.
        x: inputs ``[B, ...]``.
        y: labels ``[B]``.
        judge: an independently trained classifier (e.g. :class:`IndependentClassifier`).
        n_samples: samples per input.
        plain_classifier: a baseline of the same size (:class:`PlainClassifier`).
        reference: compare samples with the true label (``"label"``) or with each judge's own
            prediction on the source input (``"prediction"``: pure consistency).
        seed: seed of the samples.
    """
    if reference not in ("label", "prediction"):
        raise ValueError(f"`reference` must be 'label' or 'prediction', got {reference!r}.")
    y = y.to(x.device)
    gen = torch.Generator().manual_seed(seed)
    inv = model.sample_invariances(x, n_samples, generator=gen)
    var = model.sample_variations(x, n_samples, generator=gen)
    own_pred = model.predict(x)
    out = {"accuracy": float((own_pred == y).float().mean())}
    ref = y if reference == "label" else own_pred
    out["invariance_preservation"] = label_preservation(inv, ref, model.predict)
    out["variation_preservation"] = label_preservation(var, ref, model.predict)
    if judge is not None:
        judged = judge(x)
        out["judge_accuracy"] = float((judged == y).float().mean())
        ref = y if reference == "label" else judged
        out["invariance_preservation_independent"] = label_preservation(inv, ref, judge)
        out["variation_preservation_independent"] = label_preservation(var, ref, judge)
    if plain_classifier is not None:
        out["plain_accuracy"] = float((plain_classifier.predict(x) == y).float().mean())
    # Preservation is trivial if the decoder ignores z_n; these show whether the samples vary at all.
    out["invariance_diversity"] = float(inv.float().std(dim=1).mean())
    out["variation_diversity"] = float(var.float().std(dim=1).mean())
    with eval_mode(model):
        mu, logvar = model.encode(x)
    kl = gaussian_kl_per_dim(mu, logvar).mean(dim=0)
    out["supervised_kl"] = float(kl[: model.supervised_dim].sum())
    out["nuisance_kl"] = float(kl[model.supervised_dim :].sum())
    if out["nuisance_kl"] < 0.1:
        rank_zero_warn(
            f"The nuisance latent z_n carries almost no information (KL {out['nuisance_kl']:.3f} nats): the decoder"
            " ignores it, so invariance samples barely vary and their label preservation is trivially high."
            " Try a smaller `supervised_dim`, a smaller `beta` or longer training."
        )
    return out


def gaussian_kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z_j | x) || N(0, 1)) per latent dimension, ``[B, d]``.

    The summands of :func:`~lightning_influence.models.objectives.gaussian_kl`.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def classifier_saliency(model: SupervisedVAE, x: Tensor, target: Tensor | None = None) -> Tensor:
    """Gradient saliency ``|d logit_target / d x|`` of the classifier on ``z_s``, per input, ``[B, ...]``.

    Args:
        model: the model.
        x: inputs ``[B, ...]``.
        target: class per input (default: the predicted class).
    """
    with eval_mode(model), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        logits = model.classify(xg)
        target = logits.argmax(1) if target is None else target.to(logits.device).reshape(-1)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xg)
    return grad.abs()


def invariance_attributions(
    model: SupervisedVAE,
    x: Tensor,
    n: int = 4,
    *,
    method: Literal["saliency", "relax"] = "saliency",
    seed: int = 0,
    relax_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Attribution maps of the classifier for one input and ``n`` of its invariance samples.

    The paper's last experiment: if the invariances are real, the maps of the samples highlight
    the same class-relevant strokes as the input's. Saliency uses the input's predicted class for
    every image; RELAX explains the classifier's logits as the representation.

    Args:
        model: the model.
        x: one input (``[1, ...]`` or unbatched).
        n: invariance samples.
        method: ``"saliency"`` or ``"relax"``.
        seed: seed of the samples (and of RELAX's masks).
        relax_kwargs: options for :class:`~lightning_influence.representations.relax.RELAX` (defaults: 1,000 masks,
            a grid of ``max(2, side // 2)`` cells).

    Returns:
        ``(images [1 + n, *image_shape], maps [1 + n, H, W])``, the input first.
    """
    if method not in ("saliency", "relax"):
        raise ValueError(f"`method` must be 'saliency' or 'relax', got {method!r}.")
    if x.numel() != model.input_dim:
        raise ValueError(f"`x` must be one input of {model.input_dim} values, got shape {tuple(x.shape)}.")
    x = x.reshape(1, -1)
    gen = torch.Generator().manual_seed(seed)
    samples = model.sample_invariances(x, n, generator=gen).reshape(n, -1)
    flat = torch.cat([x.reshape(1, -1).to(samples.dtype), samples], dim=0)
    images = model.as_images(flat)
    if len(model.image_shape) != 3:
        raise ValueError(f"Attribution maps need image inputs; `image_shape` is {model.image_shape}.")
    if method == "saliency":
        target = model.predict(flat[:1]).expand(flat.shape[0])
        maps = model.as_images(classifier_saliency(model, flat, target)).amax(dim=1)
    else:
        opts = {"n_masks": 1000, "num_cells": max(2, model.image_shape[-1] // 2), "seed": seed, **(relax_kwargs or {})}
        maps = RELAX(lambda imgs: model.classify(imgs.flatten(1)), **opts).explain(images).importance
    return images, maps


@dataclass(frozen=True)
class InvarianceGrids:
    """Samples that keep (invariances) or change (variations) each input's class.

    Attributes:
        invariances: ``[B, n + 2, *image_shape]``: per input, the input, its reconstruction from
            the mean, then ``n`` samples with ``z_n`` from the prior (the classifier should not care).
        variations: the same with ``z_s`` resampled instead (the class should change).
    """

    invariances: Tensor
    variations: Tensor

    @property
    def n_samples(self) -> int:
        return int(self.invariances.shape[1]) - 2


def invariance_grids(model: SupervisedVAE, x: Tensor, n: int = 8, *, seed: int = 0) -> InvarianceGrids:
    """Invariance and variation samples of a few inputs, each row led by the input and its reconstruction.

    Args:
        model: the trained model.
        x: inputs ``[B, ...]`` (8 or so).
        n: samples per input.
        seed: seed of the samples.
    """
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(model), torch.no_grad():
        recon = model.decode_mean(model.encode(x)[0])
    lead = [model.as_images(x).unsqueeze(1), model.as_images(recon).unsqueeze(1)]
    rows = [
        torch.cat([*lead, samples.reshape(x.shape[0], n, *model.image_shape)], dim=1).float().cpu()
        for samples in (model.sample_invariances(x, n, generator=gen), model.sample_variations(x, n, generator=gen))
    ]
    return InvarianceGrids(invariances=rows[0], variations=rows[1])


@dataclass(frozen=True)
class AttributionPanel:
    """The classifier's attribution maps for one input and its invariance samples.

    Attributes:
        images: ``[1 + n, *image_shape]``, the input first.
        maps: ``[1 + n, H, W]``.
        method: ``"saliency"`` or ``"relax"``.
        predictions: the classifier's class for each image.
    """

    images: Tensor
    maps: Tensor
    method: str
    predictions: list[int]


def attribution_panel(
    model: SupervisedVAE, x: Tensor, n: int = 7, *, method: Literal["saliency", "relax"] = "saliency", seed: int = 0
) -> AttributionPanel:
    """:func:`invariance_attributions` with the classifier's prediction for each image."""
    images, maps = invariance_attributions(model, x, n=n, method=method, seed=seed)
    predictions = model.predict(images.reshape(images.shape[0], -1)).tolist()
    return AttributionPanel(images=images, maps=maps, method=method, predictions=predictions)
