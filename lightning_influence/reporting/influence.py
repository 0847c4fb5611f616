"""TensorBoard views of TracIn results: a figure per query, a self-influence gallery, plots and tables.

Views take results (:class:`~lightning_influence.trajectory.analysis.InfluenceSummary`), never the
objects that compute them::

    summary = analysis.summary(queries, k=8)
    log_influence(trainer, summary, queries, train_data=dm.train_set, losses=per_sample_losses)

What is written under ``tag`` (default ``influence``):

- ``query_{q}``: the query outlined in blue; its ``k`` proponents (green) and ``k`` opponents
  (red) in two labelled rows, each tile titled with training index, label and score;
- ``highest_self_influence``: the training samples with the highest self-influence (orange
  frames), titled with index, label and score;
- ``self_influence`` (histogram) and ``self_influence_hist`` (figure), ``self_influence_median``;
- ``self_influence_vs_loss``: self-influence against per-sample loss, coloured by label (with
  ``losses``);
- ``summary``: markdown tables of every query's proponents and opponents with labels, and the
  self-influence per class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from lightning_influence.data.batches import batch_inputs, batch_labels, gather_samples, num_samples
from lightning_influence.fragility.metrics import spearman
from lightning_influence.reporting.figures import gallery_figure, query_figure
from lightning_influence.reporting.tensorboard import as_images, get_summary_writer, writer_step
from lightning_influence.trajectory.analysis import InfluenceSummary

__all__ = ["influence_figures", "influence_table", "log_embedding", "log_influence", "self_influence_figures"]


def _images_and_labels(
    data: Any, indices: list[int], image_fn: Callable[[Any], Tensor] | None
) -> tuple[Tensor, list[int] | None]:
    batch = gather_samples(data, indices)
    x = image_fn(batch) if image_fn is not None else batch_inputs(batch)
    return as_images(x), _labels(batch)


def _labels(batch: Any) -> list[int] | None:
    """The batch's integer labels, or ``None`` for data without labels."""
    try:
        y = batch_labels(batch)
    except ValueError:
        return None
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point():
        return None
    return [int(v) for v in y]


def _label_text(labels: list[int] | None, i: int) -> str:
    return f" y={labels[i]}" if labels is not None else ""


def _tile_titles(indices: list[int], scores: list[float], labels: list[int] | None) -> list[str]:
    return [f"#{idx}{_label_text(labels, j)}\n{s:+.3g}" for j, (idx, s) in enumerate(zip(indices, scores))]


def influence_figures(
    summary: InfluenceSummary,
    queries: Any,
    train_data: Any,
    *,
    n_self: int = 16,
    image_fn: Callable[[Any], Tensor] | None = None,
) -> dict[str, Figure]:
    """The image views of a summary: ``query_{q}`` per query and ``highest_self_influence``.

    Args:
        summary: from :meth:`~lightning_influence.InfluenceAnalysis.summary` on ``queries``.
        queries: the explained test samples.
        train_data: the recorded training data.
        n_self: samples in the self-influence gallery.
        image_fn: maps a collated batch to images (default: the batch's input tensor).
    """
    figs: dict[str, Figure] = {}
    n_queries = num_samples(queries, "queries")
    q_images, q_labels = _images_and_labels(queries, list(range(n_queries)), image_fn)
    for q in range(n_queries):
        parts = []
        for top in (summary.proponents, summary.opponents):
            keep = top.indices[q] >= 0
            idx = top.indices[q][keep].tolist()
            scores = top.scores[q][keep].tolist()
            images, labels = _images_and_labels(train_data, idx, image_fn)
            parts += [images, _tile_titles(idx, scores, labels)]
        figs[f"query_{q}"] = query_figure(
            q_images[q],
            f"query {q}{_label_text(q_labels, q)}",
            *parts,
            suptitle=f"Query {q}: strongest proponents (training lowered its loss) and opponents (TracIn score)",
        )
    self_inf = summary.self_influence
    order = torch.argsort(torch.nan_to_num(self_inf, nan=float("-inf")), descending=True)
    top_self = order[: min(n_self, len(order))].tolist()
    images, labels = _images_and_labels(train_data, top_self, image_fn)
    figs["highest_self_influence"] = gallery_figure(
        images,
        _tile_titles(top_self, [float(self_inf[i]) for i in top_self], labels),
        suptitle=(
            "The training sample with the highest self-influence (index, label, score)"
            if len(top_self) == 1
            else f"The {len(top_self)} training samples with the highest self-influence (index, label, score)"
        ),
    )
    return figs


