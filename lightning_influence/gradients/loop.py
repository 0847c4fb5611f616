"""The loop engine: exact per-sample gradients by plain autograd, one sample at a time.

``torch.func.vmap`` needs a batching rule for every op of the loss; a few common layers have none
that works (``nn.RNN`` and ``nn.GRU`` in torch 2.x fail inside ``vmap``), nor do custom autograd
``Function``\\ s without ``vmap`` support. Plain autograd needs nothing of the kind: this engine runs
the loss on a batch of one and differentiates it, ``B`` forward/backward passes per batch. It is the
slowest engine and the one that handles anything ``loss.backward()`` handles; as the factored
engine's ``fallback`` it serves only the parameters without a layer rule.

Samples keep their keyed reparameterisation noise (the noise of sample ``i`` depends only on its
id), so the rows equal the other engines' to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.data.batches import batch_size_of, slice_batch
from lightning_influence.gradients.engine import PerSampleGradients
from lightning_influence.gradients.losses import LossCall, PerSampleLoss, check_per_sample_loss
from lightning_influence.gradients.noise import refusing_global_rng

__all__ = ["LoopEngine"]


class LoopEngine:
    """:class:`~lightning_influence.gradients.engine.PerSampleGradientEngine` by one autograd backward per sample.

    .. math::
        g_i = s \\cdot \\nabla_\\theta\\, \\ell(\\theta, z_i) \\qquad (s = \\text{loss\\_scale})

    with ``loss_fn`` evaluated on the one-sample batch ``z_i`` (so it must accept a batch of one).
    Returns dense ``[B, *shape]`` gradients; a parameter the loss does not reach gets zeros.

    Example:
        >>> import torch
        >>> from lightning_influence.gradients import VmapEngine
        >>> gru = torch.nn.GRU(3, 2, batch_first=True)
        >>> params = {k: v.detach() for k, v in gru.named_parameters()}
        >>> loss = lambda m, b: m(b)[0].pow(2).sum((1, 2))
        >>> kw = dict(state=params, sample_ids=torch.arange(4), noise_seed=0, noise_stream=0)
        >>> g = LoopEngine().gradients(gru, loss, torch.randn(4, 5, 3), params, **kw)
        >>> g["weight_hh_l0"].shape
        torch.Size([4, 6, 2])
    """

    name = "loop"

    def gradients(
        self,
        module: nn.Module,
        loss_fn: PerSampleLoss,
        batch: Any,
        params: Mapping[str, Tensor],
        *,
        state: Mapping[str, Tensor],
        sample_ids: Tensor,
        noise_seed: int,
        noise_stream: int,
        loss_scale: float = 1.0,
        argname: str = "loss_fn",
    ) -> PerSampleGradients:  # dense tensors only; the protocol's type, so jsonargparse sees it implemented
        if not params:
            raise ValueError("`params` is empty: name at least one parameter to differentiate.")
        names = list(params)
        leaves = [params[n].detach().requires_grad_() for n in names]
        weights = {**state, **dict(zip(names, leaves))}
        bsz = batch_size_of(batch)
        out = [torch.empty(bsz, *leaf.shape, dtype=leaf.dtype, device=leaf.device) for leaf in leaves]
        for i in range(bsz):
            call = LossCall(
                module, loss_fn, slice_batch(batch, i, i + 1), weights, sample_ids[i : i + 1], noise_seed, noise_stream
            )
            if i == 0:  # once per batch: noise from the global RNG is not keyed by sample, as vmap refuses it too
                with refusing_global_rng(argname, {leaf.device for leaf in leaves}):
                    value = call.evaluate()
            else:
                value = call.evaluate()
            loss = check_per_sample_loss(value, 1, argname)
            grads = torch.autograd.grad(loss[0] * loss_scale, leaves, allow_unused=True)
            for rows, g in zip(out, grads):
                if g is None:
                    rows[i].zero_()
                else:
                    rows[i].copy_(g)
        return dict(zip(names, out))

    def __repr__(self) -> str:
        return "LoopEngine()"
