"""``FragilityReport``: what a fragility check measured, its verdicts, JSON and TensorBoard output.

The report is plain data (dataclasses of floats and lists) so it round-trips through JSON; the
statistics are recomputed from the raw removals by :meth:`FragilityReport.finalize`, so a
partial report (a check that stopped on an error) carries correct metrics for what it did finish.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_influence.fragility.metrics import (
    agreement_metrics,
    correlation_confidence_interval,
    pearson,
    spearman,
)
from lightning_influence.fragility.references import density_references

__all__ = ["CurvatureDiagnostics", "FragilityReport", "RemovalResult", "Verdict"]

OK, WARN, FAIL, NA = "OK", "WARN", "FAIL", "N/A"


@dataclass
class RemovalResult:
    """One removal (a single sample or a group) and its measured effects.

    Attributes:
        indices: training-set positions removed together.
        predicted: the estimator's prediction (sum of the scores of ``indices``).
        actual: per completed seed, ``L_test(retrained without indices) - L_test(control)``.
        seeds: the seeds of ``actual``.
        kind: how the removal was chosen (``"proponent"``, ``"opponent"``, ``"random"``, ``"given"``).
        trajectory_epochs / trajectory_losses: test loss during the first seed's retrain, if recorded.
        above_noise_floor: ``|mean actual| > noise threshold``; ``None`` while the floor is unknown.
    """

    indices: list[int]
    predicted: float
    actual: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    kind: str = "given"
    trajectory_epochs: list[int] = field(default_factory=list)
    trajectory_losses: list[float] = field(default_factory=list)
    above_noise_floor: bool | None = None

    @property
    def mean_actual(self) -> float:
        return float(sum(self.actual) / len(self.actual)) if self.actual else math.nan

    @property
    def std_actual(self) -> float:
        if len(self.actual) < 2:
            return math.nan
        return float(torch.tensor(self.actual, dtype=torch.float64).std())

    @property
    def label(self) -> str:
        if not self.actual:
            return "not measured"
        if self.above_noise_floor is None:
            return "noise floor unknown"
        return "above noise floor" if self.above_noise_floor else "below noise floor"


@dataclass
class CurvatureDiagnostics:
    """Curvature of the training loss in a parameter block at the trained model, and a damping sweep.

    Attributes:
        param_names: the block.
        dim: its number of parameters.
        smallest / largest: extreme Hessian eigenvalues (Lanczos on Hessian-vector products).
        n_iter / converged: Lanczos steps and whether both extremes converged.
        negative_curvature: the smallest eigenvalue is significantly negative (not a minimum in the block).
        spectrum: all eigenvalues when the block was small enough for the exact Hessian.
        dampings: the damping values of the sweep.
        damping_predictions: per damping, the influence-function prediction of every removal.
        damping_pearson / damping_spearman: agreement of each damping's predictions with the actual effects.
        damping_relative_change: ``|s(lambda) - s(lambda_0)| / |s(lambda_0)|`` over the removals.
        note: why parts are missing (block too large for the exact sweep, ...).
    """

    param_names: list[str]
    dim: int
    smallest: float
    largest: float
    n_iter: int
    converged: bool
    negative_curvature: bool
    spectrum: list[float] = field(default_factory=list)
    dampings: list[float] = field(default_factory=list)
    damping_predictions: list[list[float]] = field(default_factory=list)
    damping_pearson: list[float] = field(default_factory=list)
    damping_spearman: list[float] = field(default_factory=list)
    damping_relative_change: list[float] = field(default_factory=list)
    note: str = ""


@dataclass
class Verdict:
    """One check's outcome: ``status`` is ``OK``, ``WARN``, ``FAIL`` or ``N/A``."""

    check: str
    status: str
    detail: str


