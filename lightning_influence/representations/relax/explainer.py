"""The RELAX explainer: which input regions a representation depends on, with uncertainty.

Wickstrøm et al., "RELAX: Representation Learning Explainability", arXiv 2112.10161 (IJCV 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Union

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_influence.representations.relax.encoders import Encoder, as_image_batch, check_encoder, encode
from lightning_influence.representations.relax.estimators import OnlineWeightedMoments, u_relax
from lightning_influence.representations.relax.masks import MaskParameters, draw_mask_parameters, render_masks
from lightning_influence.representations.relax.saliency import representation_saliency
from lightning_influence.representations.relax.similarity import Similarity, SimilarityFn, resolve_similarity
from lightning_influence.utils.modes import eval_mode

__all__ = ["RELAX", "Explanation", "hoeffding_masks"]


@dataclass(frozen=True)
class Explanation:
    """RELAX maps of one image (``[H, W]``) or a batch (``[B, H, W]``).

    Attributes:
        importance: mask-weighted mean similarity ``R``.
        uncertainty: mask-weighted variance ``U`` (``sum of weights - 1`` normalisation).
        u_relax: ``R`` where ``U <= median(U)``, else 0.
        sum_of_weights: ``[H, W]``, each pixel's total mask weight (its effective sample size).
        n_masks: number of masks behind the estimates.
    """

    importance: Tensor
    uncertainty: Tensor
    u_relax: Tensor
    sum_of_weights: Tensor
    n_masks: int

    def to(self, device: torch.device | str) -> Explanation:
        """A copy with every map on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Explanation(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()})

    def __getitem__(self, index: int) -> Explanation:
        """The explanation of image ``index`` of a batch."""
        if self.importance.dim() != 3:
            raise IndexError("This Explanation holds a single image; there is nothing to index.")
        return Explanation(
            self.importance[index], self.uncertainty[index], self.u_relax[index], self.sum_of_weights, self.n_masks
        )

    def __len__(self) -> int:
        return int(self.importance.shape[0]) if self.importance.dim() == 3 else 1


