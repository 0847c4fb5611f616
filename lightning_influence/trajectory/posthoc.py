"""A gradient store built after training, from saved Lightning checkpoints (post hoc).

Recording during ``fit`` (:class:`~lightning_influence.TrajectoryRecorder`) knows the learning
rate of every optimizer step. A set of saved checkpoints knows less: each holds the weights, the
``global_step`` and the optimizer's *current* learning rate. :func:`record_from_checkpoints`
therefore approximates the TracIn weight of checkpoint ``c`` as

    eta_c = lr_c * (step_c - step_{c-1}) / steps_per_epoch          (step_{-1} = 0)

with ``lr_c`` read from the checkpoint's optimizer state. For a constant learning rate this is
exactly what the recorder stores (``lr x epochs``); under a schedule it is a right-endpoint
Riemann sum of the learning rate over the interval, and skipped mixed-precision steps are counted
as taken. Gradients, projection, noise keys and the store format are the recorder's, so
:class:`~lightning_influence.InfluenceAnalysis` reads the result unchanged.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_influence.data.batches import num_samples
from lightning_influence.gradients.engine import PerSampleGradientEngine
from lightning_influence.gradients.factored import EngineName, describe_engine, resolve_engine
from lightning_influence.gradients.featurizer import GradientFeaturizer
from lightning_influence.gradients.losses import PerSampleLoss, resolve_loss
from lightning_influence.gradients.parameters import module_state, resolve_parameter_names
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection
from lightning_influence.trajectory.store import GradientStore, GradientStoreWriter, header_for
from lightning_influence.trajectory.sweep import factor_layout, learning_rate_scales, probe_rows, sweep_rows
from lightning_influence.utils.arguments import check_count
from lightning_influence.utils.modes import module_device

__all__ = ["checkpoint_learning_rates", "record_from_checkpoints"]


def _load(path: str | os.PathLike) -> dict[str, Any]:
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'); pass the .ckpt files.")
    return ckpt


def _json_or_none(value: Any) -> Any:
    """``value`` if it survives JSON (the manifest is JSON), else ``None``."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def checkpoint_learning_rates(checkpoint: dict[str, Any], path: str = "checkpoint") -> list[float]:
    """The learning rate of every param group of the first optimizer saved in a Lightning checkpoint."""
    states = checkpoint.get("optimizer_states") or []
    if not states:
        raise ValueError(
            f"{path!r} has no optimizer state, so its learning rate is unknown; save checkpoints with"
            " ModelCheckpoint(save_weights_only=False) (the default)."
        )
    if len(states) > 1:
        # Each optimizer steps its own parameters and Lightning's global_step counts all their steps: the
        # checkpoints alone cannot say which parameters moved how often at which rate.
        raise ValueError(
            f"{path!r} holds the state of {len(states)} optimizers; record_from_checkpoints reads one optimizer's"
            " learning rates. Record during fit with TrajectoryRecorder, which credits every optimizer's steps."
        )
    return [float(g["lr"]) for g in states[0]["param_groups"]]


def _model_from(model: nn.Module | type[pl.LightningModule], first: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, type) and issubclass(model, pl.LightningModule):
        return model.load_from_checkpoint(first, map_location="cpu")
    raise TypeError(f"`model` must be a LightningModule instance or class, got {model!r}.")


def _data_from(data: Any) -> tuple[Any, Callable | None, int | None]:
    """(dataset to record, its collate function, optimizer steps per epoch if known)."""
    if isinstance(data, pl.LightningDataModule):
        data.setup("fit")
        data = data.train_dataloader()
    if isinstance(data, DataLoader):
        return data.dataset, data.collate_fn, len(data)
    return data, None, None


def _param_group_names(model: nn.Module, n_groups: int) -> list[list[str]] | None:
    """Parameter names of each param group, from the model's own ``configure_optimizers``."""
    if n_groups == 1:
        return None
    configured = model.configure_optimizers()  # type: ignore[operator]
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    if isinstance(configured, (list, tuple)):
        configured = configured[0]
        if isinstance(configured, (list, tuple)):
            configured = configured[0]
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"] if id(p) in names] for g in configured.param_groups]
    if len(groups) != n_groups:
        raise ValueError(
            f"The checkpoint's optimizer has {n_groups} param groups but the model's configure_optimizers()"
            f" builds {len(groups)}."
        )
    return groups


