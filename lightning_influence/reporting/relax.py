"""Heatmaps of RELAX maps over their images, as matplotlib figures and TensorBoard entries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from lightning_influence.reporting.figures import INPUT
from lightning_influence.reporting.tensorboard import as_images, get_summary_writer, writer_step
from lightning_influence.representations.relax.encoders import as_image_batch
from lightning_influence.representations.relax.explainer import Explanation

__all__ = ["heatmap_images", "log_relax", "map_figure", "overlay_figure"]

_MAPS = ("importance", "uncertainty", "u_relax")
_TITLES = {"importance": "importance", "uncertainty": "uncertainty", "u_relax": "U-RELAX"}


def _to_numpy_image(img: Tensor) -> Any:
    img = img.detach().float().cpu()
    return img[0].numpy() if img.shape[0] == 1 else img[:3].permute(1, 2, 0).numpy()


def overlay_figure(
    images: Tensor,
    maps: dict[str, Tensor],
    *,
    max_images: int = 8,
    cmap: str = "jet",
    alpha: float = 0.5,
    row_titles: Sequence[str] | None = None,
    transpose: bool = False,
    marked: Sequence[int] | None = None,
) -> Figure:
    """A matplotlib figure: one row per image, the image then each map overlaid on it.

    Args:
        images: ``[B, C, H, W]`` (or one ``[C, H, W]``), any range (min-max scaled per image).
        maps: column title -> ``[B, H, W]`` (or ``[H, W]``) heatmaps; NaN pixels are left transparent.
        max_images: rows at most.
        cmap: matplotlib colormap of the heatmaps.
        alpha: opacity of the heatmaps.
        row_titles: optional label per image.
        transpose: one column per image instead (images side by side).
        marked: which images are inputs, framed in blue (default: all).

    Returns:
        ``matplotlib.figure.Figure`` (backend-independent; no pyplot state).
    """
    xb, _ = as_image_batch(images, "images")
    shown = as_images(xb)[:max_images]
    cols = {k: (v.unsqueeze(0) if v.dim() == 2 else v).detach().float().cpu() for k, v in maps.items()}
    for k, v in cols.items():
        if v.shape[0] < shown.shape[0] or v.shape[-2:] != shown.shape[-2:]:
            raise ValueError(f"map {k!r} has shape {tuple(v.shape)}, which does not match images {tuple(xb.shape)}.")
    n_images, n_panels = shown.shape[0], 1 + len(cols)
    n_rows, n_cols = (n_panels, n_images) if transpose else (n_images, n_panels)
    fig = Figure(figsize=(2.2 * n_cols, 2.2 * n_rows), dpi=80)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)

    def ax_at(image: int, panel: int) -> Any:
        return axes[panel][image] if transpose else axes[image][panel]

    gray = "gray" if shown.shape[1] == 1 else None
    for r in range(n_images):
        img = _to_numpy_image(shown[r])
        ax_at(r, 0).imshow(img, cmap=gray)
        ax_at(r, 0).set_title("input" if row_titles is None else row_titles[r], fontsize=8)
        for c, (name, m) in enumerate(cols.items(), start=1):
            ax = ax_at(r, c)
            ax.imshow(img, cmap=gray)
            im = ax.imshow(m[r].numpy(), cmap=cmap, alpha=alpha)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            if r == 0 or transpose:
                ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    for r in range(n_images) if marked is None else marked:
        _mark_input(ax_at(r, 0))
    fig.tight_layout()
    return fig


def _mark_input(ax: Any) -> None:
    """Frame the input panel in blue so it cannot be mistaken for a map."""
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(INPUT)
        spine.set_linewidth(4)


def map_figure(images: Tensor, maps: Tensor, name: str, *, max_images: int = 8, cmap: str = "viridis") -> Figure:
    """One row per image: the input (outlined, titled "input") and the raw map with its colour bar.

    Args:
        images: ``[B, C, H, W]`` (or one ``[C, H, W]``), any range.
        maps: ``[B, H, W]`` (or ``[H, W]``) values; NaN pixels are left blank.
        name: what the map is (panel titles).
        max_images: rows at most.
        cmap: colormap of the map.
    """
    xb, _ = as_image_batch(images, "images")
    shown = as_images(xb)[:max_images]
    m = (maps.unsqueeze(0) if maps.dim() == 2 else maps).detach().float().cpu()
    if m.shape[0] < shown.shape[0] or m.shape[-2:] != shown.shape[-2:]:
        raise ValueError(f"`maps` has shape {tuple(m.shape)}, which does not match images {tuple(xb.shape)}.")
    n = shown.shape[0]
    fig = Figure(figsize=(5.0, 2.3 * n), dpi=80)
    axes = fig.subplots(n, 2, squeeze=False)
    gray = "gray" if shown.shape[1] == 1 else None
    for r in range(n):
        axes[r][0].imshow(_to_numpy_image(shown[r]), cmap=gray, interpolation="nearest")
        axes[r][0].set_title(f"input {r}", fontsize=9)
        _mark_input(axes[r][0])
        im = axes[r][1].imshow(m[r].numpy(), cmap=cmap, interpolation="nearest")
        axes[r][1].set_title(f"{name} {r}", fontsize=9)
        axes[r][1].set_axis_off()
        fig.colorbar(im, ax=axes[r][1], fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def heatmap_images(maps: Tensor) -> Tensor:
    """Heatmaps ``[B, H, W]`` as min-max scaled grey images ``[B, 1, H, W]`` in [0, 1] (NaN -> 0)."""
    m = (maps.unsqueeze(0) if maps.dim() == 2 else maps).detach().float().cpu()
    finite = torch.isfinite(m)
    lo = torch.where(finite, m, torch.full_like(m, float("inf"))).amin(dim=(1, 2), keepdim=True)
    hi = torch.where(finite, m, torch.full_like(m, float("-inf"))).amax(dim=(1, 2), keepdim=True)
    lo, hi = torch.where(torch.isfinite(lo), lo, 0.0), torch.where(torch.isfinite(hi), hi, 0.0)
    out = torch.where(finite, (m - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(m)).clamp(0, 1)
    return out.unsqueeze(1)


def log_relax(
    trainer_or_logger: Any,
    images: Tensor,
    explanation: Explanation,
    *,
    tag: str = "relax",
    step: int | None = None,
    max_images: int = 8,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> None:
    """Log RELAX overlays (importance, uncertainty, U-RELAX) for a batch of images to TensorBoard.

    Writes a figure ``{tag}/overlay`` (one row per image: the input outlined in blue, then each map
    overlaid with its colour bar; U-RELAX's dropped pixels transparent) and one figure per raw map
    ``{tag}/{importance,uncertainty,u_relax}`` (input and map side by side, titled, with a colour bar).

    Args:
        trainer_or_logger: a Trainer with a ``TensorBoardLogger``, the logger, or a ``SummaryWriter``.
        images: the explained images ``[B, C, H, W]`` (or one ``[C, H, W]``).
        explanation: from :meth:`RELAX.explain` on ``images``.
        tag: TensorBoard tag prefix.
        step: global step (default: the trainer's, else 0).
        max_images: images shown at most.
        cmap: heatmap colormap.
        alpha: heatmap opacity.
    """
    writer = get_summary_writer(trainer_or_logger)
    step = writer_step(trainer_or_logger) if step is None else step
    if not isinstance(explanation, Explanation):
        raise TypeError(f"`explanation` must be an Explanation (from RELAX.explain), got {type(explanation).__name__}.")
    maps = {_TITLES[k]: getattr(explanation, k) for k in _MAPS}
    # Show U-RELAX's dropped (uncertain) pixels as transparent rather than as importance 0.
    imp, unc = explanation.importance, explanation.uncertainty
    median = unc.flatten(-2).nanmedian(dim=-1).values[..., None, None]
    maps[_TITLES["u_relax"]] = torch.where(unc <= median, imp, torch.full_like(imp, float("nan")))
    fig = overlay_figure(images, maps, max_images=max_images, cmap=cmap, alpha=alpha)
    writer.add_figure(f"{tag}/overlay", fig, global_step=step, close=True)
    for k in _MAPS:
        fig = map_figure(images, maps[_TITLES[k]], _TITLES[k], max_images=max_images)
        writer.add_figure(f"{tag}/{k}", fig, global_step=step, close=True)
    writer.flush()
