"""Readable image tiles as matplotlib figures: upscaled, framed in a colour that says what they are, titled.

Every figure is a ``matplotlib.figure.Figure`` built directly (no pyplot, no global backend state).
Tiles are drawn at ``TILE_PX`` pixels or more with nearest-neighbour upscaling, so an 8x8 digit
is readable, and each tile is framed in a colour of its role:

- ``QUERY`` (blue, thicker): the test sample being explained;
- ``PROPONENT`` (green) and ``OPPONENT`` (red): training samples by the sign of their score;
- ``SAMPLE`` (orange): training samples in a gallery (e.g. highest self-influence);
- ``INPUT`` (blue): the input column of an invariance grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.textpath import TextPath
from torch import Tensor

__all__ = [
    "DPI",
    "INPUT",
    "OPPONENT",
    "PROPONENT",
    "QUERY",
    "SAMPLE",
    "TILE_PX",
    "gallery_figure",
    "grid_figure",
    "query_figure",
    "tile_array",
]

#: Figure resolution (pixels per inch).
DPI = 100
#: Side of an image tile in pixels (at least 64, whatever the image's native size).
TILE_PX = 96
QUERY = "#1f77b4"
INPUT = QUERY
PROPONENT = "#2ca02c"
OPPONENT = "#d62728"
SAMPLE = "#ff7f0e"

_TILE_IN = TILE_PX / DPI
_TITLE_IN = 0.42  # two lines of 7-pt text above each tile
_GAP_IN = 0.14
_LABEL_IN = 0.3  # left margin for row labels
_SUPTITLE_PT = 9


def tile_array(img: Tensor) -> tuple[Any, str | None]:
    """A ``[C, H, W]`` image in [0, 1] as an array for ``imshow`` and its colormap (grey for one channel)."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        return img[0].numpy(), "gray"
    return img[:3].permute(1, 2, 0).numpy(), None


