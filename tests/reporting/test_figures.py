"""Figures and summary views take results as they come: long titles, single tiles, flagged (NaN) samples, ties."""

from __future__ import annotations

import math

import torch

from lightning_influence.reporting.figures import TILE_PX, gallery_figure, query_figure
from lightning_influence.reporting.influence import influence_table, self_influence_figures
from lightning_influence.trajectory.analysis import InfluenceSummary
from lightning_influence.trajectory.tracin import TopK

LONG = "query 0 (label 6): its proponents and opponents by TracIn over six checkpoints"


def _text_fits(fig) -> bool:
    fig.canvas.draw()
    width = fig.bbox.width
    return all(0 <= t.get_window_extent().x0 and t.get_window_extent().x1 <= width for t in fig.texts)


def test_a_title_wider_than_the_tiles_widens_the_figure_and_tiles_keep_their_size():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    img = torch.rand(1, 1, 8, 8)
    for fig in (
        query_figure(img[0], "q", img, ["p"], img, ["o"], suptitle=LONG),
        gallery_figure(img, ["s"], suptitle=LONG),
    ):
        FigureCanvasAgg(fig)
        assert _text_fits(fig), "the title (or a row label) runs off the figure"
        tile = next(ax for ax in fig.axes if ax.images)
        assert round(tile.get_window_extent().width) == TILE_PX


def _summary(self_inf: torch.Tensor) -> InfluenceSummary:
    idx = torch.tensor([[0, 1]])
    top = TopK(idx, torch.tensor([[1.0, 0.5]]))
    return InfluenceSummary(
        self_influence=self_inf, proponents=top, opponents=top, n_checkpoints=1, projection_dim=None
    )


def test_flagged_samples_are_left_out_of_a_class_median():
    self_inf = torch.tensor([5.0, 6.0, float("nan"), float("nan"), 1.0, 2.0, 3.0])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    table = influence_table(_summary(self_inf), train_labels=labels, n_self=2)
    assert "| 0 | 4 | 5 |" in table and "| 1 | 3 | 2 |" in table  # torch.median: the lower middle value


def test_self_influence_against_a_constant_loss_has_no_rank_correlation():
    figs = self_influence_figures(torch.tensor([1.0, 2.0, 3.0, 4.0]), losses=torch.full((4,), 0.5))
    title = figs["self_influence_vs_loss"].axes[0].get_title()
    assert title == "Self-influence vs loss (Spearman nan)", title
    figs = self_influence_figures(torch.tensor([1.0, 2.0, 3.0, 4.0]), losses=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert math.isclose(float(figs["self_influence_vs_loss"].axes[0].get_title().split()[-1].rstrip(")")), 1.0)
