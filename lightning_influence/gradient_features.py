"""Rows of the gradient matrix: per-sample gradients, flattened or randomly projected.

This is the one place where the recorder (training side) and the analysis (test side) turn a
batch into gradient rows, so both sides share numerics, noise keys and projection. A future
hook-based factored engine plugs in here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_influence.noise import NoiseStream
from lightning_influence.per_sample_gradients import LossFn, flatten_gradients, per_sample_gradients
from lightning_influence.precision import GradientPrecision
from lightning_influence.projection import RandomProjection

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


def _cast_inputs(batch: Any, precision: GradientPrecision) -> Any:
    if precision.mode == "mixed":
        return batch
    target = torch.float32 if precision.mode == "fp32" else precision.torch_dtype
    return tree_map(lambda t: t.to(target) if isinstance(t, Tensor) and t.is_floating_point() else t, batch)


def _take(batch: Any, index: Tensor) -> Any:
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) else t, batch)


class GradientFeaturizer:
    """Per-sample gradient rows ``[B, dim]`` (fp32) of ``loss_fn`` for given weights.

    .. math::
        r_i = P\\,\\big(s_p\\,\\nabla_{\\theta_p} \\ell(\\theta, z_i)\\big)_{p \\in \\text{params}}

    with ``P`` the optional random projection and ``s_p`` optional per-parameter scales (used
    for per-param-group learning rates).

    Args:
        module: the model (a template for ``functional_call``; never modified).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``.
        param_names: tracked parameters, in row layout order.
        projection: random projection, or ``None`` for exact gradients.
        precision: numerics (see :class:`~lightning_influence.precision.GradientPrecision`).
        noise_seed: seed of the keyed reparameterisation noise.
        chunk_size: samples per ``vmap`` chunk.
        argname: name of the loss argument in error messages.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        param_names: Sequence[str],
        *,
        projection: RandomProjection | None = None,
        precision: GradientPrecision | None = None,
        noise_seed: int = 0,
        chunk_size: int | None = None,
        argname: str = "loss_fn",
    ) -> None:
        self.module = module
        self.loss_fn = loss_fn
        self.param_names = list(param_names)
        self.projection = projection
        self.precision = precision or GradientPrecision()
        self.noise_seed = noise_seed
        self.chunk_size = chunk_size
        self.argname = argname
        numels = dict((n, p.numel()) for n, p in module.named_parameters())
        self.input_dim = sum(numels[n] for n in self.param_names)

    @property
    def dim(self) -> int:
        return self.projection.dim if self.projection is not None else self.input_dim

    def rows(
        self,
        batch: Any,
        ids: Tensor,
        state: Mapping[str, Tensor],
        *,
        stream: int = NoiseStream.TRAIN,
        param_scales: Mapping[str, float] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Gradient rows of one batch.

        Args:
            batch: a collated batch already on the state's device.
            ids: dataset positions ``[B]`` (key the noise).
            state: all weights and buffers, already cast with :func:`cast_state`.
            stream: noise stream.
            param_scales: per-parameter multipliers.

        Returns:
            ``rows`` ``[B, dim]`` fp32 and ``nonfinite`` ``[B]`` bool (rows containing inf/NaN after
            every loss-scale back-off; left as computed, never zeroed).
        """
        batch = _cast_inputs(batch, self.precision)
        device = next(iter(state.values())).device
        scale = self.precision.init_loss_scale if self.precision.loss_scaling else 1.0
        rows = self._rows_at_scale(batch, ids, state, stream, param_scales, scale, device)
        bad = ~torch.isfinite(rows).all(dim=1)
        while bad.any() and scale > 1.0:
            scale /= 2.0
            idx = bad.nonzero().squeeze(1)
            redo = self._rows_at_scale(_take(batch, idx), ids[idx.cpu()], state, stream, param_scales, scale, device)
            rows[idx] = redo
            bad = ~torch.isfinite(rows).all(dim=1)
        return rows, bad

    def _rows_at_scale(
        self,
        batch: Any,
        ids: Tensor,
        state: Mapping[str, Tensor],
        stream: int,
        param_scales: Mapping[str, float] | None,
        scale: float,
        device: torch.device,
    ) -> Tensor:
        params = {n: state[n] for n in self.param_names}
        with self.precision.context(device):
            grads = per_sample_gradients(
                self.module,
                self.loss_fn,
                batch,
                params,
                state=state,
                sample_ids=ids,
                noise_seed=self.noise_seed,
                noise_stream=stream,
                loss_scale=scale,
                chunk_size=self.chunk_size,
                argname=self.argname,
            )
        if scale != 1.0:
            grads = {k: v.float() / scale for k, v in grads.items()}
        if self.projection is not None:
            return self.projection.project(grads, param_scales)
        return flatten_gradients(grads, self.param_names, param_scales).float()
