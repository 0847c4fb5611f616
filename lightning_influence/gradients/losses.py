"""Per-sample losses: the one type, the one default, the one shape check.

A per-sample loss is ``fn(module, batch) -> Tensor[B]``: one value per sample, never reduced.
The facades call it ``train_loss`` (the objective that trained the weights: curvature, training
gradients) or ``measurement`` (the question asked of a test sample); the pure functions take
either as ``loss_fn``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_influence.errors import ConfigurationError
from lightning_influence.gradients.noise import fixed_noise

__all__ = [
    "LossCall",
    "ModuleCall",
    "PerSampleLoss",
    "call_per_sample_loss",
    "check_per_sample_loss",
    "resolve_loss",
]

#: ``loss_fn(module, batch) -> Tensor[B]``: one loss value per sample in the batch.
PerSampleLoss = Callable[[nn.Module, Any], Tensor]


def call_per_sample_loss(module: nn.Module, batch: Any) -> Tensor:
    """The default per-sample loss: ``module.per_sample_loss(batch)``."""
    return module.per_sample_loss(batch)  # type: ignore[operator]


class ModuleCall(nn.Module):
    """Lets ``torch.func.functional_call`` evaluate ``fn(module, *args)`` with substituted weights.

    The wrapped module's parameters and buffers appear under the prefix ``"m."``.
    """

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.m = module
        self._fn = fn

    def forward(self, *args: Any) -> Any:
        return self._fn(self.m, *args)


@dataclasses.dataclass(frozen=True)
class LossCall:
    """A per-sample loss on one batch at given weights, with the batch's keyed reparameterisation noise.

    Attributes:
        module: the model (its own parameters and buffers are not used where ``state`` names them).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``.
        batch: the batch.
        state: parameter / buffer name -> tensor, substituted for the module's own.
        sample_ids: ``[B]`` dataset positions of the batch's samples (they key the noise).
        noise_seed, noise_stream: the rest of the noise key.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> zero = {"weight": torch.zeros(1, 3), "bias": torch.ones(1)}
        >>> call = LossCall(net, lambda m, b: m(b).squeeze(-1), torch.randn(2, 3), zero, torch.arange(2), 0, 0)
        >>> call.evaluate()
        tensor([1., 1.])
    """

    module: nn.Module
    loss_fn: PerSampleLoss
    batch: Any
    state: Mapping[str, Tensor]
    sample_ids: Tensor
    noise_seed: int
    noise_stream: int

    @property
    def batch_size(self) -> int:
        return int(self.sample_ids.shape[0])

    def evaluate(self) -> Any:
        """The loss's value, computed with gradients enabled and the batch's keyed noise.

        The buffers of modules in training mode are passed as copies (of the state's value, or of the
        module's own where the state has none): a forward that updates one in place (the running
        statistics of a train-mode norm, its step counter) then changes only the copy. Per-sample
        gradients run between training steps and must leave the model's buffers as training left
        them, and ``state``, reused for the next batch, must give every evaluation the same values.
        Modules in eval mode (the recorder's and the analysis's) keep theirs uncopied.
        """
        weights = {"m." + k: v for k, v in self.state.items()}
        for prefix, sub in self.module.named_modules():
            if sub.training:
                for name, buf in sub.named_buffers(prefix=prefix, recurse=False):
                    key = "m." + name
                    weights[key] = (weights[key] if key in weights else buf.detach()).clone()
        with torch.enable_grad(), fixed_noise(self.sample_ids, self.noise_seed, self.noise_stream):
            return functional_call(ModuleCall(self.module, self.loss_fn), weights, (self.batch,), strict=False)

    def replace(self, **changes: Any) -> LossCall:
        """This call with some attributes replaced."""
        return dataclasses.replace(self, **changes)


class _UnboundMethod:
    """``model.method`` turned into ``fn(module, batch)`` so ``functional_call`` can substitute weights."""

    def __init__(self, func: Callable[..., Tensor]) -> None:
        self.func = func
        self.__name__ = getattr(func, "__name__", "loss")
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)

    def __call__(self, module: nn.Module, batch: Any) -> Tensor:
        return self.func(module, batch)


def resolve_loss(loss: Any, model: nn.Module, argname: str = "train_loss") -> PerSampleLoss:
    """The per-sample loss a facade differentiates: ``loss``, or ``model.per_sample_loss`` when ``None``.

    A bound method of ``model`` taking only the batch (``model.per_sample_loss``) is accepted too:
    it is called on the module ``functional_call`` hands over, so the substituted weights are used.

    Raises:
        ConfigurationError: if ``loss`` is not callable, or is ``None`` and ``model`` has no
            ``per_sample_loss(batch)`` method.
    """
    if loss is None:
        if not callable(getattr(model, "per_sample_loss", None)):
            raise ConfigurationError(
                f"`{argname}` was not given and {type(model).__name__} has no `per_sample_loss(batch)` method;"
                f" pass {argname}=lambda module, batch: <Tensor[B] of per-sample losses>."
            )
        return call_per_sample_loss
    if not callable(loss):
        raise ConfigurationError(
            f"`{argname}` must be callable as {argname}(module, batch) -> Tensor[B], got {loss!r}."
        )
    if inspect.ismethod(loss) and loss.__self__ is model:
        return _UnboundMethod(loss.__func__)
    return loss


def check_per_sample_loss(
    loss: Any,
    batch_size: int,
    argname: str = "loss_fn",
    what: str = "loss",
    per: str = "sample",
    batch: str = "this batch",
) -> Tensor:
    """``loss`` if it is a ``Tensor[batch_size]``; otherwise a ``TypeError``/``ValueError`` naming ``argname``.

    Args:
        loss: what the user's function returned.
        batch_size: the number of samples it was given.
        argname: the function's argument name, for the message.
        what, per: the message says "one {what} per {per}".
        batch: what ``batch_size`` counts, for the message.

    Example:
        >>> import torch
        >>> check_per_sample_loss(torch.zeros(3), 3).shape
        torch.Size([3])
    """
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"`{argname}` must return a Tensor of shape [B] (one {what} per {per}); it returned {type(loss).__name__}."
        )
    if loss.dim() != 1 or loss.shape[0] != batch_size:
        raise ValueError(
            f"`{argname}` must return one {what} per {per}, a Tensor of shape [B] = [{batch_size}] for {batch};"
            f" it returned shape {tuple(loss.shape)}. Did it reduce the batch with .mean() or .sum(), or keep a"
            " feature dimension?"
        )
    return loss
