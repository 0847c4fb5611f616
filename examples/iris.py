"""The Iris task of Epifano et al. (2023): data, the MLP family and the convex baseline.

Everything the paper's protocol needs, as Lightning objects, so the fragility check can retrain
them through a Trainer:

- :func:`load_iris_split`: the 150 Iris flowers with one held-out test point (the paper's
  maximum-loss instance is index 83), standardised with statistics of the 149 training rows.
- :class:`IrisClassifier`: ``depth`` hidden layers of ``width`` units (SELU by default) and a
  last layer ``lin_last``; ``depth=0`` is multinomial logistic regression, the convex baseline.
  It trains full batch with Adam + ``ReduceLROnPlateau`` (the paper) or L-BFGS (to reach the
  exact optimum of a convex problem), with an L2 penalty ``(weight_decay/2) |theta|^2``.
- :class:`IrisDataModule`: one full batch per epoch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_influence.fragility.report import FragilityReport

__all__ = [
    "IRIS_MAX_LOSS_INDEX",
    "IrisClassifier",
    "IrisDataModule",
    "IrisRepeat",
    "iris_loss",
    "iris_protocol",
    "load_iris_split",
]

#: The paper's test point: "83 is always the highest loss then 133, 70, 77" (xai_is_fragile, IRIS/*).
IRIS_MAX_LOSS_INDEX = 83


def load_iris_split(test_index: int = IRIS_MAX_LOSS_INDEX) -> tuple[TensorDataset, TensorDataset]:
    """Iris as ``(train, test)`` TensorDatasets of ``(x float32 [4], y int64)``.

    The test set is the single flower ``test_index``; features are standardised with the mean
    and standard deviation of the other 149 (as ``StandardScaler`` fitted on the training rows).
    """
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    if not 0 <= test_index < len(x):
        raise ValueError(f"`test_index` must be in [0, {len(x)}), got {test_index}.")
    train_idx = np.r_[0:test_index, test_index + 1 : len(x)]
    mean, std = x[train_idx].mean(axis=0), x[train_idx].std(axis=0)
    xs = torch.from_numpy((x - mean) / std).float()
    ys = torch.from_numpy(y).long()
    return (
        TensorDataset(xs[train_idx], ys[train_idx]),
        TensorDataset(xs[test_index : test_index + 1], ys[test_index : test_index + 1]),
    )


def iris_loss(module: nn.Module, batch: Any) -> Tensor:
    """Per-sample cross-entropy ``Tensor[B]`` (the package's ``loss_fn(module, batch)`` convention)."""
    x, y = batch
    return nn.functional.cross_entropy(module(x), y, reduction="none")


class IrisDataModule(pl.LightningDataModule):
    """Iris with one held-out flower, served as one full batch per epoch.

    Args:
        test_index: the held-out flower (default: the paper's maximum-loss instance 83).
    """

    def __init__(self, test_index: int = IRIS_MAX_LOSS_INDEX) -> None:
        super().__init__()
        self.test_index = test_index
        self.train_set, self.test_set = load_iris_split(test_index)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=len(self.train_set), shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=len(self.test_set), shuffle=False)