def _clean(obj: Any) -> Any:
    """Strict JSON: non-finite floats become ``None`` (read back as ``nan``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _nan(x: Any) -> Any:
    if x is None:
        return math.nan
    if isinstance(x, list):
        return [_nan(v) for v in x]
    if isinstance(x, dict):
        return {k: _nan(v) for k, v in x.items()}
    return x


def format_value(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}"


@dataclass
class FragilityReport:
    """Predicted vs retrained removal effects, the noise floor, curvature, verdicts.

    Attributes:
        retrain: ``"warm_start"`` or ``"scratch"``.
        removal: ``"single"`` or the group size.
        selection: how removals were chosen.
        n_train: training-set size (the length the estimates must have).
        seeds: retraining seeds.
        reference_test_loss: test loss of the trained model handed to the check (if any).
        control_test_losses: per seed, the test loss after retraining on *all* data (no removal).
        noise_floor: sample standard deviation of ``control_test_losses`` (the retraining noise;
            ``None`` with fewer than 2 seeds).
        noise_threshold: an effect is "above the noise floor" when ``|effect| > noise_threshold * noise_floor``.
        removals: every removal with its prediction and measured effects.
        metrics: agreement of predicted vs mean actual (see :func:`agreement_metrics`), plus
            per-seed correlation confidence intervals.
        per_seed: agreement metrics for each seed separately.
        curvature: curvature diagnostics, if requested.
        errors: what stopped the check (empty if it completed).
        complete: every planned retrain finished.
        runtime_s: wall time of the check; n_fits: Trainer.fit calls.
        config: the check's settings (for the record).
        references: sanity rows from estimators with exact leave-one-out influence (see
            :func:`~lightning_influence.fragility.references.density_references`); they must agree
            perfectly, or the pipeline, not the estimator, is at fault.
    """

    retrain: str
    removal: str | int
    selection: str
    n_train: int
    seeds: list[int]
    reference_test_loss: float | None = None
    control_test_losses: list[float] = field(default_factory=list)
    noise_floor: float | None = None
    noise_threshold: float = 1.0
    removals: list[RemovalResult] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    per_seed: list[dict[str, float]] = field(default_factory=list)
    curvature: CurvatureDiagnostics | None = None
    errors: list[str] = field(default_factory=list)
    complete: bool = False
    runtime_s: float = 0.0
    n_fits: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    references: dict[str, dict[str, float]] = field(default_factory=dict)

    # ------------------------------------------------------------------ statistics
    @property
    def measured(self) -> list[RemovalResult]:
        """Removals with at least one measured effect."""
        return [r for r in self.removals if r.actual]

    @property
    def control_drift(self) -> float:
        """Mean control test loss minus the reference test loss: how far retraining itself moves the model."""
        if self.reference_test_loss is None or not self.control_test_losses:
            return math.nan
        return sum(self.control_test_losses) / len(self.control_test_losses) - self.reference_test_loss

    def finalize(self, n_bootstrap: int = 1000) -> FragilityReport:
        """(Re)compute noise floor, labels, metrics and the damping-sweep agreement from the raw results."""
        if len(self.control_test_losses) >= 2:
            self.noise_floor = float(torch.tensor(self.control_test_losses, dtype=torch.float64).std())
        threshold = None if self.noise_floor is None else self.noise_threshold * self.noise_floor
        for r in self.removals:
            r.above_noise_floor = None if (threshold is None or not r.actual) else bool(abs(r.mean_actual) > threshold)
        done = self.measured
        pred = [r.predicted for r in done]
        act = [r.mean_actual for r in done]
        self.metrics = agreement_metrics(pred, act, noise_floor=threshold, n_bootstrap=n_bootstrap)
        self.per_seed = []
        for s in self.seeds:
            pairs = [(r.predicted, r.actual[r.seeds.index(s)]) for r in done if s in r.seeds]
            if pairs:
                m = agreement_metrics([p for p, _ in pairs], [a for _, a in pairs], noise_floor=threshold)
                m["seed"] = float(s)
                self.per_seed.append(m)
        for name in ("pearson", "spearman"):
            _, lo, hi = correlation_confidence_interval([m[name] for m in self.per_seed])
            self.metrics[f"{name}_seed_ci_low"], self.metrics[f"{name}_seed_ci_high"] = lo, hi
        if self.curvature is not None and self.curvature.damping_predictions:
            c = self.curvature
            idx = [i for i, r in enumerate(self.removals) if r.actual]
            c.damping_pearson = [pearson([row[i] for i in idx], act) for row in c.damping_predictions]
            c.damping_spearman = [spearman([row[i] for i in idx], act) for row in c.damping_predictions]
        return self

    # ------------------------------------------------------------------ verdicts
    def verdicts(self) -> list[Verdict]:
        """One verdict per check: completeness, rank/linear agreement, sign, scale, noise floor, curvature, damping."""
        m = self.metrics
        out: list[Verdict] = []
        if self.errors:
            out.append(Verdict("completed", FAIL, f"stopped early: {self.errors[-1]}"))
        else:
            out.append(Verdict("completed", OK if self.complete else WARN, f"{len(self.measured)} removals measured"))
        r, rho = m.get("pearson", math.nan), m.get("spearman", math.nan)
        if not (math.isfinite(r) and math.isfinite(rho)):
            out.append(Verdict("agreement", NA, "fewer than 3 removals measured or constant values"))
        else:
            worst = min(r, rho)
            status = OK if worst >= 0.8 else WARN if worst >= 0.5 else FAIL
            ci = ""
            if math.isfinite(m.get("spearman_low", math.nan)):
                ci = f" (bootstrap 95% CI of Spearman [{format_value(m['spearman_low'])}, {format_value(m['spearman_high'])}])"
            out.append(Verdict("agreement", status, f"Pearson {format_value(r)}, Spearman {format_value(rho)}{ci}"))
        sa = m.get("sign_agreement", math.nan)
        if math.isfinite(sa):
            out.append(Verdict("sign", OK if sa >= 0.8 else WARN if sa >= 0.6 else FAIL, f"{sa:.0%} of signs agree"))
        s = m.get("slope", math.nan)
        if math.isfinite(s):
            status = OK if 0.5 <= s <= 2.0 else WARN if 0.2 <= s <= 5.0 else FAIL
            out.append(Verdict("scale", status, f"actual ~= {format_value(s)} x predicted (1 = right scale)"))
        else:
            out.append(Verdict("scale", NA, "slope undefined"))
        if self.noise_floor is None:
            out.append(Verdict("noise floor", NA, "not measured (needs >= 2 seeds)"))
        else:
            f = m.get("fraction_above_noise_floor", math.nan)
            status = OK if f >= 0.8 else WARN if f >= 0.5 else FAIL
            detail = f"{f:.0%} of effects exceed the retraining noise floor {format_value(self.noise_floor)}"
            if self.noise_floor == 0.0:
                detail += " (retraining is deterministic)"
            out.append(Verdict("noise floor", status, detail))
        c = self.curvature
        if c is None:
            out.append(Verdict("curvature", NA, "not computed (pass `curvature_params`)"))
        else:
            if c.negative_curvature:
                status, detail = WARN, "negative curvature: the model is not at a minimum in this block"
            elif not c.converged:
                status, detail = WARN, "Lanczos did not converge"
            else:
                status, detail = OK, "positive semi-definite"
            detail += f"; eigenvalues [{format_value(c.smallest)}, {format_value(c.largest)}] over {c.dim} parameters"
            out.append(Verdict("curvature", status, detail))
            finite = [x for x in c.damping_spearman if math.isfinite(x)]
            if finite:
                spread = max(finite) - min(finite)
                status = OK if spread <= 0.1 else WARN
                best = c.dampings[c.damping_spearman.index(max(finite))]
                out.append(
                    Verdict(
                        "damping",
                        status,
                        f"Spearman ranges over {format_value(min(finite))}..{format_value(max(finite))} across dampings"
                        f" {c.dampings} (best at {best:g})",
                    )
                )
        if self.references:
            errors = {name: ref.get("max_abs_error", math.nan) for name, ref in self.references.items()}
            exact = all(math.isfinite(e) and e <= 1e-8 for e in errors.values())
            detail = ", ".join(f"{name} max error {format_value(e, 2)}" for name, e in errors.items())
            out.append(Verdict("reference", OK if exact else FAIL, f"exact leave-one-out estimators: {detail}"))
        return out

    def add_density_references(
        self, train: Tensor, queries: Tensor, *, bandwidth: float | None = None, k: int = 5
    ) -> FragilityReport:
        """Add KDE and k-NN sanity rows on ``train``/``queries`` inputs (see
        :func:`~lightning_influence.fragility.references.density_references`); returns ``self``."""
        self.references.update(density_references(train, queries, bandwidth=bandwidth, k=k))
        return self

    def summary(self) -> str:
        """Human-readable summary with one verdict per check."""
        m = self.metrics
        lines = [
            (
                f"Fragility check: {len(self.measured)}/{len(self.removals)} removals "
                f"({'single samples' if self.removal == 'single' else f'groups of {self.removal}'}, selection"
                f" '{self.selection}'), retrain={self.retrain}, seeds={self.seeds}, n_train={self.n_train}"
            ),
            (
                f"  reference test loss {format_value(self.reference_test_loss, 4)}; control (no removal) per seed"
                f" {[round(x, 6) for x in self.control_test_losses]}; drift {format_value(self.control_drift)}"
            ),
            f"  noise floor (sd of control test loss over seeds): {format_value(self.noise_floor)}",
            (
                f"  Pearson {format_value(m.get('pearson'))}  Spearman {format_value(m.get('spearman'))}  sign agreement"
                f" {format_value(m.get('sign_agreement'))}  slope {format_value(m.get('slope'))}  above noise"
                f" {format_value(m.get('fraction_above_noise_floor'))}"
            ),
        ]
        if len(self.per_seed) >= 2:
            lines.append(
                f"  per-seed Spearman 95% CI [{format_value(m.get('spearman_seed_ci_low'))}, {format_value(m.get('spearman_seed_ci_high'))}],"
                f" Pearson [{format_value(m.get('pearson_seed_ci_low'))}, {format_value(m.get('pearson_seed_ci_high'))}]"
            )
        below = [r for r in self.measured if r.above_noise_floor is False]
        if below:
            lines.append(f"  {len(below)} effects are below the noise floor (labelled 'below noise floor').")
        for name, ref in self.references.items():
            lines.append(
                f"  reference {name} (exact leave-one-out): closed form vs refit max error"
                f" {format_value(ref.get('max_abs_error'), 2)}, Pearson {format_value(ref.get('pearson'))}"
            )
        lines.append("Verdicts:")
        for v in self.verdicts():
            lines.append(f"  [{v.status:4}] {v.check}: {v.detail}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """Serialise to strict JSON (non-finite floats as ``null``); also write it to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> FragilityReport:
        """Load a report written by :meth:`to_json` (a path or the JSON text itself)."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Not a FragilityReport JSON: unexpected keys {sorted(unknown)}.")
        removals = [
            RemovalResult(**{**r, "actual": _nan(r["actual"]), "trajectory_losses": _nan(r["trajectory_losses"])})
            for r in data.pop("removals", [])
        ]
        curv = data.pop("curvature", None)
        curvature = None
        if curv is not None:
            curvature = CurvatureDiagnostics(**{k: _nan(v) for k, v in curv.items()})
        data["metrics"] = _nan(data.get("metrics", {}))
        data["per_seed"] = _nan(data.get("per_seed", []))
        data["control_test_losses"] = _nan(data.get("control_test_losses", []))
        data["references"] = _nan(data.get("references", {}))
        return cls(**data, removals=removals, curvature=curvature)
