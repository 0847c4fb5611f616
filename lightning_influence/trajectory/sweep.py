"""One recording sweep: a checkpoint's per-sample gradient rows over the dataset, written as they come.

Shared by :class:`~lightning_influence.TrajectoryRecorder` (during ``fit``, each rank its shard) and
:func:`~lightning_influence.record_from_checkpoints` (after training), so both store the same rows
for the same weights and weight a checkpoint's parameter groups the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from pytorch_lightning.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_influence.data.batches import iterate_batches, num_samples, subset
from lightning_influence.errors import EngineUnsupportedError
from lightning_influence.gradients.engine import LayerFactors
from lightning_influence.gradients.factored import loop_fallbacks
from lightning_influence.gradients.featurizer import GradientFeaturizer, cast_state
from lightning_influence.gradients.noise import NoiseStream
from lightning_influence.gradients.parameters import module_state
from lightning_influence.gradients.projection import RandomProjection
from lightning_influence.gradients.split import SplitRows, bias_partners, stores_smaller
from lightning_influence.utils.modes import isolated, module_device

__all__ = ["RowSink", "factor_layout", "learning_rate_scales", "probe_rows", "sweep_rows"]


class RowSink(Protocol):
    """Where a sweep writes: a checkpoint writer, or one rank's shard of it."""

    def write_rows(self, ids: Tensor, rows: Tensor | SplitRows) -> None: ...


def learning_rate_scales(per_param: Mapping[str, float]) -> tuple[float, dict[str, float] | None]:
    """A checkpoint's TracIn weight ``eta`` and the row scales that fold per-parameter learning rates into it.

    With parameter groups at different learning rates the checkpoint's TracIn term is
    ``sum_p eta_p <g_p, g'_p>``. Rows hold ``sqrt(eta_p / eta) g_p`` with ``eta = max_p eta_p``, so that
    ``eta <r, r'>`` is that sum; the query side applies the same scales.

    Args:
        per_param: parameter name -> its learning rate summed over the steps the checkpoint stands for.

    Returns:
        ``(eta, scales)``; ``scales`` is ``None`` when every parameter has the same rate (or none learned).

    Example:
        >>> learning_rate_scales({"w": 0.1, "b": 0.1})
        (0.1, None)
        >>> learning_rate_scales({"w": 0.2, "b": 0.05})
        (0.2, {'w': 1.0, 'b': 0.5})
    """
    if not per_param:
        raise ValueError("`per_param` is empty: a checkpoint needs the learning rate of at least one parameter.")
    eta = max(per_param.values())
    if eta <= 0.0 or len(set(per_param.values())) == 1:
        return eta, None
    return eta, {n: math.sqrt(v / eta) for n, v in per_param.items()}


