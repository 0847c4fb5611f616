"""FragilityReport: statistics from raw removals, verdicts, JSON round trip, TensorBoard output."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_influence.fragility.report import CurvatureDiagnostics, FragilityReport, RemovalResult
from lightning_influence.reporting.fragility import fragility_figures, log_fragility


def _report(noise: float = 0.01, scale: float = 1.0, seeds: int = 3) -> FragilityReport:
    gen = torch.Generator().manual_seed(0)
    removals = []
    for i in range(12):
        pred = (i - 5.5) / 10
        actual = [scale * pred + noise * float(torch.randn(1, generator=gen)) for _ in range(seeds)]
        removals.append(
            RemovalResult(
                indices=[i],
                predicted=pred,
                actual=actual,
                seeds=list(range(seeds)),
                kind="proponent" if pred > 0 else "opponent",
                trajectory_epochs=[0, 10],
                trajectory_losses=[1.0, 1.0 + pred],
            )
        )
    removals.append(RemovalResult(indices=[99], predicted=0.3))  # never measured (a partial run)
    curvature = CurvatureDiagnostics(
        param_names=["w"],
        dim=3,
        smallest=0.1,
        largest=2.0,
        n_iter=3,
        converged=True,
        negative_curvature=False,
        spectrum=[0.1, 1.0, 2.0],
        dampings=[0.0, 0.1, 1.0],
        damping_predictions=[[r.predicted * (1 + d) for r in removals] for d in (0.0, 0.1, 1.0)],
        damping_relative_change=[0.0, 0.1, 1.0],
    )
    rep = FragilityReport(
        retrain="scratch",
        removal="single",
        selection="abs",
        n_train=100,
        seeds=list(range(seeds)),
        reference_test_loss=0.5,
        control_test_losses=[0.5 + noise * k for k in range(seeds)],
        removals=removals,
        curvature=curvature,
        complete=False,
    )
    return rep.finalize(n_bootstrap=100)


def test_finalize_computes_floor_labels_and_metrics():
    rep = _report(noise=0.01)
    floor = float(torch.tensor([0.5, 0.51, 0.52], dtype=torch.float64).std())
    assert rep.noise_floor == pytest.approx(floor)
    assert rep.control_drift == pytest.approx(0.01)
    assert rep.metrics["n"] == 12  # the unmeasured removal is excluded
    assert rep.metrics["pearson"] > 0.99
    assert len(rep.per_seed) == 3 and rep.per_seed[1]["seed"] == 1.0
    assert rep.metrics["spearman_seed_ci_low"] <= rep.metrics["spearman"] <= rep.metrics["spearman_seed_ci_high"] + 1e-9
    for r in rep.measured:
        assert r.above_noise_floor == (abs(r.mean_actual) > floor)
    assert rep.removals[-1].label == "not measured"
    assert rep.curvature.damping_pearson[0] == pytest.approx(rep.metrics["pearson"], abs=1e-9)


def test_verdicts_follow_the_numbers():
    good = {v.check: v.status for v in _report(noise=0.001).verdicts()}
    assert good["agreement"] == "OK" and good["scale"] == "OK" and good["sign"] == "OK"
    assert good["curvature"] == "OK" and good["noise floor"] == "OK"
    assert good["completed"] == "WARN"  # complete=False without an error
    noisy = {v.check: v.status for v in _report(noise=5.0).verdicts()}
    assert noisy["agreement"] == "FAIL" and noisy["noise floor"] == "FAIL"
    small = {v.check: v.status for v in _report(noise=0.001, scale=0.05).verdicts()}
    assert small["scale"] == "FAIL"  # right ranking, wrong scale (the paper's MNIST "miss-relation")
    rep = _report()
    rep.curvature.negative_curvature = True
    assert {v.check: v.status for v in rep.verdicts()}["curvature"] == "WARN"
    rep.errors.append("RetrainingDivergedError: ...")
    assert {v.check: v.status for v in rep.verdicts()}["completed"] == "FAIL"
    one_seed = _report(seeds=1)
    assert one_seed.noise_floor is None
    assert {v.check: v.status for v in one_seed.verdicts()}["noise floor"] == "N/A"


def test_summary_has_one_verdict_per_check():
    text = _report().summary()
    for check in ("completed", "agreement", "sign", "scale", "noise floor", "curvature", "damping"):
        assert f"] {check}:" in text
    assert "noise floor (sd of control test loss over seeds)" in text


def test_json_round_trip_is_strict_and_lossless(tmp_path):
    rep = _report(seeds=1)  # noise floor None, some metrics NaN
    path = tmp_path / "fragility.json"
    text = rep.to_json(path)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = FragilityReport.from_json(path)
    assert back.to_dict() == rep.to_dict()
    assert isinstance(back.removals[0], RemovalResult) and isinstance(back.curvature, CurvatureDiagnostics)
    assert math.isnan(back.metrics["spearman_seed_ci_low"])
    assert math.isnan(back.removals[-1].mean_actual)
    assert FragilityReport.from_json(text).to_dict() == rep.to_dict()  # the text itself also works
    with pytest.raises(ValueError, match="unexpected keys"):
        FragilityReport.from_json(json.dumps({**rep.to_dict(), "bogus": 1}))


def test_figures_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rep = _report()
    figs = fragility_figures(rep)
    assert set(figs) == {"scatter", "eigenvalues", "damping", "trajectories"}
    logger = TensorBoardLogger(tmp_path, name="frag")
    log_fragility(logger, rep, tag="check")
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"check/scatter", "check/eigenvalues", "check/damping", "check/trajectories"} <= set(tags["images"])
    assert "check/pearson" in tags["scalars"] and "check/noise_floor" in tags["scalars"]
    assert any(t.startswith("check/summary") for t in tags["tensors"])
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(MisconfigurationException, match="`trainer_or_logger`"):
        log_fragility(trainer, rep)