class RELAX:
    """RELAX attributions of a representation, estimated online over random smooth masks.

    For an image ``x`` with representation ``h = f(x)`` and masks ``M_n`` (1 = keep):

    .. math::
        s_n = \\mathrm{sim}(h, f(x \\odot M_n)),\\quad
        R = \\frac{\\sum_n s_n M_n}{\\sum_n M_n},\\quad
        U = \\frac{\\sum_n M_n (s_n - R)^2}{\\sum_n M_n - 1},\\quad
        \\tilde R = R \\cdot \\mathbb 1[U \\le \\mathrm{median}(U)]

    Masked pixels become 0, so feed the images in the space the encoder expects (e.g. normalised).
    The masks come from ``seed`` alone (drawn on the CPU), so an image gets the same explanation on
    every device, whatever ``batch_size`` and whatever else is in the batch. Cosine similarity is
    1 for the unmasked image, so importance is at most 1: read the spatial pattern, not the level.

    Args:
        encoder: an ``nn.Module`` or callable mapping images ``[B, C, H, W]`` to a representation
            ``[B, ...]`` (a VAE's mean: ``lambda x: vae.encode(x)[0]``). Modules run in eval mode
            under ``no_grad``; their train/eval modes are restored afterwards.
        n_masks: number of masks (3,000 in the paper; a Hoeffding bound gives ``|R - E R| < 0.05``
            with probability ~0.95).
        batch_size: masked images per encoder call (memory bound; does not change the result).
        num_cells: side of the Bernoulli grid (7 for 224 px images; fewer for small images).
        p_keep: probability of keeping a grid cell.
        similarity: ``"cosine"`` (the paper), ``"dot"``, ``"euclidean"`` (negative distance) or
            ``fn(reference [N, D], masked [N, D]) -> Tensor[N]``.
        seed: seed of the masks; ``None`` draws them from the global torch RNG on every call.
        autocast: run the encoder under ``torch.autocast`` (``True``: float16 on CUDA, bfloat16 on
            CPU; or a dtype). Similarities and statistics stay in float32/float64.

    Example:
        >>> encoder = lambda x: x[:, :, :4, :4].flatten(1)  # looks at the top-left corner only
        >>> relax = RELAX(encoder, n_masks=200, num_cells=4, seed=0)
        >>> e = relax.explain(torch.rand(1, 8, 8) + 0.5)
        >>> e.importance.shape, e.uncertainty.shape
        (torch.Size([8, 8]), torch.Size([8, 8]))
        >>> bool(e.importance[:4, :4].mean() > e.importance[4:, 4:].mean())
        True
    """

    def __init__(
        self,
        encoder: Encoder,
        n_masks: int = 3000,
        batch_size: int = 100,
        num_cells: int = 7,
        p_keep: float = 0.5,
        similarity: Union[Similarity, SimilarityFn] = "cosine",
        seed: int | None = 0,
        autocast: bool | torch.dtype = False,
    ) -> None:
        check_encoder(encoder)
        if isinstance(n_masks, bool) or not isinstance(n_masks, int) or n_masks < 2:
            raise ValueError(
                f"`n_masks` must be an integer >= 2 (the uncertainty needs at least two masks; the paper uses"
                f" 3000), got {n_masks!r}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
        if isinstance(num_cells, bool) or not isinstance(num_cells, int) or num_cells < 1:
            raise ValueError(f"`num_cells` must be an integer >= 1, got {num_cells!r}.")
        if not isinstance(p_keep, (int, float)) or not 0.0 < float(p_keep) <= 1.0:
            raise ValueError(f"`p_keep` must be in (0, 1], got {p_keep!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an integer or None, got {seed!r}.")
        if not isinstance(autocast, (bool, torch.dtype)):
            raise ValueError(f"`autocast` must be a bool or a torch.dtype, got {autocast!r}.")
        self.encoder = encoder
        self.n_masks = n_masks
        self.batch_size = batch_size
        self.num_cells = num_cells
        self.p_keep = float(p_keep)
        self.similarity = similarity
        self._similarity_fn = resolve_similarity(similarity)
        self.seed = seed
        self.autocast = autocast

    def __repr__(self) -> str:
        return (
            f"RELAX(n_masks={self.n_masks}, batch_size={self.batch_size}, num_cells={self.num_cells},"
            f" p_keep={self.p_keep}, similarity={self.similarity!r}, seed={self.seed})"
        )

    def mask_parameters(self) -> MaskParameters:
        """The grids and shifts of the masks :meth:`explain` uses (fresh ones each call if ``seed`` is None)."""
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return draw_mask_parameters(self.n_masks, self.num_cells, self.p_keep, gen)

    def masks(self, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
        """All masks at once, ``[n_masks, 1, H, W]`` (for inspection; :meth:`explain` renders them in chunks)."""
        return render_masks(self.mask_parameters(), height, width, device=device)

    def similarities(self, x: Tensor, masks: Tensor) -> Tensor:
        """Similarity of each image to each of its masked copies, ``[B, N]`` (or ``[N]`` for one image).

        The building block of :meth:`explain`, exposed so the estimators can be checked against the
        batch formulas (:func:`~lightning_influence.representations.relax.weighted_mean`).
        """
        xb, single = as_image_batch(x)
        with eval_mode(self.encoder), torch.no_grad():
            ref = encode(self.encoder, xb, autocast=self.autocast)
            scores = self._scores(xb, ref, masks.to(xb.device))
        return scores[0] if single else scores

    def _scores(self, x: Tensor, ref: Tensor, masks: Tensor) -> Tensor:
        b, m = x.shape[0], masks.shape[0]
        masked = (x.unsqueeze(1) * masks.unsqueeze(0).to(x.dtype)).reshape(b * m, *x.shape[1:])
        rep = encode(self.encoder, masked, autocast=self.autocast)
        if rep.shape[1] != ref.shape[1]:
            raise ValueError(
                f"`encoder` returned representations of size {rep.shape[1]} for masked images but {ref.shape[1]}"
                " for the original ones."
            )
        scores = self._similarity_fn(ref.repeat_interleave(m, dim=0), rep)
        if not isinstance(scores, Tensor) or scores.shape != (b * m,):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"`similarity` must return one score per pair, Tensor[{b * m}]; got {got}.")
        if not torch.isfinite(scores).all():
            raise ValueError("`similarity` returned non-finite scores (inf/NaN); RELAX cannot average them.")
        return scores.float().reshape(b, m)

    def explain(self, x: Tensor) -> Explanation:
        """Explain the representation of one image ``[C, H, W]`` or of a batch ``[B, C, H, W]``.

        Runs on ``x``'s device; memory holds one chunk of ``batch_size`` masked images and the
        ``O(B H W)`` running statistics, whatever ``n_masks``.

        Returns:
            :class:`Explanation` with maps ``[H, W]`` (one image) or ``[B, H, W]``, float32 on ``x.device``.

        Raises:
            TypeError: if ``x`` is not a floating tensor, or the encoder does not return one tensor.
            ValueError: if ``x`` is not of rank 3 or 4, or the encoder's output is malformed or not finite.
        """
        xb, single = as_image_batch(x)
        b, _, h, w = xb.shape
        params = self.mask_parameters()
        per_call = max(1, self.batch_size // b)
        online = OnlineWeightedMoments()
        with eval_mode(self.encoder), torch.no_grad():
            ref = encode(self.encoder, xb, autocast=self.autocast)
            if self.similarity == "cosine":
                zero = (torch.linalg.vector_norm(ref, dim=1) == 0).nonzero().flatten().tolist()
                if zero:
                    raise ValueError(
                        f"The representation of image(s) {zero[:5]} is the zero vector, for which cosine similarity"
                        " is undefined; use similarity='dot' or 'euclidean', or check the encoder."
                    )
            for start in range(0, self.n_masks, per_call):
                chunk = params.slice(start, min(start + per_call, self.n_masks))
                masks = render_masks(chunk, h, w, device=xb.device)
                online.update(self._scores(xb, ref, masks), masks[:, 0])
        importance, uncertainty = online.mean.float(), online.variance.float()
        weights = online.sum_of_weights.float()
        self._warn_undefined(weights)
        u = u_relax(importance, uncertainty)
        if single:
            importance, uncertainty, u = importance[0], uncertainty[0], u[0]
        return Explanation(importance, uncertainty, u, weights, self.n_masks)

    def _warn_undefined(self, weights: Tensor) -> None:
        n_bad = int((weights <= 1).sum())
        if n_bad:
            rank_zero_warn(
                f"RELAX: {n_bad} of {weights.numel()} pixels have a total mask weight <= 1 after {self.n_masks} masks,"
                " so their uncertainty (and, at weight 0, their importance) is undefined and set to NaN."
                " Use more masks (`n_masks`) or a larger `p_keep`."
            )

    def gradient_baseline(self, x: Tensor) -> Tensor:
        """The paper's gradient baseline for the same encoder.

        See :func:`~lightning_influence.representations.relax.representation_saliency`.
        """
        return representation_saliency(self.encoder, x, autocast=self.autocast)


def hoeffding_masks(tolerance: float, confidence: float = 0.95, score_range: float = 2.0) -> int:
    """Masks needed so that an unweighted mean of scores in a range of width ``score_range`` is within
    ``tolerance`` of its expectation with probability ``confidence`` (Hoeffding): ``N >= r^2 ln(2/(1-c)) / (2 t^2)``."""
    if tolerance <= 0 or not 0 < confidence < 1:
        raise ValueError(f"`tolerance` must be > 0 and `confidence` in (0, 1), got {tolerance}, {confidence}.")
    return math.ceil(score_range**2 * math.log(2 / (1 - confidence)) / (2 * tolerance**2))