def sweep_rows(
    featurizer: GradientFeaturizer,
    module: nn.Module,
    data: Any,
    out: RowSink,
    *,
    batch_size: int,
    collate: Callable[[list[Any]], Any] | None = None,
    start: int = 0,
    stop: int | None = None,
    projection: RandomProjection | None = None,
    factored: Sequence[str] = (),
    param_scales: Mapping[str, float] | None = None,
    progress: str | None = None,
    argname: str = "dataset",
    storage_dtype: torch.dtype = torch.float32,
) -> list[int]:
    """Write the training rows of samples ``[start, stop)`` of ``data``, at ``module``'s current weights, in order.

    The module's mode, RNG state and gradients are left as they were (see
    :func:`~lightning_influence.utils.modes.isolated`); the weights are read once, cast to the
    featurizer's precision. Rows of samples whose gradients stay non-finite (after the loss-scale
    back-off) are written as they are and their ids returned: the caller refuses or flags them.

    Args:
        featurizer: computes the rows (the training loss, tracked parameters, engine, precision).
        module: the model at the checkpoint's weights.
        data: the recorded dataset (rows are keyed by position in it).
        out: receives ``write_rows(ids, rows)`` once per batch.
        batch_size: samples per gradient batch.
        collate: how samples become a batch (default: the DataLoader's default collate).
        start, stop: the samples to sweep (default: all).
        projection: the checkpoint's projection (``None``: exact rows).
        factored: parameters kept as factors (exact factored storage; needs ``projection=None``).
        param_scales: per-parameter row scales (:func:`learning_rate_scales`); factors are written
            without them, readers apply the checkpoint's.
        progress: a progress bar's description (``None``: no bar).
        argname: the argument ``data`` came from, for error messages.
        storage_dtype: the dtype ``out`` stores rows in: with ``torch.float16``, rows that overflow it
            (finite in fp32, ``inf`` once stored) count as non-finite too.

    Returns:
        The ids of samples with non-finite rows, ascending.
    """
    if factored and projection is not None:
        raise ValueError("`factored` storage keeps exact gradients; it cannot be combined with a `projection`.")
    stop = num_samples(data, argname) if stop is None else stop
    if factored and param_scales is not None:
        # Factors carry no per-parameter scale: a bias then shares its weight's g whatever their groups.
        kept = set(factored)
        param_scales = {n: s for n, s in param_scales.items() if n not in kept}
    bad: list[int] = []
    with isolated(module):
        state = cast_state(module_state(module, upcast=False), featurizer.precision, module_device(module))
        batches = iterate_batches(subset(data, start, stop, argname), batch_size, collate, name=argname)
        if progress is not None:
            # Only then: even a disabled tqdm takes tqdm's process-shared lock, which a process
            # killed while holding it (SIGKILL during a sweep) never releases for its relatives.
            batches = tqdm(batches, total=math.ceil((stop - start) / batch_size), desc=progress, leave=False)
        for ids, batch in batches:
            ids = ids + start
            batch = move_data_to_device(batch, module_device(module))
            rows: Tensor | SplitRows
            if factored:
                rows, nonfinite = featurizer.split_rows(
                    batch, ids, state, factored=factored, stream=NoiseStream.TRAIN, param_scales=param_scales
                )
            else:
                rows, nonfinite = featurizer.rows(
                    batch, ids, state, projection=projection, stream=NoiseStream.TRAIN, param_scales=param_scales
                )
            if storage_dtype == torch.float16:
                nonfinite = nonfinite | _overflows(rows, storage_dtype)
            if nonfinite.any():
                bad.extend(ids[nonfinite.cpu()].tolist())
            out.write_rows(ids, rows)
    return bad