def _frame(ax: Any, color: str, width: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(color)
        spine.set_linewidth(width)


def _draw_tile(fig: Figure, rect: Sequence[float], img: Tensor, title: str, color: str, width: float = 3.0) -> Any:
    ax = fig.add_axes(rect)
    arr, cmap = tile_array(img)
    ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    _frame(ax, color, width)
    ax.set_title(title, fontsize=7, pad=3, linespacing=1.1)
    return ax


class _Grid:
    """Fixed tile geometry in inches, so every tile is exactly ``TILE_PX`` pixels wide and tall.

    A ``suptitle`` wider than the tiles widens the figure (tiles centred) instead of being clipped.
    """

    def __init__(self, n_rows: int, n_cols: int, left: float, suptitle: str | None = None) -> None:
        self.n_rows, self.n_cols, self.left, self.suptitle = n_rows, n_cols, left, suptitle
        self.top = 0.35 if suptitle else 0.1
        width = left + n_cols * (_TILE_IN + _GAP_IN) + _GAP_IN
        needed = _text_width_in(suptitle, _SUPTITLE_PT) + 2 * _GAP_IN if suptitle else 0.0
        self.pad = max(0.0, needed - width) / 2
        self.width = width + 2 * self.pad
        self.height = self.top + n_rows * (_TITLE_IN + _TILE_IN + _GAP_IN)

    def rect(self, row: int, col: int) -> list[float]:
        x = self.pad + self.left + _GAP_IN + col * (_TILE_IN + _GAP_IN)
        y_top = self.top + row * (_TITLE_IN + _TILE_IN + _GAP_IN) + _TITLE_IN
        y = self.height - y_top - _TILE_IN
        return [x / self.width, y / self.height, _TILE_IN / self.width, _TILE_IN / self.height]

    def row_center(self, row: int) -> float:
        y_top = self.top + row * (_TITLE_IN + _TILE_IN + _GAP_IN) + _TITLE_IN
        return 1.0 - (y_top + _TILE_IN / 2) / self.height

    def label_x(self) -> float:
        """Where a row label's centre goes: the middle of the left margin."""
        return (self.pad + 0.5 * self.left) / self.width

    def figure(self) -> Figure:
        fig = Figure(figsize=(self.width, self.height), dpi=DPI)
        if self.suptitle:
            fig.text(0.5, 1 - 0.08 / self.height, self.suptitle, ha="center", va="top", fontsize=_SUPTITLE_PT)
        return fig


def _text_width_in(text: str, fontsize: float) -> float:
    # The rendered width with matplotlib's default font (points -> inches).
    return float(TextPath((0, 0), text, size=fontsize).get_extents().width) / 72.0


def query_figure(
    query: Tensor,
    query_title: str,
    proponents: Tensor,
    proponent_titles: Sequence[str],
    opponents: Tensor,
    opponent_titles: Sequence[str],
    *,
    suptitle: str | None = None,
) -> Figure:
    """One query and its training samples: the query (outlined) left, proponents above opponents.

    Args:
        query: the query image ``[C, H, W]`` in [0, 1].
        query_title: its tile title (e.g. index and label).
        proponents: ``[k, C, H, W]`` images of the proponents, strongest first.
        proponent_titles: one title per proponent (e.g. training index, label and score).
        opponents: ``[k', C, H, W]`` images of the opponents, strongest first.
        opponent_titles: one title per opponent.
        suptitle: an optional line above everything.
    """
    k = max(len(proponents), len(opponents), 1)
    grid = _Grid(2, k + 1, left=_LABEL_IN, suptitle=suptitle)
    fig = grid.figure()
    # The query spans both rows' height at tile size, vertically centred.
    r0, r1 = grid.rect(0, 0), grid.rect(1, 0)
    mid = (r0[1] + r1[1]) / 2
    _draw_tile(fig, [r0[0], mid, r0[2], r0[3]], query, query_title, QUERY, width=5.0)
    for row, (name, images, titles, color) in enumerate(
        (("proponents", proponents, proponent_titles, PROPONENT), ("opponents", opponents, opponent_titles, OPPONENT))
    ):
        fig.text(
            grid.label_x(),
            grid.row_center(row),
            name,
            rotation=90,
            ha="center",
            va="center",
            fontsize=9,
            color=color,
            fontweight="bold",
        )
        for j in range(len(images)):
            _draw_tile(fig, grid.rect(row, j + 1), images[j], titles[j], color)
    return fig


def gallery_figure(
    images: Tensor, titles: Sequence[str], *, ncols: int = 8, color: str = SAMPLE, suptitle: str | None = None
) -> Figure:
    """Images in a grid of framed, titled tiles (``ncols`` per row)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    grid = _Grid(nrows, ncols, left=0.0, suptitle=suptitle)
    fig = grid.figure()
    for i in range(n):
        _draw_tile(fig, grid.rect(i // ncols, i % ncols), images[i], titles[i], color)
    return fig


def grid_figure(
    tiles: Tensor,
    column_titles: Sequence[str],
    *,
    row_titles: Sequence[str] | None = None,
    marked_column: int | None = 0,
    suptitle: str | None = None,
) -> Figure:
    """A grid of image tiles ``[R, C, channels, H, W]`` in [0, 1] with column titles; one column outlined.

    Args:
        tiles: the images, one row per input.
        column_titles: one title per column (shown above the first row).
        row_titles: optional label per row (left of it).
        marked_column: the column framed in ``INPUT`` blue (e.g. the inputs); others get a thin grey frame.
        suptitle: an optional line above everything.
    """
    n_rows, n_cols = int(tiles.shape[0]), int(tiles.shape[1])
    if len(column_titles) != n_cols:
        raise ValueError(f"`column_titles` has {len(column_titles)} entries for {n_cols} columns.")
    grid = _Grid(n_rows, n_cols, left=_LABEL_IN if row_titles else 0.0, suptitle=suptitle)
    fig = grid.figure()
    for r in range(n_rows):
        if row_titles:
            fig.text(
                grid.label_x(),
                grid.row_center(r),
                row_titles[r],
                rotation=90,
                ha="center",
                va="center",
                fontsize=8,
            )
        for c in range(n_cols):
            marked = c == marked_column
            title = column_titles[c] if r == 0 else ""
            _draw_tile(fig, grid.rect(r, c), tiles[r, c], title, INPUT if marked else "#bbbbbb", 4.0 if marked else 1.0)
    return fig