class IrisClassifier(pl.LightningModule):
    """MLP ``4 -> [width] * depth -> 3`` for Iris; ``depth=0`` is multinomial logistic regression.

    The training objective is ``mean cross-entropy + (weight_decay / 2) * |theta|^2`` over all
    parameters (for Adam this is exactly Adam's ``weight_decay``, which the paper used); its
    Hessian is the data Hessian plus ``weight_decay * I``.

    Args:
        depth: hidden layers (0 to 8 in the paper).
        width: units per hidden layer (5 in the paper's depth sweep).
        activation: ``"selu"`` (paper), ``"tanh"`` or ``"relu"``.
        weight_decay: L2 coefficient (0.005 in the paper; 0 for its "no L2" runs).
        lr: learning rate (Adam; the paper uses 1e-3).
        optimizer: ``"adam"`` (full batch, ``ReduceLROnPlateau`` on the training loss) or
            ``"lbfgs"`` (strong-Wolfe line search; ``lbfgs_max_iter`` iterations per step).
        plateau_patience: ``ReduceLROnPlateau`` patience in epochs (100 in the paper); ``None``
            trains at a constant learning rate (and skips logging the training loss, which the
            scheduler monitors -- logging is a large share of a tiny full-batch step).
        lbfgs_max_iter: L-BFGS iterations per optimizer step.
    """

    def __init__(
        self,
        depth: int = 1,
        width: int = 5,
        activation: Literal["selu", "tanh", "relu"] = "selu",
        weight_decay: float = 0.005,
        lr: float = 1e-3,
        optimizer: Literal["adam", "lbfgs"] = "adam",
        plateau_patience: int | None = 100,
        lbfgs_max_iter: int = 100,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"`depth` must be >= 0, got {depth}.")
        if width < 1:
            raise ValueError(f"`width` must be >= 1, got {width}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"`optimizer` must be 'adam' or 'lbfgs', got {optimizer!r}.")
        acts = {"selu": nn.SELU, "tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"`activation` must be one of {sorted(acts)}, got {activation!r}.")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        d_in = 4
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), acts[activation]()]
            d_in = width
        self.body = nn.Sequential(*layers)
        self.lin_last = nn.Linear(d_in, 3)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.lin_last(self.body(x))

    def per_sample_loss(self, batch: Any) -> Tensor:
        """Cross-entropy of every sample, ``Tensor[B]``."""
        return iris_loss(self, batch)

    def l2_penalty(self) -> Tensor:
        """``(weight_decay / 2) * |theta|^2`` over the parameters that are being trained."""
        params = [p for p in self.parameters() if p.requires_grad]
        return 0.5 * self.hparams.weight_decay * sum((p * p).sum() for p in params)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        data_loss = self.per_sample_loss(batch).mean()
        if self.hparams.optimizer == "adam" and self.hparams.plateau_patience is not None:
            self.log("train_loss", data_loss, on_step=False, on_epoch=True, batch_size=int(batch[0].shape[0]))
        if self.hparams.optimizer == "lbfgs" and self.hparams.weight_decay > 0:
            return data_loss + self.l2_penalty()
        return data_loss

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "lbfgs":
            return torch.optim.LBFGS(
                params,
                lr=1.0,
                max_iter=self.hparams.lbfgs_max_iter,
                tolerance_grad=1e-12,
                tolerance_change=1e-14,
                history_size=50,
                line_search_fn="strong_wolfe",
            )
        opt = torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.plateau_patience is None:
            return opt
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=self.hparams.plateau_patience)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss", "interval": "epoch"}}


@dataclass
class IrisRepeat:
    """One repeat of the Iris protocol: a freshly trained model and its fragility report.

    Attributes:
        spearman / pearson: agreement of the protocol's estimate (``damping``) with retraining.
        block_top_eigenvalue: largest Hessian eigenvalue of the estimate's parameter block.
        model_top_eigenvalue: largest Hessian eigenvalue of the whole model (the paper's Fig. 3).
        spearman_objective_hessian / pearson_objective_hessian: the same agreement when the
            Hessian includes the weight-decay term (damping = ``weight_decay``).
        spearman_float32_inverse: agreement of the paper's numerics: ``torch.inverse`` of the
            float32 Hessian, which softmax makes exactly singular (5 null directions of
            ``lin_last.weight``), so rounding noise in the null space is amplified ~1e7-fold.
    """

    seed: int
    train_accuracy: float
    spearman: float
    pearson: float
    block_top_eigenvalue: float
    model_top_eigenvalue: float
    spearman_objective_hessian: float
    pearson_objective_hessian: float
    spearman_float32_inverse: float
    report: FragilityReport


