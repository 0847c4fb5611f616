"""TensorBoard views of TracIn results: histograms, image grids of proponents and opponents, a summary.

Views take results (:class:`~lightning_influence.trajectory.analysis.InfluenceSummary`), never the
objects that compute them::

    summary = analysis.summary(queries, k=8)
    log_influence(trainer, summary, queries, train_data=dm.train_set)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid

from lightning_influence.data.batches import batch_inputs, gather_samples, num_samples
from lightning_influence.reporting.tensorboard import as_images, get_summary_writer, writer_step
from lightning_influence.trajectory.analysis import InfluenceSummary

__all__ = ["log_influence"]


def _images(data: Any, indices: list[int], image_fn: Callable[[Any], Tensor] | None) -> Tensor:
    batch = gather_samples(data, indices)
    x = image_fn(batch) if image_fn is not None else batch_inputs(batch)
    return as_images(x)


def log_influence(
    trainer_or_logger: Any,
    summary: InfluenceSummary,
    queries: Any,
    *,
    train_data: Any = None,
    n_self: int = 16,
    image_fn: Callable[[Any], Tensor] | None = None,
    tag: str = "influence",
) -> None:
    """Log self-influence, proponents and opponents to TensorBoard.

    Writes under ``tag``: a self-influence histogram and median, the highest self-influence
    training images, per query an image row ``[query | proponents]`` and ``[query | opponents]``,
    and a markdown summary.

    Args:
        trainer_or_logger: a Trainer with a ``TensorBoardLogger``, the logger, or a ``SummaryWriter``.
        summary: what :meth:`~lightning_influence.InfluenceAnalysis.summary` computed for ``queries``.
        queries: the test samples the summary explains (for their images).
        train_data: the recorded dataset, for images (none are logged without it).
        n_self: how many highest self-influence images.
        image_fn: maps a collated batch to images ``[N, C, H, W]`` or flat square inputs
            (default: the batch's input tensor).
        tag: tag prefix.
    """
    writer = get_summary_writer(trainer_or_logger)
    step = writer_step(trainer_or_logger)
    n_queries = num_samples(queries, "queries")
    if summary.proponents.indices.shape[0] != n_queries:
        raise ValueError(
            f"`summary` explains {summary.proponents.indices.shape[0]} queries but `queries` has {n_queries} samples."
        )
    self_inf = summary.self_influence
    prop_idx, prop_val = summary.proponents
    opp_idx, opp_val = summary.opponents
    k = prop_idx.shape[1]

    finite = self_inf[torch.isfinite(self_inf)]
    writer.add_histogram(f"{tag}/self_influence", finite, step)
    writer.add_scalar(f"{tag}/self_influence_median", float(finite.median()), step)
    order = torch.argsort(torch.nan_to_num(self_inf, nan=float("-inf")), descending=True)
    top_self = order[: min(n_self, len(order))].tolist()

    gradients = f"projected to {summary.projection_dim}" if summary.projection_dim else "exact gradients"
    lines = [
        f"**{summary.n_train} training samples, {summary.n_checkpoints} checkpoints, {gradients}**",
        "",
        "Positive TracIn = proponent (training on it lowered the query's loss).",
        "",
        "| query | proponents (score) | opponents (score) |",
        "|---|---|---|",
    ]
    for q in range(n_queries):
        props = ", ".join(f"{int(i)} ({float(v):.3g})" for i, v in zip(prop_idx[q][:5], prop_val[q][:5]))
        opps = ", ".join(f"{int(i)} ({float(v):.3g})" for i, v in zip(opp_idx[q][:5], opp_val[q][:5]))
        lines.append(f"| {q} | {props} | {opps} |")
    lines += ["", "Highest self-influence: " + ", ".join(f"{i} ({float(self_inf[i]):.3g})" for i in top_self[:10])]
    writer.add_text(f"{tag}/summary", "\n".join(lines), step)

    if train_data is not None:
        writer.add_image(
            f"{tag}/highest_self_influence",
            make_grid(_images(train_data, top_self, image_fn), nrow=8, pad_value=1),
            step,
        )
        batch = gather_samples(queries, list(range(n_queries)))
        query_images = as_images(image_fn(batch) if image_fn is not None else batch_inputs(batch))
        for q in range(n_queries):
            for name, idx in (("proponents", prop_idx[q]), ("opponents", opp_idx[q])):
                row = torch.cat([query_images[q : q + 1], _images(train_data, idx[idx >= 0].tolist(), image_fn)])
                writer.add_image(f"{tag}/query_{q}/{name}", make_grid(row, nrow=k + 1, pad_value=1), step)
    writer.flush()
