"""The seam between "a batch and some weights" and "each sample's gradient": per-sample gradient engines.

Every caller that needs per-sample gradients (the recorder, :class:`~lightning_influence.InfluenceAnalysis`,
:class:`~lightning_influence.InfluenceFunction`, the fragility estimates) reaches an engine through
:class:`~lightning_influence.gradients.featurizer.GradientFeaturizer`, never a ``torch.func`` call of its
own. An engine returns, per tracked parameter, either

- a dense tensor ``[B, *param.shape]``, or
- :class:`LayerFactors`: the layer's inputs ``a`` and output gradients ``g`` with a position axis
  (sequence positions, conv locations, reparameterisation draws), from which the gradient is
  ``sum_s g_s a_s^T``. Factors are what hook engines capture for free in one batched
  forward/backward; a projection can act on them without materialising the gradient.

Implementations: :class:`~lightning_influence.gradients.vmap.VmapEngine` (``torch.func``, any model),
:class:`~lightning_influence.gradients.factored.FactoredEngine` (hooks on Linear/conv/norm layers, one batched
forward/backward; other parameters fall back to the ``vmap`` engine) and
:class:`~lightning_influence.gradients.loop.LoopEngine` (one autograd backward per sample, for ops ``vmap``
cannot batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_influence.gradients.losses import PerSampleLoss

__all__ = ["LayerFactors", "PerSampleGradientEngine", "PerSampleGradients", "dense_gradient"]


@dataclass(frozen=True)
class LayerFactors:
    """A per-sample weight gradient in factored form.

    .. math::
        \\nabla_W \\ell_i = \\sum_{s} g_{i,s}\\, a_{i,s}^\\top \\qquad (W \\text{ of shape } [d_{out}, d_{in}])

    With ``groups = G`` (grouped convolutions) the channels split into ``G`` independent blocks:
    ``a`` is ``[B, S, G * d_in/G]`` and ``g`` is ``[B, S, G * d_out/G]``, block ``j`` of the gradient is
    ``sum_s g^{(j)}_{i,s} a^{(j)\\top}_{i,s}`` and the blocks stack along the output axis
    (``[d_out, d_in/G]``, the layout of a grouped conv weight).

    Attributes:
        inputs: ``a`` ``[B, S, d_in]``: the layer's (unfolded) input per sample and position; ``None``
            for a bias, whose gradient is ``sum_s g_{i,s}``.
        output_grads: ``g`` ``[B, S, d_out]``: the gradient of the summed per-sample losses with
            respect to the layer's output, times the engine's ``loss_scale`` (the caller divides it out).
        shape: the parameter's shape; the dense gradient ``[d_out, d_in / groups]`` is reshaped to it.
        groups: independent channel blocks (1 for everything but grouped convolutions).

    Example:
        >>> import torch
        >>> a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
        >>> LayerFactors(a, g, (5, 4)).dense().shape
        torch.Size([2, 5, 4])
    """

    inputs: Tensor | None
    output_grads: Tensor
    shape: tuple[int, ...]
    groups: int = 1

    @property
    def batch_size(self) -> int:
        return int(self.output_grads.shape[0])

    def grouped(self) -> tuple[Tensor | None, Tensor]:
        """``a`` ``[B, S, G, d_in/G]`` (or ``None``) and ``g`` ``[B, S, G, d_out/G]``."""
        b, s = self.output_grads.shape[:2]
        g = self.output_grads.reshape(b, s, self.groups, -1)
        a = None if self.inputs is None else self.inputs.reshape(b, s, self.groups, -1)
        return a, g

    def dense(self) -> Tensor:
        """The per-sample gradients ``[B, *shape]`` (materialised: ``O(B d_in d_out)`` memory)."""
        if self.inputs is None:
            flat = self.output_grads.sum(dim=1)
        elif self.groups == 1:
            flat = torch.einsum("bso,bsi->boi", self.output_grads, self.inputs)
        else:
            a, g = self.grouped()
            flat = torch.einsum("bsgo,bsgi->bgoi", g, a)
        return flat.reshape(self.batch_size, *self.shape)


#: What an engine returns: parameter name -> dense ``[B, *shape]`` gradients or :class:`LayerFactors`.
PerSampleGradients = Mapping[str, Union[Tensor, LayerFactors]]


def dense_gradient(block: Tensor | LayerFactors) -> Tensor:
    """``[B, *shape]`` for either form an engine may return."""
    return block.dense() if isinstance(block, LayerFactors) else block


@runtime_checkable
class PerSampleGradientEngine(Protocol):
    """Computes each sample's gradient of a per-sample loss with respect to chosen parameters.

    An engine must not touch the module's own parameters, ``.grad`` or train/eval mode: the
    weights to differentiate at come in ``state`` (all parameters and buffers) and ``params`` (the
    tracked subset, detached). Reparameterisation noise must be drawn inside
    :func:`~lightning_influence.gradients.noise.fixed_noise` keyed by ``sample_ids``, so that a sample
    sees the same noise whatever the engine, the batch or the checkpoint.

    Attributes:
        name: a short identifier recorded in the store manifest.
    """

    name: str

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
    ) -> PerSampleGradients:
        """Per-sample gradients of ``loss_fn(module, batch) * loss_scale``, one entry per name in ``params``.

        Args:
            module: the model, a template for ``torch.func.functional_call``.
            loss_fn: ``loss_fn(module, batch) -> Tensor[B]``.
            batch: a collated batch on the state's device.
            params: the tracked parameters (name -> detached value).
            state: every parameter and buffer (name -> value).
            sample_ids: dataset positions ``[B]`` keying the noise.
            noise_seed: seed of the keyed noise.
            noise_stream: independent draw set (:class:`~lightning_influence.gradients.noise.NoiseStream`).
            loss_scale: multiplies the loss before differentiation (fp16); not divided back out.
            argname: the loss argument's name for error messages.
        """
        ...
