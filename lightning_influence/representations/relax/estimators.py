"""RELAX's estimators: the mask-weighted mean (importance) and variance (uncertainty) of similarities.

For one image with similarity scores :math:`s_n` of masked copies and masks :math:`M_n`:

.. math::
    R_{ij} = \\frac{\\sum_n M_n(ij)\\, s_n}{\\sum_n M_n(ij)},\\qquad
    U_{ij} = \\frac{\\sum_n M_n(ij)\\,(s_n - R_{ij})^2}{\\sum_n M_n(ij) - 1}

The ``- 1`` in U's denominator is the reliability-weights normalisation of the authors' 2021
notebook; their package omits it, which lets each pixel's mask coverage distort U.

Pixels where the estimate is undefined (no weight for R, ``sum M <= 1`` for U) are NaN, never
silently zero: they show that too few masks covered the pixel.

The batch formulas (:func:`weighted_mean`, :func:`weighted_variance`) hold every score and mask;
:class:`OnlineWeightedMoments` streams chunks of masks through the same statistics with Chan et
al.'s pairwise merge (the chunked form of West's weighted Welford update), so memory does not
grow with the number of masks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "OnlineWeightedMoments",
    "WeightedMoments",
    "chunk_moments",
    "merge_moments",
    "u_relax",
    "weighted_mean",
    "weighted_variance",
]


def _as_batched(scores: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, bool]:
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"`masks` must have shape [N, H, W] or [N, 1, H, W], got {tuple(masks.shape)}.")
    single = scores.dim() == 1
    if single:
        scores = scores.unsqueeze(0)
    if scores.dim() != 2 or scores.shape[1] != masks.shape[0]:
        raise ValueError(
            f"`scores` must have shape [N] or [B, N] with N = {masks.shape[0]} masks, got {tuple(scores.shape)}."
        )
    return scores, masks.to(scores.dtype), single


def weighted_mean(scores: Tensor, masks: Tensor) -> Tensor:
    """RELAX importance, the mask-weighted mean of the scores (batch formula).

    .. math:: R_{ij} = \\sum_n M_n(ij)\\, s_n \\big/ \\sum_n M_n(ij)

    Args:
        scores: similarities ``[N]`` or ``[B, N]``.
        masks: ``[N, H, W]`` or ``[N, 1, H, W]`` in ``[0, 1]``.

    Returns:
        ``[H, W]`` or ``[B, H, W]``; NaN where no mask has weight.

    Example:
        >>> masks = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # N=2, H=1, W=2
        >>> weighted_mean(torch.tensor([0.2, 0.6]), masks)
        tensor([[0.4000, 0.6000]])
    """
    s, m, single = _as_batched(scores, masks)
    total = m.sum(0)
    mean = torch.einsum("bn,nhw->bhw", s, m) / total
    mean = torch.where(total > 0, mean, torch.full_like(mean, float("nan")))
    return mean[0] if single else mean


def weighted_variance(scores: Tensor, masks: Tensor, mean: Tensor | None = None) -> Tensor:
    """RELAX uncertainty, the mask-weighted variance with the ``(sum of weights - 1)`` normalisation.

    .. math:: U_{ij} = \\sum_n M_n(ij)\\,(s_n - R_{ij})^2 \\big/ \\big(\\textstyle\\sum_n M_n(ij) - 1\\big)

    Args:
        scores: similarities ``[N]`` or ``[B, N]``.
        masks: ``[N, H, W]`` or ``[N, 1, H, W]``.
        mean: the importance ``R`` (computed if not given).

    Returns:
        ``[H, W]`` or ``[B, H, W]``; NaN where ``sum M <= 1``.

    Example:
        >>> masks = torch.ones(3, 1, 1)
        >>> weighted_variance(torch.tensor([1.0, 2.0, 3.0]), masks)  # the usual unbiased variance
        tensor([[1.]])
    """
    s, m, single = _as_batched(scores, masks)
    r = weighted_mean(s, m) if mean is None else (mean.unsqueeze(0) if single else mean)
    total = m.sum(0)
    dev2 = (s[:, :, None, None] - r[:, None]) ** 2  # [B, N, H, W]
    var = (m.unsqueeze(0) * dev2).sum(1) / (total - 1)
    var = torch.where(total > 1, var, torch.full_like(var, float("nan")))
    return var[0] if single else var


def u_relax(importance: Tensor, uncertainty: Tensor) -> Tensor:
    """U-RELAX: the importance where the uncertainty is at most its (per-image) median, else 0.

    .. math:: \\tilde R_{ij} = R_{ij}\\,\\mathbb 1[U_{ij} \\le \\mathrm{median}(U)]

    NaN uncertainties are left out of the median and their pixels are dropped.

    Args:
        importance: ``[H, W]`` or ``[B, H, W]``.
        uncertainty: same shape.

    Example:
        >>> u_relax(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.1, 0.3, 0.2]]))
        tensor([[1., 0., 3.]])
    """
    if importance.shape != uncertainty.shape:
        raise ValueError(
            f"`importance` and `uncertainty` must have the same shape, got {tuple(importance.shape)}"
            f" and {tuple(uncertainty.shape)}."
        )
    u = uncertainty.flatten(-2)
    med = u.nanmedian(dim=-1).values[..., None, None]
    keep = uncertainty <= med
    return importance * keep.to(importance.dtype)


class WeightedMoments(NamedTuple):
    """Sufficient statistics of a weighted sample, per pixel.

    Attributes:
        sum_of_weights: ``[H, W]`` (the masks are shared by every image of a batch).
        mean: ``[B, H, W]``, the weighted mean (0 where no weight yet).
        m2: ``[B, H, W]``, the weighted sum of squared deviations from ``mean``.
    """

    sum_of_weights: Tensor
    mean: Tensor
    m2: Tensor


def chunk_moments(scores: Tensor, masks: Tensor) -> WeightedMoments:
    """Moments of one chunk of masks, computed two-pass (stable).

    Args:
        scores: ``[B, N]``.
        masks: ``[N, H, W]``.
    """
    s, m, _ = _as_batched(scores, masks)
    total = m.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    mean = torch.einsum("bn,nhw->bhw", s, m) / safe
    mean = torch.where(total > 0, mean, torch.zeros_like(mean))
    m2 = (m.unsqueeze(0) * (s[:, :, None, None] - mean[:, None]) ** 2).sum(1)
    return WeightedMoments(total, mean, m2)


def merge_moments(a: WeightedMoments, b: WeightedMoments) -> WeightedMoments:
    """Combine the moments of two disjoint sets of masks (Chan, Golub & LeVeque's pairwise update).

    .. math::
        W = W_a + W_b,\\quad \\delta = \\bar s_b - \\bar s_a,\\quad
        \\bar s = \\bar s_a + \\delta\\,W_b/W,\\quad M_2 = M_{2,a} + M_{2,b} + \\delta^2 W_a W_b / W
    """
    total = a.sum_of_weights + b.sum_of_weights
    safe = torch.where(total > 0, total, torch.ones_like(total))
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.sum_of_weights / safe)
    m2 = a.m2 + b.m2 + delta**2 * (a.sum_of_weights * b.sum_of_weights / safe)
    return WeightedMoments(total, mean, m2)


class OnlineWeightedMoments:
    """Streamed RELAX importance and uncertainty: feed chunks of ``(scores, masks)``, read the estimates.

    Accumulates in float64 by default; memory is ``O(B H W)`` whatever the number of masks.

    Args:
        dtype: accumulation dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> scores, masks = torch.rand(2, 50, generator=g), torch.rand(50, 4, 4, generator=g)
        >>> online = OnlineWeightedMoments()
        >>> for i in range(0, 50, 16):
        ...     online.update(scores[:, i:i + 16], masks[i:i + 16])
        >>> torch.allclose(online.mean, weighted_mean(scores.double(), masks.double()))
        True
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.state: WeightedMoments | None = None
        #: masks seen so far
        self.n_masks = 0

    def update(self, scores: Tensor, masks: Tensor) -> None:
        """Add a chunk: ``scores [B, N]`` (or ``[N]``) and ``masks [N, H, W]`` (or ``[N, 1, H, W]``)."""
        chunk = chunk_moments(scores.to(self.dtype), masks.to(self.dtype))
        self.state = chunk if self.state is None else merge_moments(self.state, chunk)
        self.n_masks += int(masks.shape[0])

    def _require(self) -> WeightedMoments:
        if self.state is None:
            raise RuntimeError("OnlineWeightedMoments has seen no data; call `update` first.")
        return self.state

    @property
    def sum_of_weights(self) -> Tensor:
        """``[H, W]``."""
        return self._require().sum_of_weights

    @property
    def mean(self) -> Tensor:
        """Importance ``[B, H, W]``; NaN where no weight."""
        st = self._require()
        return torch.where(st.sum_of_weights > 0, st.mean, torch.full_like(st.mean, float("nan")))

    @property
    def variance(self) -> Tensor:
        """Uncertainty ``[B, H, W]`` with the ``(sum of weights - 1)`` normalisation; NaN where ``sum <= 1``."""
        st = self._require()
        ok = st.sum_of_weights > 1
        denom = torch.where(ok, st.sum_of_weights - 1, torch.ones_like(st.sum_of_weights))
        return torch.where(ok, st.m2 / denom, torch.full_like(st.m2, float("nan")))
