"""``FragilityCheck``: validate per-training-sample influence scores against real retraining.

Before trusting "these 10 samples are the strongest proponents", remove them, retrain through a
Lightning ``Trainer`` and see whether the test loss moves as predicted, next to the retraining
noise floor, with the curvature of the trained model in view (Epifano et al., "Revisiting the
fragility of influence functions", Neural Networks 2023).

Example:
    >>> from lightning_influence.fragility import FragilityCheck
    >>> check = FragilityCheck(make_model, datamodule, trainer_kwargs=dict(max_epochs=30),
    ...                        retrain="warm_start", removal="single", n_removals=40, seeds=3)  # doctest: +SKIP
    >>> report = check.run(estimates=scores, test_data=test_set, model=trained)  # doctest: +SKIP
    >>> print(report.summary()); report.to_json("fragility.json")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence.errors import ConfigurationError, FragilityError
from lightning_influence.fragility.diagnostics import DEFAULT_DAMPINGS, curvature_diagnostics
from lightning_influence.fragility.report import FragilityReport, RemovalResult
from lightning_influence.fragility.retraining import (
    Retrainer,
    TestLossTrajectory,
    architecture_signature,
    check_finite_loss,
    evaluate_loss,
    resolve_training_data,
)
from lightning_influence.gradients.losses import PerSampleLoss, resolve_loss
from lightning_influence.utils.arguments import check_count

__all__ = ["FragilityCheck", "select_removals"]

Selection = Literal["abs", "proponents", "opponents", "extremes", "random", "mixed"]
_SELECTIONS = ("abs", "proponents", "opponents", "extremes", "random", "mixed")


def select_removals(
    estimates: Tensor, n_removals: int, group_size: int | None = None, selection: str = "abs", seed: int = 0
) -> list[tuple[list[int], str]]:
    """Choose which training samples (or groups) to remove, from the scores.

    Single samples (``group_size=None``):

    - ``"abs"``: the ``n_removals`` largest ``|score|`` (Epifano et al.'s MNIST protocol);
    - ``"proponents"`` / ``"opponents"``: the largest / smallest scores;
    - ``"extremes"``: half the top proponents, half the top opponents;
    - ``"random"``: uniformly at random (seeded) -- the typical, not the extreme, sample;
    - ``"mixed"``: thirds of proponents, opponents and random samples.

    Groups of ``group_size`` (disjoint within a kind): proponent groups are consecutive blocks of
    the ranking from the top (the strongest ``k``, the next ``k``, ...), opponent groups the same
    from the bottom, random groups are drawn at random. ``"abs"``, ``"extremes"`` and ``"mixed"``
    cycle through the three kinds, ``"proponents"``/``"opponents"``/``"random"`` use one.

    Returns:
        ``[(indices, kind), ...]`` with kind ``"proponent"``, ``"opponent"`` or ``"random"``.
    """
    n = int(estimates.numel())
    gen = torch.Generator().manual_seed(seed)
    order_desc = torch.argsort(estimates, descending=True, stable=True).tolist()
    order_asc = order_desc[::-1]
    if group_size is None:
        if n_removals > n:
            raise ValueError(f"`n_removals`={n_removals} exceeds the {n} training samples.")
        if selection == "abs":
            idx = torch.argsort(estimates.abs(), descending=True, stable=True)[:n_removals].tolist()
            return [([i], "proponent" if estimates[i] >= 0 else "opponent") for i in idx]
        if selection == "proponents":
            return [([i], "proponent") for i in order_desc[:n_removals]]
        if selection == "opponents":
            return [([i], "opponent") for i in order_asc[:n_removals]]
        if selection == "random":
            return [([i], "random") for i in torch.randperm(n, generator=gen)[:n_removals].tolist()]
        if selection == "extremes":
            top = (n_removals + 1) // 2
            out = [([i], "proponent") for i in order_desc[:top]]
            return out + [([i], "opponent") for i in order_asc[: n_removals - top]]
        if selection == "mixed":
            k_p = (n_removals + 2) // 3
            k_o = (n_removals + 1) // 3
            chosen = order_desc[:k_p] + order_asc[:k_o]
            out = [([i], "proponent") for i in order_desc[:k_p]] + [([i], "opponent") for i in order_asc[:k_o]]
            rest = [i for i in torch.randperm(n, generator=gen).tolist() if i not in set(chosen)]
            return out + [([i], "random") for i in rest[: n_removals - k_p - k_o]]
        raise ValueError(f"`selection` must be one of {_SELECTIONS}, got {selection!r}.")
    k = group_size
    kinds = {"proponents": ["proponent"], "opponents": ["opponent"], "random": ["random"]}.get(
        selection, ["proponent", "opponent", "random"]
    )
    counts = {kind: 0 for kind in kinds}
    out: list[tuple[list[int], str]] = []
    for j in range(n_removals):
        kind = kinds[j % len(kinds)]
        c = counts[kind]
        counts[kind] += 1
        if kind == "random":
            out.append((sorted(torch.randperm(n, generator=gen)[:k].tolist()), "random"))
            continue
        order = order_desc if kind == "proponent" else order_asc
        block = order[c * k : (c + 1) * k]
        if len(block) < k:
            raise ValueError(
                f"`n_removals`={n_removals} groups of `removal`={k} need more than the {n} training samples"
                f" for disjoint {kind} groups; lower `n_removals` or the group size."
            )
        out.append((block, kind))
    return out


def _seed_list(seeds: Any) -> list[int]:
    """``0..seeds-1`` for a count, else the given seeds; refuses bools, non-integers and repeats by name."""
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigurationError(f"`seeds` must be >= 1 (or a list of seeds), got {seeds}.")
        return list(range(int(seeds)))
    expected = "a positive integer (the number of seeds) or a non-empty list of distinct integers"
    if isinstance(seeds, (str, bytes, bool)) or not isinstance(seeds, Iterable):
        raise ConfigurationError(f"`seeds` must be {expected}, got {seeds!r}.")
    seed_list = []
    for seed in seeds:
        # operator.index takes any integer type (numpy's, a 0-d integer tensor) but no float: int(2.5)
        # would silently retrain with seed 2.
        try:
            value = None if isinstance(seed, bool) else operator.index(seed)
        except TypeError:
            value = None
        if value is None:
            raise ConfigurationError(f"`seeds` must be {expected}, got {seeds!r}.")
        seed_list.append(value)
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise ConfigurationError(f"`seeds` must be a non-empty list of distinct integers, got {seeds!r}.")
    return seed_list


class FragilityCheck:
    """Checks per-training-sample scores against leave-one-out / leave-k-out retraining.

    For each selected removal the model is retrained without those samples (through
    ``pytorch_lightning.Trainer``, once per seed) and ``L_test(retrained) - L_test(control)`` is
    compared with the prediction (the score, or the sum of scores for a group). ``control`` is
    the same retraining with nothing removed and the same seed, so the drift of the retraining
    procedure itself cancels; the spread of the control test loss over seeds is the *noise
    floor*, and every effect at or below it is labelled as such. Because each removal is paired
    with the control of its own seed (same initialisation, same batch order), the floor is a
    conservative yardstick: the seed-to-seed spread of each effect is kept as well
    (``RemovalResult.std_actual``, the error bars of the scatter plot).

    Args:
        make_model: zero-argument factory returning a fresh LightningModule (same architecture
            every call); seeded with ``pytorch_lightning.seed_everything`` before each call.
        datamodule: the training data: a LightningDataModule (its ``train_dataloader()``), a
            DataLoader or a Dataset. Sample ``i`` is ``dataset[i]``; scores are indexed the same way.
            The retrains reuse the loader's batch size and shuffling (seeded per fit).
        trainer_kwargs: ``Trainer`` arguments of every retrain (``max_epochs``, ``accelerator``, ...).
            Logging, checkpointing, the progress bar and the model summary are always off.
        retrain: ``"warm_start"`` (start from the trained weights given to :meth:`run`; the
            paper's protocol) or ``"scratch"`` (fresh initialisation per seed).
        removal: ``"single"`` (leave-one-out) or an ``int`` group size ``k`` (leave-k-out).
        n_removals: number of removals (samples or groups) to retrain.
        seeds: number of retraining seeds (``0..seeds-1``) or explicit seeds. At least 2 are
            needed to measure the noise floor.
        selection: which samples to remove; see :func:`select_removals`.
        train_loss: ``train_loss(module, batch) -> Tensor[B]``, the per-sample training loss: the
            curvature of the diagnostics (default: the model's ``per_sample_loss(batch)``).
        measurement: ``measurement(module, batch) -> Tensor[B]``, what the estimates predict the
            change of: its mean over the test data, before and after each retrain (default:
            ``train_loss``, matched influence). Keep it apart from ``train_loss`` for cross-loss
            estimates, as with :class:`~lightning_influence.InfluenceFunction`.
        finetune_params: warm start only: parameter names or module prefixes to fine-tune (the
            paper fine-tunes the top layer); default all.
        curvature_params: a parameter block for curvature diagnostics (extreme Hessian
            eigenvalues, damping sweep of influence-function estimates); ``None`` skips them.
        dampings: damping values of the sweep.
        noise_threshold: an effect is above the noise floor when ``|effect| > noise_threshold * floor``.
        trajectory_every_n_epochs: record the test loss every this many epochs of the first seed's
            retrain of every removal (Epifano et al.'s Fig. 5 convergence check); ``None`` skips it.
        n_bootstrap: bootstrap resamples for the correlation confidence intervals.
        selection_seed: seed of random selections.
        measurement_seed: RNG seed while evaluating the test loss (common random numbers for
            stochastic losses such as a VAE's ELBO).
        verbose: log progress (one line per removal) with ``rank_zero_info``.

    Raises:
        ConfigurationError: on invalid arguments, naming the argument.
    """

    def __init__(
        self,
        make_model: Callable[[], pl.LightningModule],
        datamodule: pl.LightningDataModule | DataLoader | Dataset,
        trainer_kwargs: Mapping[str, Any] | None = None,
        retrain: Literal["warm_start", "scratch"] = "warm_start",
        removal: Literal["single"] | int = "single",
        n_removals: int = 40,
        seeds: int | Sequence[int] = 3,
        selection: Selection = "abs",
        train_loss: PerSampleLoss | None = None,
        measurement: PerSampleLoss | None = None,
        finetune_params: Sequence[str] | str | None = None,
        curvature_params: Sequence[str] | str | None = None,
        dampings: Sequence[float] = DEFAULT_DAMPINGS,
        noise_threshold: float = 1.0,
        trajectory_every_n_epochs: int | None = None,
        n_bootstrap: int = 1000,
        selection_seed: int = 0,
        measurement_seed: int = 0,
        verbose: bool = True,
    ) -> None:
        if not callable(make_model):
            raise ConfigurationError(
                f"`make_model` must be a callable returning a LightningModule, got {make_model!r}."
            )
        if not isinstance(datamodule, (pl.LightningDataModule, DataLoader, Dataset)):
            raise ConfigurationError(
                "`datamodule` must be a LightningDataModule, a DataLoader or a Dataset of training samples;"
                f" got {type(datamodule).__name__}."
            )
        if trainer_kwargs is not None and not isinstance(trainer_kwargs, Mapping):
            raise ConfigurationError(
                f"`trainer_kwargs` must be a dict of Trainer arguments, got {type(trainer_kwargs).__name__}."
            )
        if retrain not in ("warm_start", "scratch"):
            raise ConfigurationError(f"`retrain` must be 'warm_start' or 'scratch', got {retrain!r}.")
        if removal != "single" and not (isinstance(removal, int) and not isinstance(removal, bool) and removal >= 1):
            raise ConfigurationError(f"`removal` must be 'single' or a group size >= 1, got {removal!r}.")
        check_count("`n_removals`", n_removals, error=ConfigurationError)
        seed_list = _seed_list(seeds)
        if selection not in _SELECTIONS:
            raise ConfigurationError(f"`selection` must be one of {_SELECTIONS}, got {selection!r}.")
        for name, fn in (("train_loss", train_loss), ("measurement", measurement)):
            if fn is not None and not callable(fn):
                raise ConfigurationError(
                    f"`{name}` must be callable as {name}(module, batch) -> Tensor[B], got {fn!r}."
                )
        if finetune_params is not None and retrain == "scratch":
            raise ConfigurationError("`finetune_params` only applies to retrain='warm_start'.")
        if any((not math.isfinite(d)) or d < 0 for d in dampings):
            raise ConfigurationError(f"`dampings` must be finite and >= 0, got {list(dampings)}.")
        if not (math.isfinite(noise_threshold) and noise_threshold > 0):
            raise ConfigurationError(f"`noise_threshold` must be > 0, got {noise_threshold!r}.")
        if trajectory_every_n_epochs is not None and trajectory_every_n_epochs < 1:
            raise ConfigurationError(f"`trajectory_every_n_epochs` must be >= 1, got {trajectory_every_n_epochs}.")
        if len(seed_list) < 2:
            rank_zero_warn("`seeds` has one seed: the retraining noise floor cannot be measured (use seeds >= 2).")
        self.make_model = make_model
        self.datamodule = datamodule
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.retrain = retrain
        self.removal = removal
        self.n_removals = int(n_removals)
        self.seeds = seed_list
        self.selection = selection
        self.train_loss = train_loss
        self.measurement = measurement
        self.finetune_params = finetune_params
        self.curvature_params = curvature_params
        self.dampings = [float(d) for d in dampings]
        self.noise_threshold = float(noise_threshold)
        self.trajectory_every_n_epochs = trajectory_every_n_epochs
        self.n_bootstrap = n_bootstrap
        self.selection_seed = selection_seed
        self.measurement_seed = measurement_seed
        self.verbose = verbose
        #: The report of the latest :meth:`run`, complete or partial (also attached to a raised error).
        self.last_report: FragilityReport | None = None

    # ------------------------------------------------------------------ helpers
    def _config(self) -> dict[str, Any]:
        return {
            "retrain": self.retrain,
            "removal": self.removal,
            "n_removals": self.n_removals,
            "seeds": self.seeds,
            "selection": self.selection,
            "trainer_kwargs": {
                k: repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v
                for k, v in self.trainer_kwargs.items()
            },
            "finetune_params": self.finetune_params,
            "curvature_params": self.curvature_params,
            "dampings": self.dampings,
            "noise_threshold": self.noise_threshold,
        }

    @staticmethod
    def _as_estimates(estimates: Any, n_train: int) -> Tensor:
        if isinstance(estimates, Tensor):
            est = estimates.detach().to("cpu", torch.float64)
        else:
            try:
                est = torch.as_tensor(np.asarray(estimates, dtype=np.float64))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"`estimates` must be a 1-D sequence of numbers (one per training sample): {err}"
                ) from err
        if est.dim() == 2 and 1 in est.shape:
            est = est.reshape(-1)
        if est.dim() != 1:
            raise ValueError(f"`estimates` must be 1-D, one score per training sample; got shape {tuple(est.shape)}.")
        if est.numel() != n_train:
            raise ValueError(
                f"`estimates` has {est.numel()} scores but the training set of `datamodule` has {n_train} samples;"
                " pass one score per training sample, in dataset order."
            )
        if not torch.isfinite(est).all():
            bad = torch.nonzero(~torch.isfinite(est)).reshape(-1)[:5].tolist()
            raise ValueError(f"`estimates` contains inf/NaN (e.g. at positions {bad}); fix the estimator first.")
        return est

    def _given_groups(self, indices: Sequence[Any], n_train: int) -> list[tuple[list[int], str]]:
        groups: list[tuple[list[int], str]] = []
        for entry in indices:
            g = (
                [int(entry)]
                if isinstance(entry, (int, np.integer)) or (isinstance(entry, Tensor) and entry.dim() == 0)
                else [int(i) for i in entry]
            )
            if not g or any(i < 0 or i >= n_train for i in g) or len(set(g)) != len(g):
                raise ValueError(f"`indices` entry {entry!r} must be distinct training positions in [0, {n_train}).")
            groups.append((g, "given"))
        if not groups:
            raise ValueError("`indices` is empty.")
        return groups

    def _resolve_losses(self, model: nn.Module | None) -> tuple[PerSampleLoss, PerSampleLoss]:
        probe = model if model is not None else self.make_model()
        train_loss = resolve_loss(self.train_loss, probe, argname="train_loss")
        measurement = train_loss if self.measurement is None else resolve_loss(self.measurement, probe, "measurement")
        return train_loss, measurement

    # ------------------------------------------------------------------ the check
    def run(
        self,
        estimates: Tensor | Sequence[float],
        test_data: Any,
        model: pl.LightningModule | None = None,
        indices: Sequence[int] | Sequence[Sequence[int]] | None = None,
    ) -> FragilityReport:
        """Retrain without the selected samples and compare with ``estimates``.

        Args:
            estimates: one score per training sample (dataset order); positive = removing it is
                predicted to raise the test loss. Any estimator: TracIn, influence functions, ...
            test_data: the test sample(s) (Dataset, DataLoader or collated batch); the
                measurement is their mean ``measurement``.
            model: the trained model the scores belong to. Required for warm start and for
                curvature diagnostics; with scratch retraining it only provides the reference loss.
            indices: explicit removals instead of ``selection``: training positions (single) or
                lists of positions (groups). Predictions are the summed scores.

        Returns:
            A finalized :class:`FragilityReport` (also kept as ``self.last_report``).

        Raises:
            ValueError: bad ``estimates``/``indices`` (nothing is computed).
            FragilityError: an ``ArchitectureMismatchError`` (``make_model`` built another
                architecture) or ``RetrainingDivergedError`` (inf/NaN after a retrain, or the fit
                raised); its ``report`` attribute holds every result measured before it.
        """
        start = time.perf_counter()
        dataset, loader_kwargs = resolve_training_data(self.datamodule)
        n_train = len(dataset)  # type: ignore[arg-type]
        est = self._as_estimates(estimates, n_train)
        if self.retrain == "warm_start" and model is None:
            raise ConfigurationError(
                "`model` (the trained model the estimates belong to) is required for retrain='warm_start'."
            )
        if self.curvature_params is not None and model is None:
            raise ConfigurationError("`model` is required for curvature diagnostics (`curvature_params`).")
        if model is not None and not isinstance(model, pl.LightningModule):
            raise ConfigurationError(f"`model` must be a LightningModule, got {type(model).__name__}.")
        if indices is not None:
            groups = self._given_groups(indices, n_train)
        else:
            size = None if self.removal == "single" else int(self.removal)
            groups = select_removals(est, self.n_removals, size, self.selection, self.selection_seed)
        if len(groups) < 3:
            rank_zero_warn(f"Only {len(groups)} removals: correlations need at least 3.")
        train_loss, measurement = self._resolve_losses(model)

        report = FragilityReport(
            retrain=self.retrain,
            removal=self.removal,
            selection="given" if indices is not None else self.selection,
            n_train=n_train,
            seeds=list(self.seeds),
            noise_threshold=self.noise_threshold,
            removals=[RemovalResult(indices=g, predicted=float(est[g].sum()), kind=kind) for g, kind in groups],
            config=self._config(),
        )
        self.last_report = report

        def measure(m: nn.Module) -> float:
            return evaluate_loss(m, measurement, test_data, seed=self.measurement_seed)

        retrainer: Retrainer | None = None
        try:
            reference_state = None
            signature = None
            if model is not None:
                signature = architecture_signature(model)
                reference_state = model.state_dict()
                report.reference_test_loss = check_finite_loss(measure(model), "the reference model")
            if self.curvature_params is not None:
                assert model is not None
                if self.verbose:
                    rank_zero_info("Fragility check: curvature diagnostics")
                try:
                    report.curvature = curvature_diagnostics(
                        model,
                        train_loss,
                        dataset,
                        test_data,
                        self.curvature_params,
                        measurement=measurement,
                        removal_groups=[g for g, _ in groups],
                        dampings=self.dampings,
                    )
                except (FloatingPointError, RuntimeError) as err:
                    raise FragilityError(f"Curvature diagnostics failed: {err}") from err
            retrainer = Retrainer(
                self.make_model,
                dataset,
                loader_kwargs,
                self.trainer_kwargs,
                self.retrain,
                reference_state=reference_state,
                reference_signature=signature,
                finetune_params=self.finetune_params,
            )
            controls: dict[int, float] = {}
            for seed in self.seeds:
                fitted = retrainer.fit([], seed)
                controls[seed] = check_finite_loss(measure(fitted), "the control retrain (no removal)", seed)
                report.control_test_losses.append(controls[seed])
            report.finalize(n_bootstrap=0)  # noise floor available to partial reports from here on
            for j, r in enumerate(report.removals):
                for k, seed in enumerate(self.seeds):
                    callbacks = []
                    if self.trajectory_every_n_epochs is not None and k == 0:
                        callbacks.append(TestLossTrajectory(measure, self.trajectory_every_n_epochs))
                    fitted = retrainer.fit(r.indices, seed, callbacks=callbacks)
                    loss = check_finite_loss(measure(fitted), f"removal of {r.indices}", seed)
                    r.actual.append(loss - controls[seed])
                    r.seeds.append(seed)
                    if callbacks:
                        r.trajectory_epochs, r.trajectory_losses = callbacks[0].epochs, callbacks[0].losses
                if self.verbose:
                    rank_zero_info(
                        f"Fragility check: removal {j + 1}/{len(report.removals)} {r.indices}: predicted"
                        f" {r.predicted:.4g}, actual {r.mean_actual:.4g}"
                    )
            report.complete = True
        except FragilityError as err:
            report.errors.append(f"{type(err).__name__}: {err}")
            report.n_fits = retrainer.n_fits if retrainer is not None else 0
            report.runtime_s = time.perf_counter() - start
            report.finalize(n_bootstrap=self.n_bootstrap)
            err.report = report
            raise
        except (KeyboardInterrupt, SystemExit) as err:
            # Stopped by the user (Lightning turns Ctrl-C inside a fit into SystemExit): what was
            # measured stays usable in ``self.last_report``.
            report.errors.append(f"{type(err).__name__}: interrupted")
            report.n_fits = retrainer.n_fits if retrainer is not None else 0
            report.runtime_s = time.perf_counter() - start
            report.finalize(n_bootstrap=0)
            raise
        report.n_fits = retrainer.n_fits
        report.runtime_s = time.perf_counter() - start
        return report.finalize(n_bootstrap=self.n_bootstrap)
