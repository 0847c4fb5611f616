"""Rows of the gradient matrix: per-sample gradients from an engine, flattened or randomly projected.

This is the one place where the recorder (training side), the analysis (test side), influence
functions and the fragility estimates turn a batch into gradient rows, so every side shares
numerics, noise keys, loss scaling and projection. Which engine computes the gradients is a
constructor argument (:class:`~lightning_influence.gradients.engine.PerSampleGradientEngine`).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_influence.gradients.engine import (
    LayerFactors,
    PerSampleGradientEngine,
    PerSampleGradients,
    dense_gradient,
)
from lightning_influence.gradients.losses import PerSampleLoss
from lightning_influence.gradients.noise import NoiseStream
from lightning_influence.gradients.precision import GradientPrecision
from lightning_influence.gradients.projection import RandomProjection
from lightning_influence.gradients.split import SplitRows
from lightning_influence.gradients.vmap import VmapEngine

__all__ = ["GradientFeaturizer", "cast_state"]


def cast_state(state: Mapping[str, Tensor], precision: GradientPrecision, device: torch.device) -> dict[str, Tensor]:
    """Weights and buffers as the gradient computation wants them (fp32 copies, or the half dtype)."""
    target = torch.float32 if precision.upcast_weights else precision.torch_dtype
    out = {}
    for k, v in state.items():
        v = v.detach().to(device)
        if v.is_floating_point() and v.dtype != torch.float64:
            v = v.to(target)
        out[k] = v
    return out


def _cast_inputs(batch: Any, precision: GradientPrecision, weight_dtype: torch.dtype) -> Any:
    if precision.mode == "mixed":
        return batch
    if precision.mode == "fp32":
        # fp32 means "at least fp32": a float64 model (influence functions) keeps float64 inputs.
        target = torch.float64 if weight_dtype == torch.float64 else torch.float32
    else:
        target = precision.torch_dtype
    return tree_map(lambda t: t.to(target) if isinstance(t, Tensor) and t.is_floating_point() else t, batch)


#: Row matrices at least this large (bytes) are allocated on transparent huge pages on CPU: glibc's
#: largest dynamic mmap threshold. Smaller blocks glibc recycles from its heap (no fresh pages);
#: larger ones are always fresh mappings.
HUGE_ROWS_BYTES = 32 << 20


def empty_rows(batch: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``[batch, width]`` matrix; on CPU, a large one on transparent huge pages.

    A fresh row matrix is tens of MB (``B x D`` fp32) and every one is new (callers keep the rows),
    so its first write page-faults once per 4 KiB page: for a 57 MB matrix that costs about ten
    times the write itself. Anonymous memory advised ``MADV_HUGEPAGE`` faults once per 2 MiB. The
    tensor keeps the mapping alive and behaves as any CPU tensor (it cannot be resized in place).
    Falls back to :func:`torch.empty` off Linux, off CPU and for small matrices.

    Example:
        >>> import torch
        >>> empty_rows(2, 3, torch.float32, torch.device("cpu")).shape
        torch.Size([2, 3])
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = batch * width * itemsize
    if (
        device.type != "cpu"
        or nbytes < HUGE_ROWS_BYTES
        or not hasattr(mmap, "MADV_HUGEPAGE")
        or not hasattr(mmap, "MAP_ANONYMOUS")
    ):
        return torch.empty(batch, width, dtype=dtype, device=device)
    # private: a shared anonymous mapping is shmem, which ignores the advice
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP disabled in this kernel: still a valid (small-page) buffer
        pass
    return torch.frombuffer(buf, dtype=dtype, count=batch * width).view(batch, width)


def nonfinite_rows(rows: Tensor) -> Tensor:
    """``[B]`` bool: rows holding inf or NaN.

    A row sum is non-finite whenever an entry is (inf and NaN propagate), so only rows whose sum
    is non-finite are checked entry by entry (their sum may also overflow from finite entries):
    one pass over the matrix instead of a ``[B, D]`` boolean temporary.

    Example:
        >>> import torch
        >>> nonfinite_rows(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3e38, 3e38]])).tolist()
        [False, True, False]
    """
    bad = ~torch.isfinite(rows.sum(dim=1))
    if bad.any():
        idx = bad.nonzero().squeeze(1)
        bad[idx] = ~torch.isfinite(rows[idx]).all(dim=1)
    return bad


def _take(batch: Any, index: Tensor) -> Any:
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) else t, batch)


class GradientFeaturizer:
    """Per-sample gradient rows ``[B, dim]`` of ``loss_fn`` for given weights.

    .. math::
        r_i = P\\,\\big(s_p\\,\\nabla_{\\theta_p} \\ell(\\theta, z_i)\\big)_{p \\in \\text{params}}

    with ``P`` the optional random projection (passed per call: a projection belongs to a
    checkpoint) and ``s_p`` optional per-parameter scales (per-param-group learning rates).

    Args:
        module: the model (a template for ``functional_call``; never modified).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``.
        param_names: tracked parameters, in row layout order.
        engine: the per-sample gradient engine (default :class:`~lightning_influence.gradients.vmap.VmapEngine`).
        precision: numerics (see :class:`~lightning_influence.gradients.precision.GradientPrecision`).
        noise_seed: seed of the keyed reparameterisation noise.
        out_dtype: dtype of exact rows (projected rows are fp32); ``None`` keeps the engine's
            (float64 for a float64 model).
        argname: name of the loss argument in error messages.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: PerSampleLoss,
        param_names: Sequence[str],
        *,
        engine: PerSampleGradientEngine | None = None,
        precision: GradientPrecision | None = None,
        noise_seed: int = 0,
        out_dtype: torch.dtype | None = torch.float32,
        argname: str = "loss_fn",
    ) -> None:
        self.module = module
        self.loss_fn = loss_fn
        self.param_names = list(param_names)
        self.engine: PerSampleGradientEngine = engine if engine is not None else VmapEngine()
        if not isinstance(self.engine, PerSampleGradientEngine):
            raise TypeError(
                f"`engine` must implement lightning_influence.gradients.PerSampleGradientEngine (a `name` and a"
                f" `gradients(...)` method), got {type(self.engine).__name__}."
            )
        self.precision = precision or GradientPrecision()
        self.noise_seed = noise_seed
        self.out_dtype = out_dtype
        self.argname = argname
        numels = dict((n, p.numel()) for n, p in module.named_parameters())
        self._numels = {n: int(numels[n]) for n in self.param_names}
        self.input_dim = sum(numels[n] for n in self.param_names)

    def dim(self, projection: RandomProjection | None = None) -> int:
        """Width of the rows :meth:`rows` returns with ``projection``."""
        return projection.dim if projection is not None else self.input_dim

    def rows(
        self,
        batch: Any,
        ids: Tensor,
        state: Mapping[str, Tensor],
        *,
        projection: RandomProjection | None = None,
        stream: int = NoiseStream.TRAIN,
        param_scales: Mapping[str, float] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Gradient rows of one batch.

        Args:
            batch: a collated batch already on the state's device.
            ids: dataset positions ``[B]`` (key the noise).
            state: all weights and buffers, already cast with :func:`cast_state`.
            projection: the random projection of this checkpoint, or ``None`` for exact rows.
            stream: noise stream.
            param_scales: per-parameter multipliers.

        Returns:
            ``rows`` ``[B, dim]`` and ``nonfinite`` ``[B]`` bool (rows containing inf/NaN after
            every loss-scale back-off; left as computed, never zeroed).
        """
        batch = _cast_inputs(batch, self.precision, state[self.param_names[0]].dtype)
        device = state[self.param_names[0]].device
        scale = self.precision.init_loss_scale if self.precision.loss_scaling else 1.0
        rows = self._rows_at_scale(batch, ids, state, projection, stream, param_scales, scale, device)
        bad = nonfinite_rows(rows)
        while bad.any() and scale > 1.0:
            scale /= 2.0
            idx = bad.nonzero().squeeze(1)
            redo = self._rows_at_scale(
                _take(batch, idx), ids[idx.cpu()], state, projection, stream, param_scales, scale, device
            )
            rows[idx] = redo
            bad = nonfinite_rows(rows)
        return rows, bad

    def split_rows(
        self,
        batch: Any,
        ids: Tensor,
        state: Mapping[str, Tensor],
        *,
        factored: Collection[str],
        stream: int = NoiseStream.TRAIN,
        param_scales: Mapping[str, float] | None = None,
    ) -> tuple[SplitRows, Tensor]:
        """Exact gradient rows of one batch in split form: a dense part plus factors.

        The same rows as :meth:`rows` without a projection (same noise keys, parameter scales and
        fp16 loss-scale back-off), but every parameter of ``factored`` keeps its
        :class:`~lightning_influence.gradients.engine.LayerFactors` ``a`` ``[B, S, d_in]`` and ``g``
        ``[B, S, d_out]``, with ``s_p / loss_scale`` folded into ``g`` (or a dense ``[B, *shape]``
        block where the engine returned no factors); the other parameters fill ``dense``
        ``[B, D_dense]`` in ``param_names`` order. ``split.materialize()`` equals ``rows(...)[0]``.

        Args:
            batch, ids, state, stream, param_scales: as for :meth:`rows`.
            factored: the parameters to keep as factors (a subset of ``param_names``).

        Returns:
            :class:`~lightning_influence.gradients.split.SplitRows` and ``nonfinite`` ``[B]`` bool
            (rows with inf/NaN in any part after every back-off; left as computed).
        """
        wanted = set(factored)
        unknown = sorted(wanted - set(self.param_names))
        if unknown:
            raise ValueError(f"`factored` names {unknown[:6]} that are not tracked parameters {self.param_names[:6]}.")
        batch = _cast_inputs(batch, self.precision, state[self.param_names[0]].dtype)
        device = state[self.param_names[0]].device
        scale = self.precision.init_loss_scale if self.precision.loss_scaling else 1.0
        grads = self._gradients(batch, ids, state, stream, scale, device)
        split = self._split(grads, wanted, param_scales, scale)
        bad = split.nonfinite()
        while bad.any() and scale > 1.0:
            scale /= 2.0
            idx = bad.nonzero().squeeze(1)
            grads = self._gradients(_take(batch, idx), ids[idx.cpu()], state, stream, scale, device)
            split = _replace_rows(split, idx, self._split(grads, wanted, param_scales, scale))
            bad = split.nonfinite()
        return split, bad

    def _split(
        self, grads: PerSampleGradients, factored: set[str], param_scales: Mapping[str, float] | None, scale: float
    ) -> SplitRows:
        dense_names = [n for n in self.param_names if n not in factored]
        dense = self._flat_rows(grads, param_scales, scale, dense_names)
        dtype = dense.dtype
        factors: dict[str, Tensor | LayerFactors] = {}
        scaled: dict[tuple[int, float], Tensor] = {}
        for name in self.param_names:
            if name not in factored:
                continue
            block = grads[name]
            mult = (1.0 if param_scales is None else float(param_scales.get(name, 1.0))) / scale
            if isinstance(block, LayerFactors):
                # A bias and its weight share the engine's g; with the same scale they share the scaled
                # one too (stored once, scored with the weight's Gram matrices).
                key = (id(block.output_grads), mult)
                if key not in scaled:
                    g = block.output_grads.to(dtype)
                    scaled[key] = g * mult if mult != 1.0 else g
                g = scaled[key]
                a = None if block.inputs is None else block.inputs.to(dtype)
                factors[name] = LayerFactors(a, g, block.shape, block.groups)
            else:
                d = block.to(dtype)
                factors[name] = d * mult if mult != 1.0 else d
        return SplitRows(dense, factors, tuple(self.param_names), tuple(self._numels[n] for n in self.param_names))

    def _gradients(
        self,
        batch: Any,
        ids: Tensor,
        state: Mapping[str, Tensor],
        stream: int,
        scale: float,
        device: torch.device,
    ) -> PerSampleGradients:
        params = {n: state[n] for n in self.param_names}
        with self.precision.context(device):
            return self.engine.gradients(
                self.module,
                self.loss_fn,
                batch,
                params,
                state=state,
                sample_ids=ids.to(device=device, dtype=torch.int64),
                noise_seed=self.noise_seed,
                noise_stream=stream,
                loss_scale=scale,
                argname=self.argname,
            )

    def _rows_at_scale(
        self,
        batch: Any,
        ids: Tensor,
        state: Mapping[str, Tensor],
        projection: RandomProjection | None,
        stream: int,
        param_scales: Mapping[str, float] | None,
        scale: float,
        device: torch.device,
    ) -> Tensor:
        grads = self._gradients(batch, ids, state, stream, scale, device)
        if projection is not None:
            if scale != 1.0:
                param_scales = {n: (param_scales or {}).get(n, 1.0) / scale for n in self.param_names}
            return projection.project(grads, param_scales)
        return self._flat_rows(grads, param_scales, scale)

    def _flat_rows(
        self,
        grads: PerSampleGradients,
        param_scales: Mapping[str, float] | None,
        scale: float,
        names: Sequence[str] | None = None,
    ) -> Tensor:
        # Each block is written straight into its columns of one preallocated [B, D] matrix (no
        # per-parameter temporaries concatenated afterwards); a factored block is the batched
        # product sum_s g_s a_s^T, formed in place.
        names = self.param_names if names is None else list(names)
        width = sum(self._numels[n] for n in names)
        blocks = [grads[n] for n in self.param_names]
        first = blocks[0]
        ref = first.output_grads if isinstance(first, LayerFactors) else first
        batch = int(ref.shape[0])
        dtypes = [(b.output_grads if isinstance(b, LayerFactors) else b).dtype for b in blocks]
        if torch.float64 in dtypes:
            dtype = torch.float64
        elif scale != 1.0 or len(set(dtypes)) > 1:
            dtype = torch.float32  # loss-scaled half gradients are divided in fp32
        else:
            dtype = dtypes[0]
        if self.out_dtype is not None and scale == 1.0:
            dtype = self.out_dtype
        out = empty_rows(batch, width, dtype, ref.device)
        offset = 0
        chosen = set(names)
        for name, block in zip(self.param_names, blocks):
            if name not in chosen:
                continue
            mult = (1.0 if param_scales is None else float(param_scales.get(name, 1.0))) / scale
            numel = math.prod(block.shape) if isinstance(block, LayerFactors) else math.prod(block.shape[1:])
            view = out[:, offset : offset + numel]
            offset += numel
            if isinstance(block, LayerFactors) and block.inputs is not None and block.groups == 1:
                # sum_s g_s a_s^T as one batched product written into the row's columns
                g = block.output_grads.to(dtype).transpose(1, 2)
                if mult != 1.0:
                    g = g * mult
                a = block.inputs.to(dtype)
                torch.bmm(g, a, out=view.view(batch, g.shape[1], a.shape[2]))
                continue
            view.copy_(dense_gradient(block).reshape(batch, numel))
            if mult != 1.0:
                view.mul_(mult)
        if offset != width:
            raise ValueError(f"The engine returned {offset} gradient entries per sample, expected {width}.")
        return out if self.out_dtype is None else out.to(self.out_dtype)


def _replace_rows(split: SplitRows, idx: Tensor, redo: SplitRows) -> SplitRows:
    """``split`` with its rows ``idx`` replaced by ``redo`` (the loss-scale back-off of those rows)."""
    dense = split.dense.clone()
    dense[idx] = redo.dense.to(dense.dtype)
    factors: dict[str, Tensor | LayerFactors] = {}
    done: dict[int, Tensor] = {}

    def patched(t: Tensor, new: Tensor) -> Tensor:
        # A g shared by a weight and its bias is patched once and stays shared.
        if id(t) not in done:
            done[id(t)] = t.clone()
            done[id(t)][idx] = new.to(t.dtype)
        return done[id(t)]

    for name, f in split.factors.items():
        r = redo.factors[name]
        if (
            isinstance(f, LayerFactors)
            and isinstance(r, LayerFactors)
            and r.output_grads.shape[1:] == f.output_grads.shape[1:]
        ):
            g = patched(f.output_grads, r.output_grads)
            a = f.inputs
            if a is not None and r.inputs is not None:
                a = patched(a, r.inputs)
            factors[name] = LayerFactors(a, g, f.shape, f.groups)
        else:
            d = dense_gradient(f).clone()
            d[idx] = dense_gradient(r).to(d.dtype)
            factors[name] = d
    return SplitRows(dense, factors, split.names, split.numels)