def _overflows(rows: Tensor | SplitRows, dtype: torch.dtype) -> Tensor:
    """``[B]``: whether a sample's rows (or factors) hold a value that becomes ``inf`` in ``dtype``."""
    limit = _overflow_bound(dtype)
    tensors = rows.tensors() if isinstance(rows, SplitRows) else [rows]
    out = torch.zeros(len(rows), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t.numel():
            out |= torch.linalg.vector_norm(t.detach().flatten(1), float("inf"), dim=1) >= limit  # one reduction
    return out


def _overflow_bound(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to ``inf`` in the float ``dtype``: its largest value plus half a step there.

    Example:
        >>> _overflow_bound(torch.float16)  # 65504 + 16: 65510 is stored as 65504, 65520 as inf
        65520.0
        >>> torch.tensor([65519.0, 65520.0]).half().isinf().tolist()
        [False, True]
    """
    info = torch.finfo(dtype)
    return float(info.max) + 0.5 * float(info.eps) * 2.0 ** math.floor(math.log2(float(info.max)))


def _first_batch(
    featurizer: GradientFeaturizer,
    module: nn.Module,
    data: Any,
    collate: Callable[[list[Any]], Any] | None,
    argname: str,
) -> tuple[Tensor, Any, dict[str, Tensor]]:
    # Two samples: enough for the engine's checks of how rows belong to samples.
    ids, batch = next(iterate_batches(data, 2, collate, name=argname))
    state = cast_state(module_state(module, upcast=False), featurizer.precision, module_device(module))
    return ids, move_data_to_device(batch, module_device(module)), state


def probe_rows(
    featurizer: GradientFeaturizer,
    module: nn.Module,
    data: Any,
    *,
    collate: Callable[[list[Any]], Any] | None = None,
    projection: RandomProjection | None = None,
    argname: str = "dataset",
    loop_if_needed: bool = False,
) -> Tensor:
    """The rows of the first two samples: fails early on an unusable loss, and runs the engine's checks once.

    After it, :func:`~lightning_influence.gradients.factored.describe_engine` with the featurizer's
    loss describes the engine as it will run (the factored engine's checked plan).

    Args:
        loop_if_needed: when the engine cannot differentiate the model although its loss runs
            (:class:`~lightning_influence.errors.EngineUnsupportedError`: an ``nn.GRU`` under ``vmap``,
            activation checkpointing), replace ``featurizer.engine`` by the first of
            :func:`~lightning_influence.gradients.factored.loop_fallbacks` that can, and warn
            (``engine="auto"``).

    Raises:
        ValueError: if the rows do not have the featurizer's width.
        EngineUnsupportedError: if the engine cannot differentiate the model (and ``loop_if_needed``
            is off, or no fallback can).
    """
    with isolated(module):
        ids, batch, state = _first_batch(featurizer, module, data, collate, argname)
        candidates = loop_fallbacks(featurizer.engine) if loop_if_needed else []
        first: EngineUnsupportedError | None = None
        while True:
            try:
                rows, _ = featurizer.rows(batch, ids, state, projection=projection)
                break
            except EngineUnsupportedError as err:
                if not candidates:
                    raise
                first = first or err
                featurizer.engine = candidates.pop(0)
    if first is not None:
        rank_zero_warn(
            f"engine='auto': {first.reason}. Recording with {featurizer.engine!r} instead: exact, but one backward"
            " per sample for the parameters it loops over. Choose an engine explicitly to silence this."
        )
    if rows.shape != (len(ids), featurizer.dim(projection)):
        raise ValueError(f"`train_loss` produced gradient rows of shape {tuple(rows.shape)} for {len(ids)} samples.")
    return rows


def factor_layout(
    featurizer: GradientFeaturizer,
    module: nn.Module,
    data: Any,
    *,
    collate: Callable[[list[Any]], Any] | None = None,
    argname: str = "dataset",
) -> dict[str, dict[str, Any]]:
    """The parameters exact factored storage keeps as factors, with their positions and sizes (the header's ``factored``).

    A parameter is kept as its layer's inputs and output gradients when those are smaller than its
    gradient (:func:`~lightning_influence.gradients.split.stores_smaller`); such a layer's bias is
    kept as nothing but a reference (its gradient is ``g`` summed over positions). Measured on the
    first two samples, so the positions must not change between batches. Empty when no parameter
    qualifies (an engine without factors, or only small layers).
    """
    with isolated(module):
        ids, batch, state = _first_batch(featurizer, module, data, collate, argname)
        split, _ = featurizer.split_rows(batch, ids, state, factored=featurizer.param_names)
    layout: dict[str, dict[str, Any]] = {}
    for name in featurizer.param_names:
        f = split.factors[name]
        if stores_smaller(f):
            assert isinstance(f, LayerFactors) and f.inputs is not None
            layout[name] = {
                "positions": int(f.output_grads.shape[1]),
                "inputs": int(f.inputs.shape[2]),
                "outputs": int(f.output_grads.shape[2]),
                "groups": int(f.groups),
                "shape": [int(x) for x in f.shape],
            }
    for bias, weight in bias_partners(split).items():
        if weight in layout:
            layout[bias] = {"bias_of": weight, "shape": [int(x) for x in split.factors[bias].shape]}
    return {n: layout[n] for n in featurizer.param_names if n in layout}
