"""RELAX: which input regions a representation depends on, with uncertainty (Wickstrøm et al., arXiv 2112.10161).

- :class:`RELAX` / :class:`Explanation`: the explainer (online over chunks of masks).
- :mod:`~lightning_influence.representations.relax.masks`: the smooth random masks.
- :mod:`~lightning_influence.representations.relax.estimators`: the weighted mean/variance, batch and online.
- :func:`representation_saliency`: the paper's gradient baseline.
"""

from lightning_influence.representations.relax.estimators import (
    OnlineWeightedMoments,
    WeightedMoments,
    chunk_moments,
    merge_moments,
    u_relax,
    weighted_mean,
    weighted_variance,
)
from lightning_influence.representations.relax.explainer import RELAX, Explanation, hoeffding_masks
from lightning_influence.representations.relax.masks import (
    MaskParameters,
    draw_mask_parameters,
    relax_masks,
    render_masks,
)
from lightning_influence.representations.relax.saliency import representation_saliency

__all__ = [
    "RELAX",
    "Explanation",
    "MaskParameters",
    "OnlineWeightedMoments",
    "WeightedMoments",
    "chunk_moments",
    "draw_mask_parameters",
    "hoeffding_masks",
    "merge_moments",
    "relax_masks",
    "render_masks",
    "representation_saliency",
    "u_relax",
    "weighted_mean",
    "weighted_variance",
]
