"""TracIn scores as pure tensor functions.

Sign convention: a positive score means the training sample is a *proponent* of the test
sample: a gradient step on it lowered the test loss, and removing it is predicted to raise it.

.. math::
    \\mathrm{TracIn}(z, z') = \\sum_c \\eta_c \\,\\langle \\nabla \\ell(\\theta_c, z),\\, \\nabla \\ell(\\theta_c, z') \\rangle

Scores accumulate in fp32 (or the dtype of the query) whatever the storage dtype. Rows may be
tensors or, for a store with exact factored storage,
:class:`~lightning_influence.gradients.split.SplitRows` (a dense part plus layer factors), scored
exactly without materialising the factored blocks where their Gram form is cheaper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Union

import torch
from torch import Tensor

from lightning_influence.gradients.split import SplitRows, split_inner_products, split_rowwise_inner_products

__all__ = [
    "TopK",
    "iter_row_blocks",
    "merge_top_k",
    "self_influence_scores",
    "streaming_top_k",
    "tracin_scores",
]

#: Gradient rows: a ``[n, d]`` tensor or their split form (factored storage).
Rows = Union[Tensor, SplitRows]


def _dense(rows: Rows) -> Tensor:
    return rows.dense if isinstance(rows, SplitRows) else rows


def _width(rows: Rows) -> int:
    return rows.dim if isinstance(rows, SplitRows) else int(rows.shape[1])


def tracin_scores(train_grads: Sequence[Rows], test_grads: Sequence[Rows], etas: Sequence[float]) -> Tensor:
    """TracIn over checkpoints: ``sum_c eta_c * test_c @ train_c.T``.

    With split rows (factored storage) on both sides the product is
    :func:`~lightning_influence.gradients.split.split_inner_products`: the dense parts' product plus,
    per factored parameter, ``sum_{s,t} (g_test_s . g_train_t)(a_test_s . a_train_t)``.

    Args:
        train_grads: per checkpoint, training gradient rows ``[n_train, d]`` (any float dtype), or
            :class:`~lightning_influence.gradients.split.SplitRows`.
        test_grads: per checkpoint, test gradient rows ``[n_test, d]`` (split when the training rows are).
        etas: per checkpoint, the learning-rate weight ``eta_c``.

    Returns:
        ``Tensor[n_test, n_train]`` in fp32 (fp64 if the test rows are fp64).

    Example:
        >>> import torch
        >>> g = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
        >>> t = [torch.tensor([[1.0, 1.0]])]
        >>> tracin_scores(g, t, [0.5])
        tensor([[0.5000, 1.0000]])
    """
    if not (len(train_grads) == len(test_grads) == len(etas)):
        raise ValueError(
            f"Expected one train matrix, test matrix and eta per checkpoint; got {len(train_grads)},"
            f" {len(test_grads)}, {len(etas)}."
        )
    if not etas:
        raise ValueError("TracIn needs at least one checkpoint.")
    acc_dtype = torch.float64 if _dense(test_grads[0]).dtype == torch.float64 else torch.float32
    out: Tensor | None = None
    for g, t, eta in zip(train_grads, test_grads, etas):
        if _width(g) != _width(t):
            raise ValueError(f"Train and test gradients differ in width: {_width(g)} vs {_width(t)}.")
        if isinstance(g, SplitRows) or isinstance(t, SplitRows):
            if not (isinstance(g, SplitRows) and isinstance(t, SplitRows)):
                raise ValueError(
                    "Training rows and test rows must both be split (factored storage) or both be tensors; got"
                    f" {type(g).__name__} and {type(t).__name__}."
                )
            s = split_inner_products(t, g).to(acc_dtype)
        else:
            s = t.to(acc_dtype) @ g.to(device=t.device, dtype=acc_dtype).T
        out = eta * s if out is None else out.add_(s, alpha=eta)
    assert out is not None
    return out


def self_influence_scores(
    grads: Sequence[Rows], etas: Sequence[float], second_grads: Sequence[Rows] | None = None
) -> Tensor:
    """Self-influence ``sum_c eta_c <g_c(z), g_c(z)>`` of every row.

    With Monte-Carlo losses (a VAE's ELBO) the squared norm of a noisy gradient estimate is biased
    upward: :math:`E\\|\\hat g\\|^2 = \\|g\\|^2 + \\mathrm{tr}(\\mathrm{Cov}\\,\\hat g)`, so samples whose
    gradient is noisier look more self-influential. Passing ``second_grads`` computed from an
    independent draw set gives the unbiased :math:`\\sum_c \\eta_c \\langle \\hat g_{1,c}, \\hat g_{2,c}\\rangle`.

    Args:
        grads: per checkpoint, rows ``[n, d]`` (or :class:`~lightning_influence.gradients.split.SplitRows`,
            scored row by row with
            :func:`~lightning_influence.gradients.split.split_rowwise_inner_products`).
        etas: per checkpoint weights.
        second_grads: optional, per checkpoint, rows from an independent draw set.

    Returns:
        ``Tensor[n]`` (fp32).

    Example:
        >>> import torch
        >>> self_influence_scores([torch.tensor([[3.0, 4.0]])], [2.0])
        tensor([50.])
    """
    if len(grads) != len(etas) or (second_grads is not None and len(second_grads) != len(grads)):
        raise ValueError("Expected one gradient matrix (and one second-draw matrix) per eta.")
    out: Tensor | None = None
    for c, (g, eta) in enumerate(zip(grads, etas)):
        if isinstance(g, SplitRows):
            other_split = g if second_grads is None else second_grads[c]
            if not isinstance(other_split, SplitRows):
                raise ValueError("`second_grads` must be split rows when `grads` are (factored storage).")
            s = split_rowwise_inner_products(g.to(dtype=torch.float32), other_split.to(g.dense.device, torch.float32))
            s = s * eta
            out = s if out is None else out + s
            continue
        g32 = g.float()
        other = g32 if second_grads is None else second_grads[c].to(device=g.device).float()
        # A row-wise dot product (a batched [1, d] @ [d, 1]): no [n, d] elementwise product.
        s = torch.einsum("nd,nd->n", g32, other) * eta
        out = s if out is None else out + s
    if out is None:
        raise ValueError("Self-influence needs at least one checkpoint.")
    return out


def iter_row_blocks(n_rows: int, block: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(n_rows)`` in blocks of ``block`` rows."""
    if block < 1:
        raise ValueError(f"`block` must be >= 1, got {block}.")
    for start in range(0, n_rows, block):
        yield start, min(start + block, n_rows)


class TopK(NamedTuple):
    """The ``k`` strongest training samples per query, strongest first.

    Attributes:
        indices: ``[n_queries, k]`` training sample ids (``-1`` where fewer than ``k`` scores were finite).
        scores: ``[n_queries, k]`` their scores (NaN in the ``-1`` slots).
    """

    indices: Tensor
    scores: Tensor


def merge_top_k(best: TopK | None, scores: Tensor, indices: Tensor, k: int, largest: bool = True) -> TopK:
    """Merge a new block of candidate scores into a running top-k per row.

    NaN scores (samples whose gradient was non-finite) are never selected: if a row has fewer
    than ``k`` finite scores, the remaining slots hold index ``-1`` and score NaN.

    Args:
        best: the running top-k so far (``[m, <=k]``), or ``None``.
        scores: ``[m, b]`` new scores.
        indices: ``[b]`` (or ``[m, b]``) training indices of the new columns.
        k: how many to keep.
        largest: keep the largest (proponents) or the smallest (opponents).

    Returns:
        :class:`TopK` of shape ``[m, min(k, seen)]``, sorted best first.

    Example:
        >>> import torch
        >>> top = merge_top_k(None, torch.tensor([[1.0, 3.0]]), torch.tensor([0, 1]), k=2)
        >>> top = merge_top_k(top, torch.tensor([[2.0]]), torch.tensor([2]), k=2)
        >>> top.indices.tolist(), top.scores.tolist()
        ([[1, 2]], [[3.0, 2.0]])
    """
    vals, idx = scores, indices
    if idx.dim() == 1:
        idx = idx.unsqueeze(0).expand(vals.shape[0], -1)
    if best is not None:
        vals = torch.cat([best.scores, vals], dim=1)
        idx = torch.cat([best.indices, idx.to(best.indices.device)], dim=1)
    # After the merge: the running top-k's empty slots are NaN too, and topk ranks NaN above everything.
    fill = float("-inf") if largest else float("inf")
    vals = torch.where(torch.isnan(vals), torch.full_like(vals, fill), vals)
    kk = min(k, vals.shape[1])
    top_vals, pos = torch.topk(vals, kk, dim=1, largest=largest, sorted=True)
    top_idx = torch.gather(idx, 1, pos)
    # Slots filled only because NaN was pushed to the end: report them as NaN, index -1.
    filler = top_vals == fill
    if filler.any():
        top_vals = top_vals.masked_fill(filler, float("nan"))
        top_idx = top_idx.masked_fill(filler, -1)
    return TopK(top_idx, top_vals)


def streaming_top_k(
    test_grads: Sequence[Rows],
    train_block: Callable[[int, int, int], Rows],
    etas: Sequence[float],
    n_train: int,
    k: int,
    *,
    block: int,
    largest: Sequence[bool] = (True,),
) -> list[TopK]:
    """Top-``k`` TracIn training samples per query, reading one checkpoint's block of training rows at a time.

    For every block of ``block`` training rows, the scores ``sum_c eta_c test_c @ train_c[block].T``
    accumulate in fp32 over the checkpoints (each block fetched, scored and dropped before the
    next), then merge into the running top-``k``. Memory: the test rows, one training block and
    an ``[n_test, block]`` score block, whatever ``n_train`` and the number of checkpoints.

    Args:
        test_grads: per checkpoint, the test rows ``[n_test, d]`` (on the scoring device).
        train_block: ``train_block(c, start, stop)`` -> training rows ``[stop - start, d]`` of
            checkpoint ``c`` (any float dtype; moved to the test rows' device).
        etas: per checkpoint weights.
        n_train: training rows per checkpoint.
        k: how many per query.
        block: training rows per block.
        largest: one entry per result, ``True`` for proponents, ``False`` for opponents.

    Returns:
        One :class:`TopK` (``[n_test, k]``, strongest first) per ``largest`` entry.

    Example:
        >>> import torch
        >>> train = [torch.eye(4)]
        >>> top, = streaming_top_k([torch.tensor([[0.0, 3.0, 1.0, 2.0]])], lambda c, a, b: train[c][a:b], [1.0],
        ...                        4, 2, block=3)
        >>> top.indices.tolist()
        [[1, 3]]
    """
    if len(test_grads) != len(etas) or not etas:
        raise ValueError(f"Expected one test matrix per eta (and at least one); got {len(test_grads)}, {len(etas)}.")
    device = _dense(test_grads[0]).device
    best: list[TopK | None] = [None for _ in largest]
    for start, stop in iter_row_blocks(n_train, block):
        scores: Tensor | None = None
        for c, (t, eta) in enumerate(zip(test_grads, etas)):
            s = tracin_scores([train_block(c, start, stop)], [t], [eta])
            scores = s if scores is None else scores.add_(s)
        assert scores is not None
        idx = torch.arange(start, stop, device=device)
        best = [merge_top_k(top, scores, idx, k, largest=lg) for top, lg in zip(best, largest)]
    return [top for top in best if top is not None]
