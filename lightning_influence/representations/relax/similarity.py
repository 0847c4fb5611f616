"""Similarities between the representation of an image and those of its masked copies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Similarity", "SimilarityFn", "resolve_similarity"]

Similarity = Literal["cosine", "dot", "euclidean"]
#: ``fn(reference [N, D], masked [N, D]) -> Tensor[N]``; larger means more similar.
SimilarityFn = Callable[[Tensor, Tensor], Tensor]


def _cosine(h: Tensor, g: Tensor) -> Tensor:
    return F.cosine_similarity(h, g, dim=1, eps=1e-12)


def _dot(h: Tensor, g: Tensor) -> Tensor:
    return (h * g).sum(dim=1)


def _neg_euclidean(h: Tensor, g: Tensor) -> Tensor:
    return -torch.linalg.vector_norm(h - g, dim=1)


_BUILTIN: dict[str, SimilarityFn] = {"cosine": _cosine, "dot": _dot, "euclidean": _neg_euclidean}


def resolve_similarity(similarity: Union[Similarity, SimilarityFn], argname: str = "similarity") -> SimilarityFn:
    """The similarity function for a name or a callable.

    Names: ``"cosine"``, ``"dot"``, ``"euclidean"`` (the negative distance).
    """
    if isinstance(similarity, str):
        if similarity not in _BUILTIN:
            raise ValueError(f"`{argname}` must be one of {sorted(_BUILTIN)} or a callable, got {similarity!r}.")
        return _BUILTIN[similarity]
    if callable(similarity):
        return similarity
    raise TypeError(f"`{argname}` must be a name or a callable(reference, masked) -> Tensor[N], got {similarity!r}.")