def record_from_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    dirpath: str | os.PathLike,
    model: nn.Module | type[pl.LightningModule],
    data: Any,
    *,
    train_loss: PerSampleLoss | None = None,
    params: Sequence[str] | str | None = None,
    projection_dim: int | None = None,
    projection_kind: Literal["sjlt", "rademacher", "gaussian", "kronecker"] = "sjlt",
    grad_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    steps_per_epoch: int | None = None,
    accumulate_grad_batches: int = 1,
    batch_size: int = 64,
    chunk_size: int | None = None,
    engine: EngineName | PerSampleGradientEngine | None = "auto",
    factored_storage: bool = False,
    device: torch.device | str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> GradientStore:
    """Build a gradient store from saved Lightning checkpoints, as if the recorder had run at their steps.

    For each checkpoint (sorted by ``global_step``) the model is loaded with its weights and the
    per-sample gradients of every training sample are stored with the interval's learning-rate
    credit ``eta_c = lr_c * (step_c - step_{c-1}) / steps_per_epoch``, ``lr_c`` read from the
    checkpoint's optimizer state. This is an approximation of recording during training: exact
    for a constant learning rate, a right-endpoint sum under a schedule (see the module docstring).

    Args:
        checkpoints: Lightning ``.ckpt`` files of one run (with optimizer state).
        dirpath: directory of the new gradient store.
        model: a LightningModule instance with the run's architecture, or its class (then built with
            ``load_from_checkpoint`` from the first checkpoint's hyperparameters).
        data: the training data: a LightningDataModule (its ``train_dataloader()``), a DataLoader, or
            a Dataset; samples are recorded in dataset order (a sample's id is its position).
        train_loss: ``train_loss(module, batch) -> Tensor[B]`` (default: ``model.per_sample_loss``).
        params: parameter names or module prefixes to track (default: all trainable).
        projection_dim: ``None`` for exact gradients, or the width of a seeded random projection.
        projection_kind: ``"sjlt"``, ``"rademacher"``, ``"gaussian"`` or ``"kronecker"`` (per layer
            from the factored engine's factors), as for :class:`~lightning_influence.TrajectoryRecorder`.
        grad_dtype: storage dtype of the gradient rows.
        steps_per_epoch: optimizer steps per epoch (default: the training DataLoader's length divided
            by ``accumulate_grad_batches``; required when ``data`` is a Dataset).
        accumulate_grad_batches: the trainer's gradient accumulation.
        batch_size: samples per gradient batch.
        chunk_size: samples per ``vmap`` chunk (of the vmap engine, or of the factored engine's fallback).
        engine: the per-sample gradient engine, as for :class:`~lightning_influence.TrajectoryRecorder`:
            ``"auto"`` (default), ``"factored"``, ``"vmap"`` (also ``None``), ``"loop"`` or an engine
            instance. The rows do not depend on it; the manifest records the engine and its rules.
        factored_storage: exact factored storage, as for :class:`~lightning_influence.TrajectoryRecorder`
            (layers whose factors are smaller than their gradient are stored as factors; exact rows only).
        device: where to compute (default: the model's device).
        seed: projection and noise seed (the recorder's ``seed``).
        overwrite: replace an existing store at ``dirpath``.
        progress: show a progress bar over checkpoints.

    Returns:
        The new :class:`~lightning_influence.GradientStore`.

    Raises:
        ValueError: on an empty checkpoint list, a checkpoint without optimizer state or with several
            optimizers, two checkpoints at the same step, unknown ``steps_per_epoch``, a batch size or
            accumulation below one, or ``factored_storage`` with a ``projection_dim``.
        StoreError: ``dirpath`` already holds a gradient store (and ``overwrite`` is off), or files the
            store did not write.
    """
    if factored_storage and projection_dim is not None:
        raise ValueError(
            "`factored_storage=True` stores exact gradients as layer factors; it cannot be combined with"
            f" `projection_dim`={projection_dim}. Use one of them."
        )
    for name, value in (("batch_size", batch_size), ("accumulate_grad_batches", accumulate_grad_batches)):
        check_count(f"`{name}`", value)
    paths = [str(p) for p in checkpoints]
    if not paths:
        raise ValueError("`checkpoints` is empty: pass at least one Lightning .ckpt file.")
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"`checkpoints` entry {p!r} does not exist.")
    loaded = sorted(((_load(p), p) for p in paths), key=lambda cp: int(cp[0].get("global_step", 0)))
    steps = [int(c.get("global_step", 0)) for c, _ in loaded]
    if len(set(steps)) != len(steps):
        raise ValueError(f"`checkpoints` has several checkpoints at the same global_step: {steps}.")
    module = _model_from(model, loaded[0][1])
    # Every checkpoint's learning rates and the parameters of each group, before anything is written: a refusal
    # here leaves no store behind (one would block the retry).
    all_lrs = [checkpoint_learning_rates(c, p) for c, p in loaded]
    for (_, p), lrs in zip(loaded, all_lrs):
        if len(lrs) != len(all_lrs[0]):
            raise ValueError(
                f"{p!r} has {len(lrs)} param groups but {loaded[0][1]!r} has {len(all_lrs[0])}; `checkpoints` must"
                " come from one run."
            )
    group_names = _param_group_names(module, len(all_lrs[0]))
    dataset, collate, loader_len = _data_from(data)
    if steps_per_epoch is None:
        if loader_len is None:
            raise ValueError(
                "`steps_per_epoch` is unknown for a Dataset; pass it, or pass the DataLoader or DataModule."
            )
        steps_per_epoch = max(1, math.ceil(loader_len / accumulate_grad_batches))
    check_count("`steps_per_epoch`", steps_per_epoch)
    loss_fn = resolve_loss(train_loss, module, argname="train_loss")
    names = resolve_parameter_names(module, params)
    named = dict(module.named_parameters())
    dev = torch.device(device) if device is not None else module_device(module)
    module.to(dev)
    spec = ProjectionSpec(dim=projection_dim, seed=seed, kind=projection_kind) if projection_dim else None
    precision = GradientPrecision()
    featurizer = GradientFeaturizer(
        module,
        loss_fn,
        names,
        engine=resolve_engine(engine, module, names, chunk_size),
        precision=precision,
        argname="train_loss",
        noise_seed=seed,
    )
    # At the first checkpoint's weights: an unusable loss fails before anything is written, and the
    # engine's checks run once, so the manifest records the rules it will use.
    module.load_state_dict(loaded[0][0]["state_dict"])
    shapes = {n: tuple(named[n].shape) for n in names}
    first_projection = RandomProjection.for_shapes(spec, shapes, checkpoint=0) if spec is not None else None
    probe_rows(
        featurizer,
        module,
        dataset,
        collate=collate,
        projection=first_projection,
        argname="data",
        loop_if_needed=engine == "auto",
    )
    layout: dict[str, dict[str, Any]] = {}
    if factored_storage:
        layout = factor_layout(featurizer, module, dataset, collate=collate, argname="data")
        if not layout:
            warnings.warn(
                "record_from_checkpoints: `factored_storage=True` but no tracked parameter has layer factors smaller"
                f" than its gradient (engine {featurizer.engine.name!r}); every gradient is stored densely.",
                stacklevel=2,
            )
    hparams = getattr(module, "hparams", None)
    header = header_for(
        n_samples=num_samples(dataset, "data"),
        param_names=names,
        param_shapes={n: list(named[n].shape) for n in names},
        grad_dtype=grad_dtype,
        projection=spec,
        noise_seed=seed,
        precision=precision,
        extra={
            "train_loss": getattr(loss_fn, "__qualname__", repr(loss_fn)),
            "model": type(module).__qualname__,
            "model_class": f"{type(module).__module__}.{type(module).__qualname__}",
            "hparams": _json_or_none(dict(hparams)) if hparams else None,
            **describe_engine(featurizer.engine, module, names, loss_fn),
            "posthoc": {"checkpoints": [p for _, p in loaded], "steps_per_epoch": steps_per_epoch},
        },
        factored=layout or None,
    )
    # A new run: a store already at `dirpath` is refused (unless `overwrite`), never appended to.
    writer = GradientStoreWriter(dirpath, header, overwrite=overwrite, new_run=True)
    previous = 0
    items = tqdm(loaded, desc="recording checkpoints", leave=False) if progress else loaded
    for (ckpt, path), lrs in zip(items, all_lrs):
        module.load_state_dict(ckpt["state_dict"])
        step = int(ckpt.get("global_step", 0))
        n_steps = step - previous
        if group_names is None:
            per_param = {n: lrs[0] * n_steps / steps_per_epoch for n in names}
        else:
            per_param = {n: lr * n_steps / steps_per_epoch for lr, group in zip(lrs, group_names) for n in group}
            per_param = {n: per_param.get(n, 0.0) for n in names}
        eta, scales = learning_rate_scales(per_param)
        cw = writer.begin_checkpoint()
        projection = None
        if spec is not None:
            projection = RandomProjection.for_shapes(spec, shapes, checkpoint=cw.index)
        try:
            bad = sweep_rows(
                featurizer,
                module,
                dataset,
                cw,
                batch_size=batch_size,
                collate=collate,
                projection=projection,
                factored=list(layout),
                param_scales=scales,
                argname="data",
                storage_dtype=getattr(torch, grad_dtype),
            )
            if bad:
                raise FloatingPointError(
                    f"Non-finite per-sample gradients for ids {bad[:10]} at {path!r}; this checkpoint was not"
                    " written (earlier ones are kept)."
                )
            meta = {
                "step": step,
                "epoch": int(ckpt.get("epoch", 0)),
                "lr": float(eta),
                "optimizer_steps": n_steps,
                "skipped_steps": 0,
                "steps_per_epoch": float(steps_per_epoch),
                "param_etas": per_param if scales is not None else None,
                "param_scales": scales,
                "nonfinite": [],
                "source": path,
            }
            cw.commit(module_state(module, upcast=False), meta)
        except BaseException:
            cw.abort()
            raise
        previous = step
    return GradientStore(dirpath)
