"""Ground truth by retraining: leave-one-out / leave-k-out fits through a Lightning ``Trainer``.

A :class:`Retrainer` owns the recipe (``make_model``, the training set, the Trainer arguments,
scratch or warm start) and turns "train without samples S with seed s" into a fitted module.
Warm start loads the reference weights and fine-tunes only ``finetune_params`` (Epifano et al.
fine-tune the top layer from the optimum); scratch re-initialises under the seed. Every fit is
checked: a ``make_model`` that builds a different architecture, or a fit that leaves inf/NaN in
the weights or the test loss, raises with the removal and the seed named.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import move_data_to_device
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset, default_collate
from typing_extensions import override

from lightning_influence.data.batches import iterate_batches, num_samples
from lightning_influence.errors import (
    ArchitectureMismatchError,
    ConfigurationError,
    FragilityError,
    RetrainingDivergedError,
)
from lightning_influence.gradients.losses import PerSampleLoss, check_per_sample_loss
from lightning_influence.gradients.parameters import resolve_parameter_names
from lightning_influence.utils.modes import eval_mode, module_device

__all__ = [
    "Retrainer",
    "TestLossTrajectory",
    "architecture_signature",
    "evaluate_loss",
    "resolve_training_data",
]

RetrainMode = Literal["warm_start", "scratch"]

#: Trainer arguments a retrain always uses: nothing written to disk, nothing printed per fit.
FORCED_TRAINER_KWARGS: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
#: Defaults the user may override: no validation loop (only the training objective matters).
DEFAULT_TRAINER_KWARGS: dict[str, Any] = {"num_sanity_val_steps": 0, "limit_val_batches": 0}


def architecture_signature(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer names with their shapes: what two models must share to be comparable."""
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _describe_mismatch(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]]) -> str:
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shapes = [f"{k}: {expected[k]} vs {got[k]}" for k in expected if k in got and expected[k] != got[k]]
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}")
    if extra:
        parts.append(f"unexpected {extra[:5]}")
    if shapes:
        parts.append(f"shape changes {shapes[:5]}")
    return "; ".join(parts)


def resolve_training_data(datamodule: Any) -> tuple[Dataset, dict[str, Any]]:
    """The training Dataset behind a LightningDataModule / DataLoader / Dataset, and how to load it.

    Returns:
        ``(dataset, loader_kwargs)`` where ``loader_kwargs`` (``batch_size``, ``shuffle``,
        ``collate_fn``, ``drop_last``, ``num_workers``) rebuild the user's training loader for a
        subset. Sample ``i`` is ``dataset[i]``: estimates must be indexed the same way.
    """
    loader: DataLoader | None = None
    if isinstance(datamodule, pl.LightningDataModule):
        with contextlib.suppress(NotImplementedError):
            datamodule.prepare_data()
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        if not isinstance(loader, DataLoader):
            raise ConfigurationError(
                f"`datamodule.train_dataloader()` must return one torch DataLoader, got {type(loader).__name__}."
            )
    elif isinstance(datamodule, DataLoader):
        loader = datamodule
    elif isinstance(datamodule, Dataset) and hasattr(datamodule, "__len__"):
        n = len(datamodule)  # type: ignore[arg-type]
        return datamodule, {"batch_size": n, "shuffle": False, "collate_fn": None, "drop_last": False, "num_workers": 0}
    else:
        raise ConfigurationError(
            "`datamodule` must be a LightningDataModule, a DataLoader or a sized Dataset of training samples;"
            f" got {type(datamodule).__name__}."
        )
    if loader.batch_size is None:
        raise ConfigurationError(
            "`datamodule`'s training DataLoader uses a batch_sampler; removal needs a loader built with"
            " `batch_size` (and optionally `shuffle`)."
        )
    return loader.dataset, {
        "batch_size": loader.batch_size,
        "shuffle": isinstance(loader.sampler, RandomSampler),
        "collate_fn": loader.collate_fn,
        "drop_last": loader.drop_last,
        "num_workers": loader.num_workers,
    }


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit info lines ("GPU available", "max_epochs reached") for many fits."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.fabric", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def evaluate_loss(module: nn.Module, loss_fn: PerSampleLoss, data: Any, batch_size: int = 1024, seed: int = 0) -> float:
    """Mean per-sample loss of ``module`` on ``data`` (eval mode, no grad).

    The global RNG is forked and seeded so that a stochastic loss (a VAE's ELBO) draws the same
    noise for every model compared: differences between models are then not sampling noise.
    """
    total, count = 0.0, 0
    with eval_mode(module), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for ids, batch in iterate_batches(data, batch_size, name="test_data"):
            losses = loss_fn(module, move_data_to_device(batch, module_device(module)))
            check_per_sample_loss(losses, int(ids.shape[0]), "loss_fn")
            total += float(losses.double().sum())
            count += losses.shape[0]
    return total / max(count, 1)


