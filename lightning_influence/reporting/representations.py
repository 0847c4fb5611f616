"""TensorBoard views of the supervised VAE's invariances: sample grids, metrics, attribution maps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_influence.reporting.figures import grid_figure
from lightning_influence.reporting.relax import overlay_figure
from lightning_influence.reporting.tensorboard import as_images, get_summary_writer, writer_step
from lightning_influence.representations.invariances import AttributionPanel, InvarianceGrids

__all__ = ["log_invariances"]


def log_invariances(
    trainer_or_logger: Any,
    grids: InvarianceGrids,
    *,
    metrics: Mapping[str, float] | None = None,
    attributions: AttributionPanel | None = None,
    label: int | None = None,
    step: int | None = None,
    tag: str = "supervised_vae",
) -> None:
    """Log invariance and variation grids, metrics (scalars and a text summary) and attributions.

    Figures ``{tag}/invariances`` and ``{tag}/variations`` have one row per input: the input
    (outlined in blue, column "input"), its reconstruction from the mean, then the samples, each
    tile at least 64 px with its column titled. ``{tag}/attributions`` overlays the
    classifier's attribution maps on the first input (outlined in blue) and its invariance samples.

    Args:
        trainer_or_logger: a Trainer with a ``TensorBoardLogger``, the logger, or a ``SummaryWriter``.
        grids: from :func:`~lightning_influence.representations.invariances.invariance_grids`.
        metrics: e.g. from :func:`~lightning_influence.representations.invariances.invariance_metrics`;
            logged as ``{tag}/{name}`` scalars and a table.
        attributions: from :func:`~lightning_influence.representations.invariances.attribution_panel`.
        label: the attributed input's label, shown in its title.
        step: global step (default: the trainer's, else 0).
        tag: tag prefix.
    """
    writer = get_summary_writer(trainer_or_logger)
    step = writer_step(trainer_or_logger) if step is None else step
    resampled = {"invariances": ("z_n", "same class: z_n from the prior"), "variations": ("z_s", "z_s resampled")}
    for name, rows in (("invariances", grids.invariances), ("variations", grids.variations)):
        r, c = int(rows.shape[0]), int(rows.shape[1])
        tiles = as_images(rows.reshape(r * c, *rows.shape[2:]).float().clamp(0, 1))
        tiles = tiles.reshape(r, c, *tiles.shape[1:])
        latent, what = resampled[name]
        titles = ["input", "reconstruction"] + [f"{latent} sample {i + 1}" for i in range(c - 2)]
        fig = grid_figure(tiles, titles, marked_column=0, suptitle=f"{name.capitalize()} ({what})")
        writer.add_figure(f"{tag}/{name}", fig, global_step=step, close=True)
    if metrics:
        for key, value in metrics.items():
            writer.add_scalar(f"{tag}/{key}", float(value), global_step=step)
        table = "\n".join(f"| {k} | {float(v):.4f} |" for k, v in metrics.items())
        writer.add_text(f"{tag}/summary", "| metric | value |\n|---|---|\n" + table, global_step=step)
    if attributions is not None:
        pred = attributions.predictions
        titles = ["input" + (f" (y={label})" if label is not None else "")]
        titles += [f"z_n sample {i + 1}" for i in range(len(pred) - 1)]
        titles = [f"{t}: pred {p}" for t, p in zip(titles, pred)]
        fig = overlay_figure(
            attributions.images,
            {attributions.method: attributions.maps},
            max_images=attributions.images.shape[0],
            row_titles=titles,
            transpose=True,
            marked=[0],  # the input; the others are samples generated from it
        )
        writer.add_figure(f"{tag}/attributions", fig, global_step=step, close=True)
    writer.flush()