def iris_protocol(
    depth: int = 1,
    weight_decay: float = 0.005,
    repeats: int = 3,
    train_epochs: int = 3000,
    finetune_epochs: int = 500,
    lr: float = 1e-2,
    plateau_patience: int | None = None,
    n_top: int = 25,
    damping: float = 0.0,
    width: int = 5,
    activation: Literal["selu", "tanh", "relu"] = "selu",
    first_seed: int = 0,
    curvature: bool = True,
    optimizer: Literal["adam", "lbfgs"] = "adam",
    params: str | list[str] = "lin_last.weight",
) -> list[IrisRepeat]:
    """Epifano et al.'s Iris experiment, each repeat a fresh model (train, estimate, retrain, compare).

    Per repeat: train ``IrisClassifier(depth, width)`` from scratch (seed ``first_seed + r``) on
    the 149 flowers without #83; take the ``n_top`` training points of highest loss (the paper's
    code: ``int(150 / 6) = 25``); estimate their influence on the test loss with the exact Hessian
    of ``lin_last.weight`` (the paper: undamped, without the weight-decay term); retrain each
    removal warm-started from the trained weights, fine-tuning ``lin_last`` only; compare.

    The paper trains for 60,000 epochs at lr 1e-3 with ``ReduceLROnPlateau(patience=100)`` and
    fine-tunes for 7,500; the defaults here (3,000 / 500 epochs at lr 1e-2, constant) keep a
    repeat to seconds on a CPU through Lightning.

    Besides the paper's estimate (``damping``, default 0: the Hessian *without* the weight-decay
    term), the damping sweep always includes ``weight_decay`` itself, i.e. the Hessian of the
    objective that was actually minimised; :attr:`IrisRepeat.spearman_objective_hessian` reads it.
    ``optimizer="lbfgs"`` with ``depth=0`` and ``params="lin_last"`` is the convex baseline.

    Returns:
        One :class:`IrisRepeat` per repeat.
    """
    import warnings

    from lightning_influence.fragility.check import FragilityCheck
    from lightning_influence.fragility.diagnostics import DEFAULT_DAMPINGS
    from lightning_influence.fragility.estimates import influence_function_parts
    from lightning_influence.fragility.metrics import spearman
    from lightning_influence.fragility.retraining import Retrainer, resolve_training_data
    from lightning_influence.influence.curvature import flat_hvp, lanczos_extreme_eigenvalues, mean_loss_function

    dm = IrisDataModule()
    dataset, loader_kwargs = resolve_training_data(dm)

    def make_model() -> IrisClassifier:
        return IrisClassifier(
            depth=depth,
            width=width,
            activation=activation,
            weight_decay=weight_decay,
            lr=lr,
            plateau_patience=plateau_patience,
            optimizer=optimizer,
        )

    dampings = sorted(set(DEFAULT_DAMPINGS) | {float(weight_decay), float(damping)})

    x, y = dm.train_set.tensors
    out: list[IrisRepeat] = []
    for r in range(repeats):
        seed = first_seed + r
        trainer = Retrainer(make_model, dataset, loader_kwargs, {"max_epochs": train_epochs}, mode="scratch")
        model = trainer.fit([], seed, describe="reference training")
        with torch.no_grad():
            train_losses = iris_loss(model, (x, y))
            accuracy = float((model(x).argmax(dim=1) == y).double().mean())
        top = torch.argsort(train_losses, descending=True)[:n_top].tolist()
        parts = influence_function_parts(model, iris_loss, dm.train_set, dm.test_set, params)
        estimates = parts.scores(damping)
        # The paper's code: explicit float32 inverse of the (singular) Hessian, no damping.
        try:
            h32_inv = torch.inverse(parts.hessian.float())
            paper32 = (parts.train_grads.float() @ (h32_inv @ parts.test_grad.float())).double() / parts.n
        except torch.linalg.LinAlgError:  # an exactly zero pivot: the paper's code would have crashed
            paper32 = torch.full((parts.n,), math.nan, dtype=torch.float64)
        # The paper's "top eigenvalue": the whole model's Hessian (PyHessian), without weight decay.
        names = [n for n, _ in model.named_parameters()]
        whole = {n: p.detach().double() for n, p in model.named_parameters()}
        m64 = copy.deepcopy(model).double()
        loss = mean_loss_function(m64, iris_loss, (x.double(), y), names)
        top_eig = lanczos_extreme_eigenvalues(flat_hvp(loss, whole), sum(v.numel() for v in whole.values())).largest
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*one seed.*")
            check = FragilityCheck(
                make_model,
                dm,
                trainer_kwargs={"max_epochs": finetune_epochs},
                retrain="warm_start",
                seeds=[seed],
                train_loss=iris_loss,
                finetune_params="lin_last",
                curvature_params=params if curvature else None,
                dampings=dampings,
                n_bootstrap=200,
                verbose=False,
            )
            report = check.run(estimates, dm.test_set, model=model, indices=top)
        actual = [r.mean_actual for r in report.removals]
        c = report.curvature
        at_wd = c.dampings.index(float(weight_decay)) if c is not None and c.damping_spearman else None
        out.append(
            IrisRepeat(
                seed=seed,
                train_accuracy=accuracy,
                spearman=report.metrics["spearman"],
                pearson=report.metrics["pearson"],
                block_top_eigenvalue=c.largest if c is not None else math.nan,
                model_top_eigenvalue=top_eig,
                spearman_objective_hessian=c.damping_spearman[at_wd] if at_wd is not None else math.nan,
                pearson_objective_hessian=c.damping_pearson[at_wd] if at_wd is not None else math.nan,
                spearman_float32_inverse=spearman(paper32[top], actual),
                report=report,
            )
        )
    return out
