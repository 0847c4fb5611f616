"""TensorBoard views of TracIn results: histograms, image grids of proponents and opponents, a summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchvision.utils import make_grid

from lightning_influence.batches import gather_samples, num_samples
from lightning_influence.objectives import batch_inputs
from lightning_influence.tensorboard import as_images, get_summary_writer, writer_step

if TYPE_CHECKING:
    from lightning_influence.analysis import InfluenceAnalysis

__all__ = ["log_influence"]


def _images(data: Any, indices: list[int], image_fn: Callable[[Any], Tensor] | None) -> Tensor:
    batch = gather_samples(data, indices)
    x = image_fn(batch) if image_fn is not None else batch_inputs(batch)
    return as_images(x)


def log_influence(
    analysis: InfluenceAnalysis,
    trainer_or_logger: Any,
    test_data: Any,
    *,
    train_data: Any,
    k: int,
    n_queries: int,
    n_self: int,
    image_fn: Callable[[Any], Tensor] | None,
    tag: str,
    unbiased: bool,
) -> dict[str, Tensor]:
    writer = get_summary_writer(trainer_or_logger)
    step = writer_step(trainer_or_logger)
    n_test = num_samples(test_data, "test_data")
    n_queries = min(n_queries, n_test)
    k = min(k, analysis.store.n_samples)
    queries = gather_samples(test_data, list(range(n_queries)))

    self_inf = analysis.self_influence(unbiased=unbiased, train_data=train_data)
    (prop_idx, prop_val), (opp_idx, opp_val) = analysis.ranked(queries, k, largest=(True, False))

    finite = self_inf[torch.isfinite(self_inf)]
    writer.add_histogram(f"{tag}/self_influence", finite, step)
    writer.add_scalar(f"{tag}/self_influence_median", float(finite.median()), step)
    order = torch.argsort(torch.nan_to_num(self_inf, nan=float("-inf")), descending=True)
    top_self = order[: min(n_self, len(order))].tolist()

    lines = [
        f"**{analysis.store.n_samples} training samples, {len(analysis.store)} checkpoints,"
        f" {'projected to ' + str(analysis.store.dim) if analysis.store.projection_spec else 'exact gradients'}**",
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
        query_images = as_images(image_fn(queries) if image_fn is not None else batch_inputs(queries))
        for q in range(n_queries):
            for name, idx in (("proponents", prop_idx[q]), ("opponents", opp_idx[q])):
                row = torch.cat([query_images[q : q + 1], _images(train_data, idx[idx >= 0].tolist(), image_fn)])
                writer.add_image(f"{tag}/query_{q}/{name}", make_grid(row, nrow=k + 1, pad_value=1), step)
    writer.flush()
    return {
        "self_influence": self_inf,
        "proponents": prop_idx,
        "proponent_scores": prop_val,
        "opponents": opp_idx,
        "opponent_scores": opp_val,
    }
