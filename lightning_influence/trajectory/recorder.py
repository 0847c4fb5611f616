"""The callback that records the checkpoint trajectory during ``Trainer.fit``.

It stays thin: learning-rate bookkeeping and the DDP protocol live here, the gradient math in
:mod:`~lightning_influence.gradients.featurizer`, the sweep over the dataset in
:mod:`~lightning_influence.trajectory.sweep`, storage in :mod:`~lightning_influence.trajectory.store`.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_influence.data.batches import num_samples
from lightning_influence.errors import StoreError
from lightning_influence.gradients.engine import PerSampleGradientEngine
from lightning_influence.gradients.factored import (
    ENGINE_CHOICES,
    ENGINE_NAMES,
    EngineName,
    describe_engine,
    resolve_engine,
)
from lightning_influence.gradients.featurizer import GradientFeaturizer
from lightning_influence.gradients.losses import PerSampleLoss, resolve_loss
from lightning_influence.gradients.parameters import module_state, resolve_parameter_names
from lightning_influence.gradients.precision import precision_from_trainer
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection
from lightning_influence.trajectory.store import (
    MANIFEST,
    CheckpointWriter,
    GradientStoreWriter,
    header_for,
    shard_bounds,
)
from lightning_influence.trajectory.sweep import factor_layout, learning_rate_scales, probe_rows, sweep_rows
from lightning_influence.trajectory.write_behind import WriteThread
from lightning_influence.utils.arguments import check_count
from lightning_influence.utils.distributed import all_gather_objects

__all__ = ["TrajectoryRecorder"]

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class TrajectoryRecorder(pl.Callback):
    """Record per-sample training gradients, learning rates and weights at checkpoints during ``fit``.

    At every checkpoint the recorder computes, for every sample of ``dataset`` (in order: a
    sample's id is its position), the gradient of ``train_loss`` with respect to the tracked
    parameters at the current weights, exact or randomly projected, and stores it with the
    learning-rate credit of the interval and all weights (so test gradients can be computed
    after ``fit``). :class:`~lightning_influence.InfluenceAnalysis` reads the result.

    Checkpoints are taken every ``every_n_epochs`` epochs (or ``every_n_steps`` optimizer steps),
    plus one extra, final checkpoint at the end of training when optimizer steps were taken since
    the last one (otherwise those steps would earn no learning-rate credit): a 10-epoch fit with
    ``every_n_epochs=3`` records after epochs 3, 6, 9 and 10.

    Recording does not change training: RNG state and train/eval modes are restored, no ``.grad``
    is touched, and gradients are taken in eval mode (BatchNorm uses running statistics, dropout
    is off), so a sample's gradient is deterministic across checkpoints.

    **Runs never mix.** A fit without ``ckpt_path`` starts a new run: ``dirpath`` must be empty,
    missing, or (with ``overwrite=True``) hold a store, which is replaced. A fit resumed with
    ``ckpt_path`` appends to the store of the run that wrote that Lightning checkpoint, identified
    by the resolved ``dirpath`` and the run id kept in the manifest and in this callback's state;
    checkpoints recorded after the Lightning checkpoint are dropped (they are recorded again), and
    a store with fewer checkpoints than the Lightning checkpoint expects is an error.

    **DDP** (``strategy="ddp"``, any number of devices and nodes): every rank computes the rows of
    its own contiguous shard of ``dataset`` (``shard_bounds``: rows ``[n r / W, n (r + 1) / W)``,
    so there is no padding and no duplicate) and writes them into its disjoint row range of the
    checkpoint's one ``grads.npy``; rank 0 resolves the directory and broadcasts it, creates and
    preallocates each checkpoint's file, writes the weights and lists the checkpoint in the manifest
    once every rank has reported its rows. ``dirpath`` must be on a filesystem all ranks share.
    Sharded strategies (FSDP, DeepSpeed) are refused.

    Args:
        dirpath: directory of the gradient store.
        dataset: the samples whose gradients are recorded. Default: the trainer's training
            dataset (iterated in order, without shuffling).
        train_loss: ``train_loss(module, batch) -> Tensor[B]``, one training loss per sample.
            Default: ``pl_module.per_sample_loss(batch)``.
        every_n_epochs: record at the end of every ``n``-th training epoch (default 1).
        every_n_steps: record after every ``n``-th optimizer step instead.
        params: parameter names or module-name prefixes to track (default: all trainable).
        projection_dim: ``None`` stores exact gradients; an integer ``k`` smaller than the gradient
            dimension stores seeded random projections of width ``k``, generated block by block
            (never a dense ``D x k`` matrix).
        projection_kind: ``"sjlt"`` (sparse JL, fast), ``"rademacher"``, ``"gaussian"``, or
            ``"kronecker"`` (per layer ``(P_g g)(P_a a)^T`` straight from a factored engine's layer
            inputs and output gradients; only parameters of at most ``4 k`` entries are formed whole).
        grad_dtype: storage dtype of the gradient rows (scores always accumulate in fp32).
        grad_precision: ``"fp32"`` computes gradients from fp32 copies outside autocast (default,
            also for the ``*-true`` precisions); ``"autocast"`` follows the trainer's precision,
            with per-sample loss scaling and back-off under fp16.
        nonfinite: what to do with a sample whose gradient has inf/NaN after every loss-scale
            back-off: ``"raise"`` (abort the checkpoint and stop) or ``"skip"`` (store it, list its id
            in the manifest, warn; its scores come out NaN, never zero).
        batch_size: samples per gradient batch during recording.
        chunk_size: samples per ``vmap`` chunk (of the vmap engine, or of the factored engine's
            fallback; bounds memory; default: the whole batch).
        engine: the per-sample gradient engine: ``"auto"`` (the factored hook engine where the
            tracked layers have rules, else ``"vmap"``), ``"factored"``, ``"vmap"``, ``"loop"`` (one
            autograd backward per sample: for layers ``vmap`` cannot batch, such as ``nn.GRU``), or any
            :class:`~lightning_influence.gradients.PerSampleGradientEngine` (e.g.
            ``FactoredEngine(fallback=LoopEngine())``). The manifest records the
            engine and the rule behind every parameter block; rows do not depend on it, so analysis
            may use another engine.
        factored_storage: exact factored storage (exact rows only; default off). Every tracked
            parameter whose layer factors are smaller than its gradient (``S (d_in + d_out) <
            d_in d_out / groups`` values per sample, e.g. a Linear layer without positions) is stored
            as its inputs ``a`` ``[n, S, d_in]`` and output gradients ``g`` ``[n, S, d_out]`` side by
            side in ``f.<param>.npy`` of each checkpoint; such a layer's bias is not stored at all
            (its gradient is ``g`` summed over positions), and ``grads.npy`` keeps only the other
            parameters' columns. Scores
            from such a store are exact and equal the dense store's. Needs an engine that returns
            factors (``"auto"``/``"factored"``) and a fixed input size (``S`` must not change
            between batches). The manifest lists the factored parameters under ``factored``.
        seed: seed of the projection and of the reparameterisation noise.
        overwrite: a fresh fit replaces a store already at ``dirpath``, deleting only the files the
            store wrote (default: refuse, so nothing recorded is lost or mixed). A ``dirpath``
            holding other files is always refused.
        verbose: log a line per checkpoint. A progress bar over each checkpoint's batches shows on rank zero
            unless the Trainer has `enable_progress_bar=False`.
        commit_in_background: once a checkpoint's rows are computed, make it durable (wait for its
            writes, fsync) and list it in the manifest on a background thread while training goes on
            (default; one process only: under DDP the ranks commit together). The recorder waits
            for it before the next recording, before Lightning saves its state, and at the end of
            ``fit``, and raises its error there; a checkpoint is listed only once durable either
            way. Turn it off, or call :meth:`wait_for_commit`, when code reads the store during
            ``fit`` right after a recording.

    Raises:
        MisconfigurationException: on invalid arguments (eagerly); in ``setup`` for a sharded
            strategy or a module without ``per_sample_loss`` (and no ``train_loss``); at train start
            for an empty dataset, an unknown parameter name, a ``projection_dim`` not smaller than
            the gradient dimension, or a ``dirpath`` that holds another run or other files.
        OSError: the disk filled up (the message names the store and the space needed; earlier
            checkpoints are intact).

    Example::

        recorder = TrajectoryRecorder(dirpath="runs/influence", every_n_epochs=1, projection_dim=1024)
        trainer = pl.Trainer(max_epochs=20, callbacks=[recorder])
        trainer.fit(vae, datamodule)
        analysis = InfluenceAnalysis(recorder.store_path, vae)
    """

    def __init__(
        self,
        dirpath: str | Path,
        dataset: Dataset | None = None,
        train_loss: PerSampleLoss | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        params: Sequence[str] | str | None = None,
        projection_dim: int | None = None,
        projection_kind: Literal["sjlt", "rademacher", "gaussian", "kronecker"] = "sjlt",
        grad_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        grad_precision: Literal["fp32", "autocast"] = "fp32",
        nonfinite: Literal["raise", "skip"] = "raise",
        batch_size: int = 64,
        chunk_size: int | None = None,
        engine: EngineName | PerSampleGradientEngine = "auto",
        seed: int = 0,
        overwrite: bool = False,
        verbose: bool = False,
        factored_storage: bool = False,
        commit_in_background: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(dirpath, (str, Path)) or not str(dirpath):
            raise MisconfigurationException(f"`dirpath` must be a non-empty path, got {dirpath!r}.")
        if every_n_epochs is not None and every_n_steps is not None:
            raise MisconfigurationException(
                "`every_n_epochs` and `every_n_steps` are mutually exclusive; set one of them."
            )
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None:
                check_count(f"`{name}`", value, error=MisconfigurationException)
        if every_n_epochs is None and every_n_steps is None:
            every_n_epochs = 1
        if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
            raise MisconfigurationException(
                f"`projection_dim` must be None or a positive integer, got {projection_dim!r}."
            )
        choices = {
            "projection_kind": (projection_kind, ("sjlt", "rademacher", "gaussian", "kronecker")),
            "grad_dtype": (grad_dtype, ("float32", "float16", "bfloat16")),
            "grad_precision": (grad_precision, ("fp32", "autocast")),
            "nonfinite": (nonfinite, ("raise", "skip")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise MisconfigurationException(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
            if value is not None:
                check_count(f"`{name}`", value, error=MisconfigurationException)
        if isinstance(engine, str):
            if engine not in ENGINE_NAMES:
                raise MisconfigurationException(
                    f"`engine` must be {ENGINE_CHOICES} or a PerSampleGradientEngine, got {engine!r}."
                )
        elif not isinstance(engine, PerSampleGradientEngine):
            raise MisconfigurationException(
                f"`engine` must be {ENGINE_CHOICES} or implement"
                f" lightning_influence.gradients.PerSampleGradientEngine, got {engine!r}."
            )
        elif chunk_size is not None:
            raise MisconfigurationException(
                "`chunk_size` configures the built-in engines; with an engine instance, set it on the engine instead."
            )
        if train_loss is not None and not callable(train_loss):
            raise MisconfigurationException(
                f"`train_loss` must be callable as train_loss(module, batch) -> Tensor[B], got {train_loss!r}."
            )
        if dataset is not None and not hasattr(dataset, "__len__"):
            raise MisconfigurationException("`dataset` must be a map-style Dataset with __len__ (ids are positions).")
        for name, flag in (("factored_storage", factored_storage), ("commit_in_background", commit_in_background)):
            if not isinstance(flag, bool):
                raise MisconfigurationException(f"`{name}` must be True or False, got {flag!r}.")
        if factored_storage and projection_dim is not None:
            raise MisconfigurationException(
                "`factored_storage=True` stores exact gradients as layer factors; it cannot be combined with"
                f" `projection_dim`={projection_dim}. Use one of them."
            )
        if isinstance(params, str):
            params = [params]
        self.dirpath = Path(dirpath)
        self.dataset = dataset
        self.train_loss = train_loss
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.params = list(params) if params is not None else None
        self.projection_dim = projection_dim
        self.projection_kind = projection_kind
        self.grad_dtype = grad_dtype
        self.grad_precision = grad_precision
        self.nonfinite = nonfinite
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.engine = engine
        self.seed = seed
        self.overwrite = overwrite
        self.verbose = verbose
        self.factored_storage = factored_storage
        self.commit_in_background = commit_in_background
        # The checkpoint being listed in the background: (writer, its commit, index, step).
        self._commit: tuple[CheckpointWriter, Future[Any], int, int] | None = None
        self._commit_thread = WriteThread()
        self._new_run()
        self._run_id: str | None = None
        # Resolved in setup / at fit start.
        self._resolved = Path(dirpath).expanduser().resolve()
        self._store_dir: Path | None = None
        self._rank, self._world = 0, 1
        self._n_samples = 0
        self._writer: GradientStoreWriter | None = None
        self._featurizer: GradientFeaturizer | None = None
        self._spec: ProjectionSpec | None = None
        self._module_params: dict[str, torch.nn.Parameter] = {}
        self._names: list[str] = []
        self._param_ids: dict[int, str] = {}
        self._factored: list[str] = []
        self._data: Any = None
        self._collate: Callable | None = None
        self._active = False

    def _new_run(self) -> None:
        # Bookkeeping (also the callback's state_dict): fresh for every fit; a resumed one loads it afterwards.
        self._last_step = -1
        self._credit: dict[str, float] = {}
        self._steps = 0
        self._skipped = 0
        # The epoch of the last optimizer step: the final checkpoint is recorded after the loop moved past it
        # (not in the state: a resumed fit counts it again from its next step).
        self._step_epoch: int | None = None
        self._pending: list[tuple[list[float], list[list[int]]]] = []
        self._scale_before: float | None = None
        self._resumed: dict[str, Any] | None = None

    @property
    def store_path(self) -> Path:
        """The gradient store directory (open it with :class:`~lightning_influence.GradientStore`)."""
        return self._store_dir if self._store_dir is not None else self._resolved

    @property
    def run_id(self) -> str | None:
        """The id of the run this recorder writes (set at train start, kept in the manifest and the state)."""
        return self._run_id

    @property
    @override
    def state_key(self) -> str:
        # The resolved directory, not its spelling: "runs/x" and "./runs/../runs/x" are one store.
        return self._generate_state_key(dirpath=str(self._resolved))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A recorder used for a second fit must not carry the first one's step count and learning-rate credit
        # (its steps would count as already seen). Lightning restores a resumed fit's state after setup.
        self.wait_for_commit()
        self._new_run()
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if names & set(_SHARDED):
            raise MisconfigurationException(
                f"TrajectoryRecorder does not support sharded strategies yet (got {type(trainer.strategy).__name__});"
                " per-sample gradients need the full module on one device. Use strategy='ddp' (every rank records"
                " its shard of the samples) or a single device."
            )
        # Fail fast: a module without the default loss would otherwise train until the first checkpoint.
        resolve_loss(self.train_loss, pl_module, argname="train_loss")
        # Rank 0 decides the directory, every rank uses it (as ModelCheckpoint does).
        decided = str(self._resolved) if trainer.is_global_zero else None
        self._store_dir = Path(trainer.strategy.broadcast(decided, src=0))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = True
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self._data, self._collate = self._resolve_dataset(trainer)
        loss_fn = resolve_loss(self.train_loss, pl_module, argname="train_loss")
        try:
            self._names = resolve_parameter_names(pl_module, self.params)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        named = dict(pl_module.named_parameters())
        self._module_params = named
        self._param_ids = {id(p): n for n, p in named.items()}
        full_dim = sum(named[n].numel() for n in self._names)
        if self.projection_dim is not None and self.projection_dim >= full_dim:
            raise MisconfigurationException(
                f"`projection_dim`={self.projection_dim} is not smaller than the gradient dimension {full_dim} of the"
                f" tracked parameters: projected rows would be as wide as exact ones or wider. Use"
                f" projection_dim=None (exact gradients) or a value below {full_dim}."
            )
        precision = precision_from_trainer(str(trainer.precision), self.grad_precision)
        if self.grad_precision == "autocast" and precision.mode == "fp32":
            rank_zero_warn(
                f"`grad_precision='autocast'` with Trainer precision {trainer.precision!r}: nothing to autocast,"
                " gradients are computed in fp32."
            )
        spec = None
        if self.projection_dim is not None:
            spec = ProjectionSpec(dim=self.projection_dim, seed=self.seed, kind=self.projection_kind)
        self._spec = spec
        self._featurizer = GradientFeaturizer(
            pl_module,
            loss_fn,
            self._names,
            engine=resolve_engine(self.engine, pl_module, self._names, self.chunk_size),
            precision=precision,
            argname="train_loss",
            noise_seed=self.seed,
        )
        self._probe(pl_module)
        layout = self._factor_layout(pl_module) if self.factored_storage else {}
        self._factored = list(layout)
        self._n_samples = num_samples(self._data, "dataset")
        header = header_for(
            n_samples=self._n_samples,
            param_names=self._names,
            param_shapes={n: list(named[n].shape) for n in self._names},
            grad_dtype=self.grad_dtype,
            projection=spec,
            noise_seed=self.seed,
            precision=precision,
            extra={
                "train_loss": getattr(loss_fn, "__qualname__", repr(loss_fn)),
                "model": type(pl_module).__qualname__,
                "model_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                "hparams": _json_safe_hparams(pl_module),
                "trainer_precision": str(trainer.precision),
                **describe_engine(self._featurizer.engine, pl_module, self._names, self._featurizer.loss_fn),
                "world_size": trainer.world_size,
            },
            factored=layout or None,
        )
        self._open_store(trainer, header)

    def _open_store(self, trainer: pl.Trainer, header: Any) -> None:
        """Rank 0 opens (or creates) the store and decides the run; the other ranks attach to it."""
        assert self._store_dir is not None
        resuming = self._resumed is not None
        error: str | None = None
        disk_error: OSError | None = None
        decided: tuple[str | None, list[int]] | None = None
        if trainer.is_global_zero:
            try:
                expected = int(self._resumed.get("n_checkpoints", 0)) if self._resumed else 0
                if resuming and expected and not (self._store_dir / MANIFEST).is_file():
                    raise StoreError(
                        f"There is no gradient store at {str(self._store_dir)!r} (0 checkpoints), but the Lightning"
                        f" checkpoint being resumed expects {expected} recorded by run {self._resumed.get('run_id')!r}."
                        " Was the store deleted or moved? Point `dirpath` at it, or start a new run without ckpt_path."
                    )
                writer = GradientStoreWriter(
                    self._store_dir,
                    header,
                    overwrite=self.overwrite and not resuming,
                    run_id=self._resumed.get("run_id") if self._resumed else None,
                    new_run=not resuming,
                )
                dropped = self._roll_back(writer) if resuming else []
                self._writer = writer
                decided = (writer.run_id, dropped)
            except StoreError as err:
                error = str(err)
            except OSError as err:  # a full disk stays an OSError on the rank that hit it
                error, disk_error = str(err), err
        # Collectives outside any rank-zero branch: every rank learns the outcome, and fails together.
        error, decided = trainer.strategy.broadcast((error, decided), src=0)
        if disk_error is not None:
            raise disk_error
        if error is not None:
            raise MisconfigurationException(f"TrajectoryRecorder: {error}")
        assert decided is not None
        self._run_id, dropped = decided
        self._resumed = None  # the store now answers for the run; a later fit without ckpt_path is a new run
        if dropped:
            rank_zero_warn(
                f"TrajectoryRecorder: resumed from a checkpoint taken before {len(dropped)} recorded checkpoint(s)"
                f" (steps {dropped}); they were dropped and will be recorded again."
            )
        problem: str | None = None
        if not trainer.is_global_zero:
            try:
                self._writer = GradientStoreWriter(self._store_dir, header, run_id=self._run_id, attach=True)
            except (StoreError, OSError) as err:
                problem = f"rank {trainer.global_rank} cannot open the store rank 0 created: {err}"
        problems = all_gather_objects(trainer, problem)
        if any(problems):
            raise MisconfigurationException(
                "TrajectoryRecorder: " + "; ".join(p for p in problems if p) + " (`dirpath` must be on a filesystem"
                " every rank shares)."
            )

    def _roll_back(self, writer: GradientStoreWriter) -> list[int]:
        """Match the store to the Lightning checkpoint being resumed; return the dropped steps."""
        assert self._resumed is not None
        expected = int(self._resumed.get("n_checkpoints", 0))
        have = writer.n_checkpoints
        if have < expected:
            raise StoreError(
                f"The gradient store at {str(writer.path)!r} holds {have} checkpoint(s), but the Lightning checkpoint"
                f" being resumed expects {expected} recorded by run {self._resumed.get('run_id')!r}: the store lost"
                " checkpoints (deleted or replaced). Resume from an earlier Lightning checkpoint or record a new run."
            )
        return [int(e["step"]) for e in writer.truncate(expected)]

    def _projection(self, checkpoint: int) -> RandomProjection | None:
        if self._spec is None:
            return None
        shapes = {n: tuple(self._module_params[n].shape) for n in self._names}
        return RandomProjection.for_shapes(self._spec, shapes, checkpoint=checkpoint)

    def _resolve_dataset(self, trainer: pl.Trainer) -> tuple[Any, Callable | None]:
        data = self.dataset
        collate = None
        if data is None:
            loader = trainer.train_dataloader
            if not isinstance(loader, DataLoader):
                raise MisconfigurationException(
                    "TrajectoryRecorder could not find a single training DataLoader; pass `dataset` explicitly."
                )
            data, collate = loader.dataset, loader.collate_fn
        try:
            n = num_samples(data, "dataset")
        except TypeError as err:
            raise MisconfigurationException(str(err)) from err
        if n == 0:
            raise MisconfigurationException("`dataset` is empty: there are no samples to record gradients for.")
        return data, collate

    def _probe(self, pl_module: pl.LightningModule) -> None:
        """Fail before training, not after the first epoch, if the loss is unusable."""
        assert self._featurizer is not None
        try:
            probe_rows(
                self._featurizer,
                pl_module,
                self._data,
                collate=self._collate,
                projection=self._projection(0),
                loop_if_needed=self.engine == "auto",
            )
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"TrajectoryRecorder: {err}") from err

    def _factor_layout(self, pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
        """The parameters to store as factors (smaller than their gradient), with positions and sizes."""
        assert self._featurizer is not None
        layout = factor_layout(self._featurizer, pl_module, self._data, collate=self._collate)
        if not layout:
            rank_zero_warn(
                "TrajectoryRecorder: `factored_storage=True` but no tracked parameter has layer factors smaller than"
                f" its gradient (engine {self._featurizer.engine.name!r}); every gradient is stored densely."
            )
        return layout

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._active:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and self._scale_before is None:
            self._scale_before = float(scaler.get_scale())
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        groups = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
        self._pending.append((lrs, groups))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        if trainer.global_step > self._last_step and self._pending:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            skipped = (
                scaler is not None and self._scale_before is not None and float(scaler.get_scale()) < self._scale_before
            )
            if skipped:
                self._skipped += len(self._pending)
            else:
                for lrs, groups in self._pending:
                    for lr, ids in zip(lrs, groups):
                        for pid in ids:
                            name = self._param_ids.get(pid)
                            if name is not None:
                                self._credit[name] = self._credit.get(name, 0.0) + lr
                    self._steps += 1
            self._last_step = trainer.global_step
            self._step_epoch = trainer.current_epoch
            self._pending.clear()
            self._scale_before = None
            if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
                self._record(trainer, pl_module)
        elif trainer.global_step <= self._last_step:
            self._pending.clear()
            self._scale_before = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._record(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The extra, final checkpoint: steps since the last checkpoint would otherwise earn no credit.
        if self._active and (self._steps or self._skipped):
            self._record(trainer, pl_module)
        self.wait_for_commit()  # fit returns with every checkpoint listed

    def _steps_per_epoch(self, trainer: pl.Trainer) -> float:
        nb = trainer.num_training_batches
        if not math.isfinite(nb) or nb <= 0:
            return 1.0
        return float(max(1, math.ceil(nb / trainer.accumulate_grad_batches)))

    def _etas(self, trainer: pl.Trainer) -> tuple[float, dict[str, float] | None, dict[str, float]]:
        spe = self._steps_per_epoch(trainer)
        per_param = {n: self._credit.get(n, 0.0) / spe for n in self._names}
        return (*learning_rate_scales(per_param), per_param)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writer is None or self._featurizer is None:
            return
        self.wait_for_commit()  # the previous checkpoint is listed (or its failure raised) before the next begins
        t0 = time.perf_counter()
        behind = self.commit_in_background and self._world == 1
        eta, scales, per_param = self._etas(trainer)
        n = num_samples(self._data, "dataset")
        if n != self._n_samples:
            raise MisconfigurationException(
                f"TrajectoryRecorder: `dataset` has {n} samples at step {trainer.global_step} but had"
                f" {self._n_samples} when the store was created; rows are keyed by position, so the recorded dataset"
                " must not change size during fit. Pass a fixed `dataset`."
            )
        start, stop = shard_bounds(n, self._world, self._rank)
        index = self._writer.n_checkpoints
        # 1. Rank 0 creates the checkpoint's file (preallocated); everyone learns whether that worked.
        ckpt: CheckpointWriter | None = None
        failure: BaseException | None = None
        if self._rank == 0:
            try:
                ckpt = self._writer.begin_checkpoint(stop=stop)
                ckpt.write_weights(module_state(pl_module, upcast=False))  # written behind the sweep
            except (OSError, StoreError) as err:
                if ckpt is not None:
                    ckpt.abort()
                    ckpt = None
                failure = err
        _raise_together(trainer, failure, "create checkpoint", index)
        # 2. Every rank computes and writes the rows of its own shard.
        t_rows = time.perf_counter()
        bad_ids: list[int] = []
        shard_info: dict[str, Any] | None = None
        try:
            rows_out = ckpt.rows if ckpt is not None else self._writer.open_shard(index, start, stop)
            assert rows_out is not None
            try:
                if stop > start:
                    bad_ids = sweep_rows(
                        self._featurizer,
                        pl_module,
                        self._data,
                        rows_out,
                        batch_size=self.batch_size,
                        collate=self._collate,
                        start=start,
                        stop=stop,
                        projection=self._projection(index),
                        factored=self._factored,
                        param_scales=scales,
                        storage_dtype=getattr(torch, self.grad_dtype),
                        progress=f"TrajectoryRecorder: checkpoint {index}" if self._progress(trainer) else None,
                    )
                # Durable before the clock stops: the sweep's time includes the write-behind and fsync
                # (in the background commit's instead, when training does not wait for them).
                if not behind:
                    shard_info = rows_out.finish() if ckpt is None else ckpt.finish_rows()
            finally:
                if ckpt is None:
                    rows_out.close()
        except BaseException as err:  # reported to every rank below, then re-raised
            failure = err
        report = {
            "rank": self._rank,
            "start": start,
            "stop": stop,
            "seconds": round(time.perf_counter() - t_rows, 4),
            "bad": bad_ids,
            "segment": shard_info,
            "error": None if failure is None else f"{type(failure).__name__}: {failure}",
        }
        reports = all_gather_objects(trainer, report)
        try:
            _raise_together(trainer, failure, "compute its gradient rows", index, reports=reports)
        except BaseException:
            if ckpt is not None:
                ckpt.abort()
            raise
        all_bad = sorted(i for r in reports for i in r["bad"])
        if all_bad and self.nonfinite == "raise":
            if ckpt is not None:
                ckpt.abort()
            half = (
                " (or beyond float16's range, with grad_dtype='float16': store them as 'bfloat16' or 'float32')"
                if self.grad_dtype == "float16"
                else ""
            )
            raise FloatingPointError(
                f"TrajectoryRecorder: {len(all_bad)} sample(s) have non-finite per-sample gradients{half} at step"
                f" {trainer.global_step} (ids {all_bad[:10]}{'...' if len(all_bad) > 10 else ''}), even after"
                " loss-scale back-off. Checkpoint not written; earlier checkpoints are intact. Use"
                " grad_precision='fp32', or nonfinite='skip' to store and flag them."
            )
        # 3. Rank 0 writes the weights and lists the checkpoint; everyone learns whether that worked.
        if ckpt is not None:
            meta = {
                "step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch if self._step_epoch is None else self._step_epoch),
                "lr": float(eta),
                "optimizer_steps": self._steps,
                "skipped_steps": self._skipped,
                "steps_per_epoch": self._steps_per_epoch(trainer),
                "param_etas": per_param if scales is not None else None,
                "param_scales": scales,
                "nonfinite": all_bad,
                "seconds": round(time.perf_counter() - t0, 4),
                "shards": [{k: r[k] for k in ("rank", "start", "stop", "seconds")} for r in reports],
            }
            if behind:
                future = self._commit_thread.executor().submit(ckpt.commit, None, meta)
                self._commit = (ckpt, future, index, int(trainer.global_step))
            else:
                try:
                    ckpt.commit(None, meta, shards=[r["segment"] for r in reports[1:]])
                except BaseException as err:
                    ckpt.abort()
                    failure = err
        _raise_together(trainer, failure, "list checkpoint", index)
        if self._rank != 0:
            self._writer.manifest["checkpoints"].append({"index": index, "step": int(trainer.global_step)})
        if all_bad:
            rank_zero_warn(
                f"TrajectoryRecorder: {len(all_bad)} sample(s) with non-finite gradients at step {trainer.global_step}"
                f" were stored as-is and are flagged in checkpoint {index}'s manifest entry (ids {all_bad[:10]});"
                " their scores will be NaN."
            )
        if self.verbose:
            rank_zero_info(
                f"TrajectoryRecorder: checkpoint {index} at step {trainer.global_step} (eta={eta:.4g},"
                f" {self._steps} steps, {self._skipped} skipped, {self._world} rank(s)) in"
                f" {time.perf_counter() - t0:.2f}s"
            )
        self._credit.clear()
        self._steps = 0
        self._skipped = 0

    def wait_for_commit(self) -> None:
        """Wait until the last recorded checkpoint is durable and listed (with ``commit_in_background``).

        Raises:
            OSError: the commit failed (a full disk: the message names the store and the space
                needed); that checkpoint is dropped, the ones listed before it are intact.
            StoreError: the checkpoint could not be listed for another reason.
        """
        if self._commit is None:
            return
        ckpt, future, index, step = self._commit
        err = future.exception()  # interrupted (Ctrl-C), the commit stays pending for on_exception's wait
        self._commit = None
        if err is None:
            return
        ckpt.abort()
        err.add_note(
            f"TrajectoryRecorder: raised while checkpoint {index} (step {step}) was being listed in the background;"
            " it was dropped, earlier checkpoints are intact."
        )
        raise err

    def _settle_quietly(self) -> None:
        # Fit is already failing: the pending checkpoint is listed if it can be, its own error only warned.
        try:
            self.wait_for_commit()
        except Exception as err:  # noqa: BLE001 - the fit's own exception is the one to raise (a Ctrl-C is not held)
            rank_zero_warn(f"TrajectoryRecorder: the last checkpoint could not be listed: {type(err).__name__}: {err}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._settle_quietly()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After a fit that ended well (on_train_end waited for the last commit; a failed fit waited in on_exception).
        self._commit_thread.shutdown()

    def _progress(self, trainer: pl.Trainer) -> bool:
        # On rank zero only, and off with the trainer's `enable_progress_bar=False`.
        return bool(trainer.is_global_zero and trainer.progress_bar_callback is not None)

    @override
    def state_dict(self) -> dict[str, Any]:
        # A Lightning checkpoint never counts a recorded checkpoint the store may still lose.
        self.wait_for_commit()
        if self._writer is not None:
            n_checkpoints = self._writer.n_checkpoints
        else:
            n_checkpoints = int(self._resumed.get("n_checkpoints", 0)) if self._resumed else 0
        return {
            "dirpath": str(self.store_path),
            "run_id": self._run_id,
            "last_step": self._last_step,
            "credit": dict(self._credit),
            "steps": self._steps,
            "skipped": self._skipped,
            "n_checkpoints": n_checkpoints,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self._credit = dict(state_dict.get("credit", {}))
        self._steps = int(state_dict.get("steps", 0))
        self._skipped = int(state_dict.get("skipped", 0))
        self._run_id = state_dict.get("run_id")
        self._resumed = {
            "run_id": self._run_id,
            "n_checkpoints": int(state_dict.get("n_checkpoints", 0)),
            "dirpath": state_dict.get("dirpath"),
        }


def _raise_together(
    trainer: pl.Trainer,
    failure: BaseException | None,
    what: str,
    index: int,
    reports: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Every rank raises if any rank failed (a collective: every rank must call it, failed or not).

    The rank that failed re-raises its own exception; the others raise a :class:`StoreError`
    naming it, so no rank is left waiting in a collective while another one has stopped.
    """
    if reports is None:
        reports = all_gather_objects(
            trainer,
            {"rank": trainer.global_rank, "error": None if failure is None else f"{type(failure).__name__}: {failure}"},
        )
    failed = [r for r in reports if r["error"] is not None]
    if failure is not None:
        raise failure
    if failed:
        detail = "; ".join(f"rank {r['rank']}: {r['error']}" for r in failed)
        raise StoreError(f"TrajectoryRecorder: checkpoint {index} aborted, another rank failed to {what} ({detail}).")


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return repr(value)


def _json_safe_hparams(pl_module: pl.LightningModule) -> dict[str, Any] | None:
    """``pl_module.hparams`` as JSON (``None`` unless ``save_hyperparameters()`` was used): ``type(pl_module)(**hparams)``.

    Values JSON cannot hold become their ``repr`` (e.g. a ``torch.dtype`` or a module).
    """
    hparams = getattr(pl_module, "hparams", None)
    if not hparams:
        return None
    # LightningCLI adds bookkeeping such as `_class_path`: not constructor arguments of the module.
    return {str(k): _json_safe(v) for k, v in dict(hparams).items() if not str(k).startswith("_")}
