"""The gradient baseline of the RELAX paper: saliency of the representation similarity w.r.t. the input."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_influence.representations.relax.encoders import Encoder, as_image_batch, check_encoder, encode
from lightning_influence.utils.modes import eval_mode

__all__ = ["representation_saliency"]


def representation_saliency(
    encoder: Encoder,
    x: Tensor,
    *,
    channel_reduction: Literal["max", "sum", "none"] = "max",
    absolute: bool = True,
    autocast: bool | torch.dtype = False,
) -> Tensor:
    """Gradient saliency of a representation: how fast the similarity to its own representation moves with each pixel.

    .. math::
        G_{ij} = \\max_c \\left| \\frac{\\partial}{\\partial x_{cij}}
                 \\big\\langle \\mathrm{sg}[f(x)],\\, f(x) \\big\\rangle \\right|
               = \\max_c \\left| \\big(J_f(x)^\\top f(x)\\big)_{cij} \\right|

    The similarity is the inner product with the (gradient-stopped) reference representation,
    i.e. half the gradient of ``||f(x)||^2``. Cosine similarity or distance to the reference
    cannot be used here: both are stationary at ``f(x)`` itself, so their gradient is zero.

    Args:
        encoder: module or callable ``[B, C, H, W] -> [B, ...]``, differentiable in its input.
        x: an image ``[C, H, W]`` or a batch ``[B, C, H, W]``.
        channel_reduction: ``"max"`` of the channels (Simonyan et al.), ``"sum"``, or ``"none"``.
        absolute: take absolute values before reducing channels.
        autocast: run the encoder under ``torch.autocast`` (as in :class:`~lightning_influence.representations.relax.RELAX`).

    Returns:
        ``[H, W]`` / ``[B, H, W]`` (or with a channel axis for ``"none"``), float32 on ``x.device``.

    Example:
        >>> encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> representation_saliency(encoder, torch.rand(1, 4, 4)).shape
        torch.Size([4, 4])
    """
    check_encoder(encoder)
    if channel_reduction not in ("max", "sum", "none"):
        raise ValueError(f"`channel_reduction` must be 'max', 'sum' or 'none', got {channel_reduction!r}.")
    xb, single = as_image_batch(x)
    xb = xb.detach().clone().requires_grad_(True)
    with eval_mode(encoder), torch.enable_grad():
        rep = encode(encoder, xb, autocast=autocast)
        if not rep.requires_grad:
            raise ValueError(
                "`encoder`'s output does not depend differentiably on its input; no gradient baseline exists."
            )
        # Samples are independent (eval mode), so one backward of the summed target gives every image's gradient.
        target = (rep.detach() * rep).sum()
        (grad,) = torch.autograd.grad(target, xb)
    sal = grad.float()
    if absolute:
        sal = sal.abs()
    if channel_reduction == "max":
        sal = sal.amax(dim=1)
    elif channel_reduction == "sum":
        sal = sal.sum(dim=1)
    if not torch.isfinite(sal).all():
        raise ValueError("The gradient of the representation is not finite (inf/NaN) for some inputs.")
    return sal[0] if single else sal
