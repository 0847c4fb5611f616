"""Rows of the gradient matrix: per-sample gradients from an engine, flattened or randomly projected.

This is the one place where the recorder (training side), the analysis (test side), influence
functions and the fragility estimates turn a batch into gradient rows, so every side shares
numerics, noise keys, loss scaling and projection. Which engine computes the gradients is a
constructor argument (:class:`~lightning_influence.gradients.engine.PerSampleGradientEngine`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
        params = {n: state[n] for n in self.param_names}
        with self.precision.context(device):
            grads = self.engine.gradients(
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
        if projection is not None:
            if scale != 1.0:
                param_scales = {n: (param_scales or {}).get(n, 1.0) / scale for n in self.param_names}
            return projection.project(grads, param_scales)
        return self._flat_rows(grads, param_scales, scale)

    def _flat_rows(self, grads: PerSampleGradients, param_scales: Mapping[str, float] | None, scale: float) -> Tensor:
        # Each block is written straight into its columns of one preallocated [B, D] matrix (no
        # per-parameter temporaries concatenated afterwards); a factored block is the batched
        # product sum_s g_s a_s^T, formed in place.
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
        out = torch.empty(batch, self.input_dim, dtype=dtype, device=ref.device)
        offset = 0
        for name, block in zip(self.param_names, blocks):
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
        if offset != self.input_dim:
            raise ValueError(f"The engine returned {offset} gradient entries per sample, expected {self.input_dim}.")
        return out if self.out_dtype is None else out.to(self.out_dtype)
