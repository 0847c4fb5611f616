"""Exact per-sample gradients with ``torch.func`` (``vmap`` over ``grad`` of a functional call).

Everything here is a pure function of tensors: the module is only used as a template for
``functional_call``; its own parameters, ``.grad`` and mode are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from lightning_influence.noise import NoiseStream, fixed_noise

__all__ = [
    "LossFn",
    "call_per_sample_loss",
    "flatten_gradients",
    "module_state",
    "per_sample_gradients",
    "resolve_parameter_names",
]

#: ``loss_fn(module, batch) -> Tensor[B]``: one loss value per sample in the batch.
LossFn = Callable[[nn.Module, Any], Tensor]


def resolve_parameter_names(
    module: nn.Module, params: Sequence[str] | str | None, argname: str = "params"
) -> list[str]:
    """Expand parameter names or module-name prefixes into trainable parameter names.

    Args:
        module: the model.
        params: ``None`` for every trainable parameter; otherwise exact parameter names
            (``"decoder.0.weight"``) or module prefixes (``"decoder"`` selects ``decoder.*``).
        argname: the argument's name for error messages.

    Returns:
        Parameter names in the module's registration order.

    Raises:
        ValueError: if an entry matches no trainable parameter, or nothing is selected.
    """
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if params is None:
        selected = trainable
    else:
        if isinstance(params, str):
            params = [params]
        chosen: set[str] = set()
        for entry in params:
            hits = [n for n in trainable if n == entry or n.startswith(entry + ".")]
            if not hits:
                sample = ", ".join(trainable[:8]) + (", ..." if len(trainable) > 8 else "")
                raise ValueError(
                    f"`{argname}` entry {entry!r} matches no trainable parameter or module prefix of"
                    f" {type(module).__name__}. Available parameters: {sample}"
                )
            chosen.update(hits)
        selected = [n for n in trainable if n in chosen]
    if not selected:
        raise ValueError(f"`{argname}` selects no trainable parameters of {type(module).__name__}.")
    return selected


def module_state(module: nn.Module, upcast: bool = True) -> dict[str, Tensor]:
    """Detached parameters and buffers of ``module``; floating tensors upcast to fp32 if ``upcast``.

    Detaching matters: differentiating with respect to attached parameters keeps a graph holding
    every per-sample gradient alive.
    """
    state: dict[str, Tensor] = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t = t.detach()
        if upcast and t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        state[name] = t
    return state


def call_per_sample_loss(module: nn.Module, batch: Any) -> Tensor:
    """The default ``loss_fn``: ``module.per_sample_loss(batch)``."""
    return module.per_sample_loss(batch)  # type: ignore[operator]


class _LossModule(nn.Module):
    """Makes ``loss_fn(module, batch)`` callable through ``functional_call``."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.m = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.m, batch)


def _check_loss_shape(loss: Any, argname: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"`{argname}` must return a Tensor of per-sample losses [B]; it returned {type(loss).__name__}."
        )
    if loss.dim() != 1 or loss.shape[0] != 1:
        raise ValueError(
            f"`{argname}` must return one loss per sample (a Tensor of shape [B]); for a batch of one sample it"
            f" returned shape {tuple(loss.shape)}. Did it reduce the batch with .mean() or .sum()?"
        )
    return loss


def per_sample_gradients(
    module: nn.Module,
    loss_fn: LossFn,
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
            (:func:`lightning_influence.noise.fixed_noise`). Default: ``arange(B)``.
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
    wrapper = _LossModule(module, loss_fn)
    base = dict(state) if state is not None else module_state(module, upcast=False)
    frozen = {"m." + k: v for k, v in base.items() if k not in params}
    first = next(iter(params.values()))
    leaves = [t for t in _leaves(batch)]
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
        loss = _check_loss_shape(loss, argname)
        return loss[0] * loss_scale

    grad_fn = vmap(grad(one_sample), in_dims=(None, 0, 0), chunk_size=chunk_size)
    try:
        return grad_fn(dict(params), batch, ids)
    except RuntimeError as err:
        if "randomness" in str(err):
            raise ValueError(
                f"`{argname}` draws random numbers with torch's global RNG (e.g. torch.randn_like), which per-sample"
                " gradients cannot key by sample. Draw reparameterisation noise with"
                " lightning_influence.noise.standard_normal(shape, like=...) so each sample gets the same noise at"
                " every checkpoint; put dropout layers in eval mode."
            ) from err
        raise


def _leaves(batch: Any) -> list[Tensor]:
    from lightning_influence.batches import tensor_leaves

    return tensor_leaves(batch)


def flatten_gradients(
    grads: Mapping[str, Tensor], names: Sequence[str], scales: Mapping[str, float] | None = None
) -> Tensor:
    """Concatenate per-sample gradients into ``Tensor[B, D]`` in ``names`` order.

    Args:
        grads: name -> ``Tensor[B, *shape]``.
        names: the order of the blocks.
        scales: optional per-parameter multipliers (e.g. ``sqrt(eta_group / eta)``).
    """
    parts = []
    for n in names:
        g = grads[n].reshape(grads[n].shape[0], -1)
        if scales is not None and scales.get(n, 1.0) != 1.0:
            g = g * scales[n]
        parts.append(g)
    return torch.cat(parts, dim=1)
