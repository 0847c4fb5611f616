"""Which parameters are tracked, their values, and how per-parameter gradients become rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["flatten_gradients", "module_state", "resolve_parameter_names"]


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

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> resolve_parameter_names(net, "1")
        ['1.weight', '1.bias']
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