def self_influence_figures(
    self_influence: Tensor, *, losses: Tensor | None = None, labels: Tensor | None = None
) -> dict[str, Figure]:
    """``self_influence_hist`` and, with ``losses``, ``self_influence_vs_loss`` (coloured by label)."""
    si = self_influence.detach().float().cpu().numpy()
    finite = np.isfinite(si)
    figs: dict[str, Figure] = {}
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    values = si[finite]
    positive = values.size and (values > 0).all()
    bins = np.geomspace(values.min(), values.max(), 40) if positive and values.max() > values.min() else 40
    ax.hist(values, bins=bins, color="tab:orange", edgecolor="white")
    if positive:
        ax.set_xscale("log")
    ax.axvline(float(np.median(values)), color="k", ls="--", lw=1, label=f"median {np.median(values):.3g}")
    ax.set_xlabel("self-influence (sum_c eta_c |grad l|^2)")
    ax.set_ylabel("training samples")
    ax.set_title(f"Self-influence of {values.size} training samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["self_influence_hist"] = fig
    if losses is not None:
        loss = losses.detach().float().cpu().numpy()
        if loss.shape != si.shape:
            raise ValueError(f"`losses` has shape {loss.shape}; expected one per training sample {si.shape}.")
        fig = Figure(figsize=(6, 4.5), dpi=100)
        ax = fig.subplots()
        keep = finite & np.isfinite(loss)
        if labels is not None:
            lab = labels.detach().cpu().numpy()
            for c in np.unique(lab):
                m = keep & (lab == c)
                ax.scatter(loss[m], si[m], s=8, alpha=0.7, label=str(int(c)), color=f"C{int(c) % 10}")
            ax.legend(title="label", fontsize=7, ncols=2, markerscale=1.5)
        else:
            ax.scatter(loss[keep], si[keep], s=8, alpha=0.7)
        if positive:
            ax.set_yscale("log")
        rank = spearman(si[keep], loss[keep])  # ties share their average rank; NaN when either side is constant
        ax.set_xlabel("per-sample training loss (final weights)")
        ax.set_ylabel("self-influence")
        ax.set_title(f"Self-influence vs loss (Spearman {rank:.2f})")
        fig.tight_layout()
        figs["self_influence_vs_loss"] = fig
    return figs


def influence_table(
    summary: InfluenceSummary,
    *,
    query_labels: list[int] | None = None,
    train_labels: Tensor | None = None,
    n_self: int = 16,
    n_show: int = 5,
) -> str:
    """A markdown summary: per query its proponents and opponents (index, label, score), self-influence per class."""
    self_inf = summary.self_influence
    prop_idx, prop_val = summary.proponents
    opp_idx, opp_val = summary.opponents
    tl = train_labels.tolist() if train_labels is not None else None

    def cell(i: Tensor, v: Tensor) -> str:
        label = f" y={tl[int(i)]}" if tl is not None else ""
        return f"{int(i)}{label} ({float(v):.3g})"

    gradients = f"projected to {summary.projection_dim}" if summary.projection_dim else "exact gradients"
    lines = [
        f"**{summary.n_train} training samples, {summary.n_checkpoints} checkpoints, {gradients}**",
        "",
        "Positive TracIn = proponent (training on it lowered the query's loss). Queries that are training"
        " samples use an independent noise draw.",
        "",
        "| query | label | proponents: index, label (score) | opponents: index, label (score) |",
        "|---|---|---|---|",
    ]
    for q in range(prop_idx.shape[0]):
        props = ", ".join(cell(i, v) for i, v in zip(prop_idx[q][:n_show], prop_val[q][:n_show]) if int(i) >= 0)
        opps = ", ".join(cell(i, v) for i, v in zip(opp_idx[q][:n_show], opp_val[q][:n_show]) if int(i) >= 0)
        label = str(query_labels[q]) if query_labels is not None else "-"
        lines.append(f"| {q} | {label} | {props} | {opps} |")
    order = torch.argsort(torch.nan_to_num(self_inf, nan=float("-inf")), descending=True)
    top = order[: min(n_self, len(order))]
    lines += ["", "Highest self-influence: " + ", ".join(cell(i, self_inf[i]) for i in top[:10])]
    if train_labels is not None:
        lines += [
            "",
            f"| class | samples | median self-influence | among the top {len(top)} |",
            "|---|---|---|---|",
        ]
        in_top = train_labels[top]
        for c in torch.unique(train_labels).tolist():
            m = train_labels == c
            med = float(torch.nanmedian(self_inf[m]))  # flagged (NaN) samples have no value to count
            lines.append(f"| {c} | {int(m.sum())} | {med:.3g} | {int((in_top == c).sum())} |")
    return "\n".join(lines)


def _all_labels(data: Any) -> Tensor | None:
    n = num_samples(data, "train_data")
    labels = _labels(gather_samples(data, list(range(n))))
    return torch.tensor(labels) if labels is not None else None


def log_influence(
    trainer_or_logger: Any,
    summary: InfluenceSummary,
    queries: Any,
    *,
    train_data: Any = None,
    losses: Tensor | None = None,
    n_self: int = 16,
    image_fn: Callable[[Any], Tensor] | None = None,
    tag: str = "influence",
    step: int | None = None,
) -> None:
    """Log the influence views (see the module docstring) to TensorBoard.

    Args:
        trainer_or_logger: a Trainer with a ``TensorBoardLogger``, the logger, or a ``SummaryWriter``.
        summary: what :meth:`~lightning_influence.InfluenceAnalysis.summary` computed for ``queries``.
        queries: the test samples the summary explains (for their images and labels).
        train_data: the recorded dataset, for images and labels (no image views without it).
        losses: per-sample training loss of every training sample, for the scatter plot.
        n_self: how many highest self-influence samples in the gallery.
        image_fn: maps a collated batch to images ``[N, C, H, W]`` or flat square inputs
            (default: the batch's input tensor).
        tag: tag prefix.
        step: global step (default: the Trainer's, else 0).
    """
    writer = get_summary_writer(trainer_or_logger)
    step = writer_step(trainer_or_logger) if step is None else step
    n_queries = num_samples(queries, "queries")
    if summary.proponents.indices.shape[0] != n_queries:
        raise ValueError(
            f"`summary` explains {summary.proponents.indices.shape[0]} queries but `queries` has {n_queries} samples."
        )
    self_inf = summary.self_influence
    finite = self_inf[torch.isfinite(self_inf)]
    writer.add_histogram(f"{tag}/self_influence", finite, step)
    writer.add_scalar(f"{tag}/self_influence_median", float(finite.median()), step)
    train_labels = _all_labels(train_data) if train_data is not None else None
    query_labels = _labels(gather_samples(queries, list(range(n_queries))))
    figs = self_influence_figures(self_inf, losses=losses, labels=train_labels)
    if train_data is not None:
        figs.update(influence_figures(summary, queries, train_data, n_self=n_self, image_fn=image_fn))
    for name, fig in figs.items():
        writer.add_figure(f"{tag}/{name}", fig, global_step=step, close=True)
    text = influence_table(summary, query_labels=query_labels, train_labels=train_labels, n_self=n_self)
    writer.add_text(f"{tag}/summary", text, step)
    writer.flush()


def log_embedding(
    trainer_or_logger: Any,
    features: Tensor,
    self_influence: Tensor,
    *,
    train_data: Any = None,
    image_fn: Callable[[Any], Tensor] | None = None,
    tag: str = "influence/embedding",
    step: int | None = None,
) -> None:
    """TensorBoard's embedding projector: training samples at ``features``, coloured by self-influence.

    The metadata has the columns ``label`` (when the data has labels), ``self_influence`` and
    ``self_influence_decile`` (0-9, for colouring in the projector's "Color by" menu); with
    ``train_data`` each point shows its image (a sprite).

    Args:
        trainer_or_logger: a Trainer with a ``TensorBoardLogger``, the logger, or a ``SummaryWriter``.
        features: ``[n_train, d]`` coordinates (e.g. the encoder's posterior means).
        self_influence: ``[n_train]`` self-influence scores.
        train_data: the recorded training data (for labels and sprite images).
        image_fn: maps a collated batch to images (default: the batch's input tensor).
        tag: the projector's tag.
        step: global step (default: the Trainer's, else 0).
    """
    writer = get_summary_writer(trainer_or_logger)
    step = writer_step(trainer_or_logger) if step is None else step
    n = int(self_influence.shape[0])
    if features.dim() != 2 or features.shape[0] != n:
        raise ValueError(f"`features` must be [n_train={n}, d], got shape {tuple(features.shape)}.")
    si = torch.nan_to_num(self_influence.detach().float().cpu(), nan=float("-inf"))
    ranks = torch.argsort(torch.argsort(si))
    deciles = (ranks * 10 // max(n, 1)).tolist()
    images, labels = (None, None)
    if train_data is not None:
        images, labels = _images_and_labels(train_data, list(range(n)), image_fn)
    header = (["label"] if labels is not None else []) + ["self_influence", "self_influence_decile"]
    rows = [
        ([str(labels[i])] if labels is not None else []) + [f"{float(self_influence[i]):.6g}", str(deciles[i])]
        for i in range(n)
    ]
    writer.add_embedding(
        features.detach().float().cpu(),
        metadata=rows,
        metadata_header=header,
        label_img=images,
        global_step=step,
        tag=tag,
    )
    writer.flush()