class TestLossTrajectory(Callback):
    """Records the test loss every ``every_n_epochs`` during a retrain (Epifano et al., Fig. 5).

    A damped trajectory says the retrain settled in the basin it started from; a jumpy one says
    "the model leaves the minima" and warm-start ground truth is not trustworthy.
    """

    def __init__(self, evaluate: Callable[[nn.Module], float], every_n_epochs: int) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        self.evaluate = evaluate
        self.every_n_epochs = every_n_epochs
        self.epochs: list[int] = []
        self.losses: list[float] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(0)
        self.losses.append(self.evaluate(pl_module))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0:
            self.epochs.append(epoch)
            self.losses.append(self.evaluate(pl_module))


class Retrainer:
    """Fits ``make_model()`` on the training set minus some samples, through ``pytorch_lightning.Trainer``.

    Args:
        make_model: zero-argument factory of a fresh LightningModule (same architecture every call).
        dataset: the training Dataset (sample ``i`` is ``dataset[i]``).
        loader_kwargs: how to batch it (see :func:`resolve_training_data`); a shuffling loader is
            seeded per fit.
        trainer_kwargs: extra ``Trainer`` arguments (``max_epochs``, ``accelerator``, ...).
        mode: ``"warm_start"`` (load ``reference_state``, fine-tune ``finetune_params``) or
            ``"scratch"`` (fresh initialisation under the seed).
        reference_state: the trained model's ``state_dict`` (required for warm start).
        reference_signature: the architecture every built model must have (default: the first built).
        finetune_params: parameter names or module prefixes trained in warm start (default: all).
    """

    def __init__(
        self,
        make_model: Callable[[], pl.LightningModule],
        dataset: Dataset,
        loader_kwargs: Mapping[str, Any],
        trainer_kwargs: Mapping[str, Any] | None = None,
        mode: RetrainMode = "warm_start",
        reference_state: Mapping[str, Tensor] | None = None,
        reference_signature: Mapping[str, tuple[int, ...]] | None = None,
        finetune_params: Sequence[str] | str | None = None,
    ) -> None:
        if mode not in ("warm_start", "scratch"):
            raise ValueError(f"`retrain` must be 'warm_start' or 'scratch', got {mode!r}.")
        if mode == "warm_start" and reference_state is None:
            raise ConfigurationError("Warm-start retraining needs the trained model's weights (`model`).")
        self.make_model = make_model
        self.dataset = dataset
        self.n = num_samples(dataset, "datamodule")
        self.loader_kwargs = dict(loader_kwargs)
        self.trainer_kwargs = {**DEFAULT_TRAINER_KWARGS, **dict(trainer_kwargs or {}), **FORCED_TRAINER_KWARGS}
        self.mode = mode
        self.reference_state = (
            {k: v.detach().clone() for k, v in reference_state.items()} if reference_state is not None else None
        )
        self.signature = dict(reference_signature) if reference_signature is not None else None
        self.finetune_params = finetune_params
        self.n_fits = 0

    def build(self, seed: int) -> pl.LightningModule:
        """A fresh model under ``seed``: checked against the reference architecture, warm-started if asked."""
        pl.seed_everything(seed, workers=True, verbose=False)
        model = self.make_model()
        if not isinstance(model, pl.LightningModule):
            raise ConfigurationError(
                f"`make_model` must return a pytorch_lightning.LightningModule, got {type(model).__name__}."
            )
        sig = architecture_signature(model)
        if self.signature is None:
            self.signature = sig
        elif sig != self.signature:
            raise ArchitectureMismatchError(
                "`make_model` returned a model whose architecture differs from the reference model ("
                + _describe_mismatch(self.signature, sig)
                + "); it must build the same architecture on every call."
            )
        if self.mode == "warm_start":
            assert self.reference_state is not None
            model.load_state_dict(copy.deepcopy(self.reference_state))
            if self.finetune_params is not None:
                keep = set(resolve_parameter_names(model, self.finetune_params, "finetune_params"))
                for name, p in model.named_parameters():
                    p.requires_grad_(name in keep)
        return model

    def loader(self, removed: Sequence[int], seed: int) -> DataLoader:
        """The training loader without ``removed`` (same batching as the user's; seeded shuffling)."""
        removed_set = {int(i) for i in removed}
        keep = [i for i in range(self.n) if i not in removed_set]
        kw = dict(self.loader_kwargs)
        shuffle = kw.pop("shuffle", False)
        if isinstance(self.dataset, TensorDataset) and not shuffle and kw.get("collate_fn") in (None, default_collate):
            # Same batches as the default loader, sliced once instead of collated sample by sample
            # every epoch (which dominates the cost of the tiny full-batch fits this check runs).
            return _presliced_loader(self.dataset, keep, int(kw["batch_size"]), bool(kw.get("drop_last", False)))
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(Subset(self.dataset, keep), shuffle=shuffle, generator=gen, **kw)

    def fit(
        self,
        removed: Sequence[int],
        seed: int,
        callbacks: Sequence[Callback] = (),
        describe: str = "",
    ) -> pl.LightningModule:
        """Train without ``removed`` under ``seed`` and return the fitted model.

        Raises:
            ArchitectureMismatchError: ``make_model`` built a different architecture.
            RetrainingDivergedError: the fit raised, or left inf/NaN weights.
        """
        what = describe or (f"removal of {list(removed)}" if removed else "control (no removal)")
        model = self.build(seed)
        kwargs = dict(self.trainer_kwargs)
        # The user's callbacks are copied per fit: stateful ones (EarlyStopping's best score and
        # patience counter) must start fresh on every retrain.
        user_callbacks = [copy.deepcopy(cb) for cb in (kwargs.pop("callbacks", None) or [])]
        try:
            with quiet_lightning():
                trainer = pl.Trainer(callbacks=[*user_callbacks, *callbacks], **kwargs)
                trainer.fit(model, train_dataloaders=self.loader(removed, seed))
        except (KeyboardInterrupt, MisconfigurationException, FragilityError):
            raise
        except Exception as err:  # the user's training code failed mid-fit: report which fit
            raise RetrainingDivergedError(f"Retraining failed for {what} with seed {seed}: {err!r}") from err
        if trainer.interrupted:  # Lightning swallows Ctrl-C after a graceful shutdown: stop the check too
            raise KeyboardInterrupt(f"Retraining interrupted during {what} with seed {seed}.")
        self.n_fits += 1
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise RetrainingDivergedError(
                f"Retraining diverged for {what} with seed {seed}: parameters {bad[:5]} contain inf/NaN."
                " Lower the learning rate or the number of epochs in `trainer_kwargs`/`make_model`."
            )
        return model


class _Batches(Dataset):
    def __init__(self, batches: list[tuple[Tensor, ...]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return self.batches[i]


def _presliced_loader(dataset: TensorDataset, keep: Sequence[int], batch_size: int, drop_last: bool) -> DataLoader:
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    tensors = [t[idx] for t in dataset.tensors]
    n = len(idx)
    stops = range(batch_size, n + 1 if drop_last else n + batch_size, batch_size)
    batches = [tuple(t[stop - batch_size : min(stop, n)] for t in tensors) for stop in stops]
    return DataLoader(_Batches([b for b in batches if b[0].shape[0] > 0]), batch_size=None, shuffle=False)


def check_finite_loss(value: float, what: str, seed: int | None = None) -> float:
    """Raise :class:`RetrainingDivergedError` if a measured test loss is inf/NaN."""
    if not math.isfinite(value):
        if seed is None:
            raise RetrainingDivergedError(f"The test loss of {what} is {value}; check the model and `loss_fn`.")
        raise RetrainingDivergedError(f"Retraining diverged for {what} with seed {seed}: the test loss is {value}.")
    return value
