"""Figures and TensorBoard views of a :class:`~lightning_influence.fragility.report.FragilityReport`.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot), so nothing here changes
matplotlib's global backend or leaks open figures.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure

from lightning_influence.fragility.report import FragilityReport, format_value
from lightning_influence.reporting.tensorboard import get_summary_writer, writer_step

__all__ = ["fragility_figures", "log_fragility"]


def fragility_figures(report: FragilityReport) -> dict[str, Figure]:
    """Matplotlib figures of a fragility report.

    Returns:
        ``scatter`` (predicted vs actual with the noise band), and when available ``eigenvalues``,
        ``damping`` and ``trajectories``.
    """
    figs: dict[str, Figure] = {}
    done = report.measured
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    if done:
        pred = [r.predicted for r in done]
        act = [r.mean_actual for r in done]
        err = [r.std_actual if math.isfinite(r.std_actual) else 0.0 for r in done]
        colors = ["tab:blue" if r.above_noise_floor is not False else "tab:gray" for r in done]
        ax.errorbar(pred, act, yerr=err, fmt="none", ecolor="lightgray", zorder=1)
        ax.scatter(pred, act, c=colors, s=18, zorder=2)
        lo, hi = min(pred + act), max(pred + act)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="actual = predicted")
        if report.noise_floor is not None:
            band = report.noise_threshold * report.noise_floor
            ax.axhspan(-band, band, color="tab:red", alpha=0.12, label=f"noise floor +-{band:.2g}")
        ax.legend(fontsize=7)
    ax.set_xlabel("predicted change of test loss")
    ax.set_ylabel("actual change (retrained)")
    m = report.metrics
    ax.set_title(f"Pearson {format_value(m.get('pearson'))}, Spearman {format_value(m.get('spearman'))}", fontsize=9)
    fig.tight_layout()
    figs["scatter"] = fig
    c = report.curvature
    if c is not None:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        if c.spectrum:
            ax.plot(range(len(c.spectrum)), c.spectrum, "o-", ms=3)
            ax.set_xlabel("index (ascending)")
            ax.set_yscale("symlog", linthresh=max(1e-6, abs(c.largest) * 1e-4))
        else:
            ax.bar(["smallest", "largest"], [c.smallest, c.largest])
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_ylabel("Hessian eigenvalue")
        ax.set_title(f"block of {c.dim} parameters" + (" (negative curvature)" if c.negative_curvature else ""))
        fig.tight_layout()
        figs["eigenvalues"] = fig
        if c.dampings and c.damping_spearman:
            fig = Figure(figsize=(5, 3.5))
            ax = fig.subplots()
            xs = [d if d > 0 else min([x for x in c.dampings if x > 0] or [1.0]) / 10 for d in c.dampings]
            ax.semilogx(xs, c.damping_pearson, "o-", label="Pearson")
            ax.semilogx(xs, c.damping_spearman, "s-", label="Spearman")
            ax.set_xlabel("damping lambda (0 plotted one decade below the smallest)")
            ax.set_ylabel("agreement with retraining")
            ax.legend(fontsize=7)
            fig.tight_layout()
            figs["damping"] = fig
    traj = [r for r in report.removals if r.trajectory_losses]
    if traj:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        for r in traj[:20]:
            ax.plot(r.trajectory_epochs, r.trajectory_losses, lw=0.8)
        ax.set_xlabel("retraining epoch")
        ax.set_ylabel("test loss")
        ax.set_title("test loss while retraining (damped = settled)")
        fig.tight_layout()
        figs["trajectories"] = fig
    return figs


def log_fragility(
    trainer_or_logger: Any, report: FragilityReport, tag: str = "fragility", step: int | None = None
) -> None:
    """Write a fragility report's figures, the summary text and the headline scalars to TensorBoard.

    Args:
        trainer_or_logger: a Trainer with a TensorBoardLogger, a TensorBoardLogger or a SummaryWriter.
        report: the report to show.
        tag: prefix of every entry.
        step: global step (default: the Trainer's, else 0).
    """
    writer = get_summary_writer(trainer_or_logger)
    step = writer_step(trainer_or_logger) if step is None else step
    for name, fig in fragility_figures(report).items():
        writer.add_figure(f"{tag}/{name}", fig, global_step=step, close=True)
    text = "    " + report.summary().replace("\n", "\n    ")  # indented = preformatted in TensorBoard markdown
    writer.add_text(f"{tag}/summary", text, global_step=step)
    for key in ("pearson", "spearman", "sign_agreement", "slope", "fraction_above_noise_floor"):
        value = report.metrics.get(key, math.nan)
        if math.isfinite(value):
            writer.add_scalar(f"{tag}/{key}", value, global_step=step)
    if report.noise_floor is not None:
        writer.add_scalar(f"{tag}/noise_floor", report.noise_floor, global_step=step)
    writer.flush()
