"""The ``torch.func`` engine: exact per-sample gradients by ``vmap`` over ``grad`` of a functional call.

Works for any model ``functional_call`` can run, at the cost of one vectorised backward per
sample. Everything here is a pure function of tensors: the module is only a template for
``functional_call``; its own parameters, ``.grad`` and mode are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from lightning_influence.data.batches import slice_batch, tensor_leaves
from lightning_influence.errors import EngineUnsupportedError
from lightning_influence.gradients.engine import PerSampleGradients
from lightning_influence.gradients.losses import LossCall, ModuleCall, PerSampleLoss, check_per_sample_loss
from lightning_influence.gradients.noise import NoiseStream, fixed_noise, global_rng_error
from lightning_influence.gradients.parameters import module_state

__all__ = ["VmapEngine", "per_sample_gradients"]


def per_sample_gradients(
    module: nn.Module,
    loss_fn: PerSampleLoss,
    batch: Any,
    params: Mapping[str, Tensor],
    *,
    state: Mapping[str, Tensor] | None = None,
    sample_ids: Tensor | None = None,
    noise_seed: int = 0,
    noise_stream: int = NoiseStream.TRAIN,
    loss_scale: float = 1.0,
    chunk_size: int | None = None,
    argname: str = "loss_fn",
) -> dict[str, Tensor]:
    """Gradient of each sample's loss with respect to ``params``.

    .. math::
        g_i = \\nabla_\\theta\\, \\ell(\\theta, z_i) \\cdot s \\qquad (s = \\text{loss\\_scale})

    Args:
        module: the model; used only as the template for ``functional_call``.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``.
        batch: a collated batch (tensor or tuple/list/dict of tensors with leading dim ``B``).
        params: name -> value of the parameters to differentiate (detached).
        state: values for the remaining parameters and buffers (default: the module's own).
        sample_ids: dataset positions ``[B]``; they key the reparameterisation noise
            (:func:`lightning_influence.gradients.noise.fixed_noise`). Default: ``arange(B)``.
        noise_seed: seed of the keyed noise.
        noise_stream: independent draw set (train, second train draw, test).
        loss_scale: multiplies the loss before differentiation (fp16 loss scaling); the caller
            divides it back out.
        chunk_size: samples per ``vmap`` chunk (bounds memory); ``None`` does the batch at once.
        argname: name of the loss argument in error messages.

    Returns:
        name -> ``Tensor[B, *param.shape]``.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 1)
        >>> loss = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2
        >>> x, y = torch.randn(4, 3), torch.randn(4)
        >>> g = per_sample_gradients(lin, loss, (x, y), {k: v.detach() for k, v in lin.named_parameters()})
        >>> g["weight"].shape
        torch.Size([4, 1, 3])
    """
    if not params:
        raise ValueError("`params` is empty: name at least one parameter to differentiate.")
    wrapper = ModuleCall(module, loss_fn)
    base = dict(state) if state is not None else module_state(module, upcast=False)
    frozen = {"m." + k: v for k, v in base.items() if k not in params}
    first = next(iter(params.values()))
    leaves = tensor_leaves(batch)
    if not leaves:
        raise ValueError("`batch` contains no tensors; per-sample gradients need tensor inputs.")
    bsz = leaves[0].shape[0]
    ids = sample_ids if sample_ids is not None else torch.arange(bsz)
    ids = ids.to(device=first.device, dtype=torch.int64)

    def one_sample(p: dict[str, Tensor], sample: Any, sid: Tensor) -> Tensor:
        batch1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample)
        full = {**frozen, **{"m." + k: v for k, v in p.items()}}
        with fixed_noise(sid.unsqueeze(0), noise_seed, noise_stream):
            loss = functional_call(wrapper, full, (batch1,), strict=False)
        loss = check_per_sample_loss(loss, 1, argname, batch="each sample, which vmap evaluates on its own")
        return loss[0] * loss_scale

    grad_fn = vmap(grad(one_sample), in_dims=(None, 0, 0), chunk_size=chunk_size)
    try:
        return grad_fn(dict(params), batch, ids)
    except RuntimeError as err:
        if "randomness" in str(err):
            raise global_rng_error(argname) from err
        one = LossCall(module, loss_fn, slice_batch(batch, 0, 1), {**base, **params}, ids[:1], noise_seed, noise_stream)
        try:
            one.evaluate()
        except Exception:  # the loss fails outside vmap too: the user's error, unchanged
            raise err from None
        raise EngineUnsupportedError(
            f"torch.func.vmap cannot compute per-sample gradients of `{argname}` for {type(module).__name__},"
            " although the loss runs on its own: some ops have no working vmap batching rule (nn.RNN and nn.GRU"
            " in torch 2.x, custom autograd Functions without vmap support, activation checkpointing); vmap's error:"
            f" {str(err).strip().rstrip('.')}",
            "Pass engine='loop' (exact, one backward per sample), or engine=FactoredEngine(fallback=LoopEngine())"
            " to keep the factored layer rules and loop only over the other parameters",
        ) from err


class VmapEngine:
    """:class:`~lightning_influence.gradients.engine.PerSampleGradientEngine` over :func:`per_sample_gradients`.

    Returns dense gradients for every parameter and handles any architecture.

    Args:
        chunk_size: samples per ``vmap`` chunk (bounds memory); ``None`` does a batch at once.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 1)
        >>> params = {k: v.detach() for k, v in lin.named_parameters()}
        >>> loss = lambda m, b: m(b).squeeze(-1) ** 2
        >>> g = VmapEngine().gradients(lin, loss, torch.randn(4, 3), params, state=params,
        ...                            sample_ids=torch.arange(4), noise_seed=0, noise_stream=0)
        >>> g["weight"].shape
        torch.Size([4, 1, 3])
    """

    name = "vmap"

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` must be None or a positive integer, got {chunk_size!r}.")
        self.chunk_size = chunk_size

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
        return per_sample_gradients(
            module,
            loss_fn,
            batch,
            params,
            state=state,
            sample_ids=sample_ids,
            noise_seed=noise_seed,
            noise_stream=noise_stream,
            loss_scale=loss_scale,
            chunk_size=self.chunk_size,
            argname=argname,
        )

    def __repr__(self) -> str:
        return f"VmapEngine(chunk_size={self.chunk_size})"
